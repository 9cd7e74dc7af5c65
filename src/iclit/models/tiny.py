"""A tiny randomly initialised LLaMA-architecture model with a byte-level BPE tokenizer
trained on iclit's own task texts: no files, no network, loads in about a second.

Registered as the model name ``tiny-random-llama``: for tests, for smoke runs of a pipeline
(including Ray workers, which load models by name) and for trying iclit without weights.
Its numbers mean nothing scientifically.
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files

import torch

TINY_VOCAB = 600


def _corpus() -> list[str]:
    data = files("iclit.tasks").joinpath("data")
    texts: list[str] = []
    for name in ("sentiment.jsonl", "translation_en_cs.jsonl", "reference.jsonl"):
        for line in data.joinpath(name).read_text(encoding="utf-8").splitlines():
            texts.extend(v for v in json.loads(line).values() if isinstance(v, str))
    texts += ["Review: Sentiment: positive negative English: Czech: Input: Output:"] * 20
    return texts


@cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok.to_str()


def build_tiny_tokenizer():
    """A fresh PreTrainedTokenizerFast (BOS added, pad/eos set); deterministic."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()), bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_tiny_llama(vocab_size: int = TINY_VOCAB, seed: int = 0, layers: int = 3, hidden: int = 64):
    """A randomly initialised LlamaForCausalLM; the same seed gives the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def build_tiny():
    """(model, tokenizer) of the ``tiny-random-llama`` model."""
    tokenizer = build_tiny_tokenizer()
    return build_tiny_llama(len(tokenizer)), tokenizer
