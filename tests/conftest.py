"""Shared fixtures: a tiny randomly initialised LLaMA-architecture model and a byte-level BPE
tokenizer trained in the test on iclit's own task texts. No files, no network."""

from __future__ import annotations

import json
from importlib.resources import files

import pytest
import torch

TINY_VOCAB = 600


def _corpus() -> list[str]:
    data = files("iclit.tasks").joinpath("data")
    texts = []
    for name in ("sentiment.jsonl", "translation_en_cs.jsonl", "reference.jsonl"):
        for line in data.joinpath(name).read_text(encoding="utf-8").splitlines():
            texts.extend(v for v in json.loads(line).values() if isinstance(v, str))
    texts += ["Review: Sentiment: positive negative English: Czech: Input: Output:"] * 20
    return texts


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

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
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture()
def tiny(tiny_tokenizer):
    """A fresh tiny LoadedModel (fp32, CPU) per test."""
    from iclit.models import prepare

    tokenizer = build_tiny_tokenizer() if False else tiny_tokenizer
    model = build_tiny_llama(len(tokenizer))
    return prepare(model, tokenizer, name="tiny-llama", device="cpu")
