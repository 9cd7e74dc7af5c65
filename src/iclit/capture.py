"""Capturing the last prompt token's hidden state at every layer.

States follow transformers' ``output_hidden_states`` convention: index 0 is the input of the
first block (the embeddings), index i (1 ≤ i < L) the output of block i, and index L the
output of the last block *after the final norm* (what the LM head reads). Only the rows of
the last real token of each prompt are kept: forward hooks gather them layer by layer, so no
``[batch, seq, hidden]`` tensor per layer is held, and the LM head runs on those rows only.

Batches are right-padded and the last-token index comes from the attention mask, so padding
never changes a state (positions of real tokens are unaffected by trailing pads under a
causal mask).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from iclit.models.arch import decoder_of, layers_of, lm_head_logits, n_states


@dataclass
class Capture:
    """Captured outputs for n prompts.

    states: [n, L+1, d] float32 (CPU); label_logits: [n, n_labels] (CPU) or None;
    label_logprobs: [n, n_labels] log-probabilities under the full vocabulary, or None.
    """

    states: torch.Tensor
    label_logits: torch.Tensor | None = None
    label_logprobs: torch.Tensor | None = None


@contextmanager
def _gather_hooks(model: nn.Module, rows: list[torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """Hooks that append, per layer, the hidden state at ``ctx['index']`` ([b] positions).

    ``rows`` receives L tensors [b, d]: the input of block 0 and the outputs of blocks
    0..L-2; the last state (post-norm) is taken from the decoder's output.
    """
    ctx: dict[str, torch.Tensor] = {}
    layers = layers_of(model)

    def take(h: torch.Tensor) -> torch.Tensor:
        return h[torch.arange(h.shape[0], device=h.device), ctx["index"]]

    def pre_hook(_m, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        rows.append(take(h))

    def post_hook(_m, _args, output):
        rows.append(take(output[0] if isinstance(output, tuple) else output))

    handles = [layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [layer.register_forward_hook(post_hook) for layer in list(layers)[:-1]]
    try:
        yield ctx
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def forward_last_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    **decoder_kwargs,
) -> torch.Tensor:
    """One padded batch → last-real-token states [b, L+1, d] (on the model's device).

    input_ids, attention_mask: [b, s] (right-padded). Extra keyword arguments go to the
    decoder (e.g. ``past_key_values`` and ``position_ids`` for a cached prefix).
    """
    rows: list[torch.Tensor] = []
    index = attention_mask.sum(dim=1) - 1
    with _gather_hooks(model, rows) as ctx:
        ctx["index"] = index
        out = decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **decoder_kwargs)
    last = out.last_hidden_state[torch.arange(input_ids.shape[0], device=input_ids.device), index]
    rows.append(last)
    assert len(rows) == n_states(model), (len(rows), n_states(model))
    return torch.stack(rows, dim=1)


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), to limit padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def capture(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    label_ids: torch.Tensor | None = None,
    batch_size: int = 16,
) -> Capture:
    """Last-prompt-token states at every layer for each prompt, plus label scores.

    label_ids: [n_labels] token ids whose logits are read at the last position (the first
    token of each verbalised label); only those rows of the LM head are computed, plus one
    full-vocabulary row per prompt for the log-normaliser.
    """
    device = next(model.parameters()).device
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    states = [None] * len(prompts)
    logits = [None] * len(prompts)
    logprobs = [None] * len(prompts)
    pad = tokenizer.pad_token_id
    for batch in _batches([len(e) for e in encoded], batch_size):
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[row, : len(encoded[i])] = 1
        h = forward_last_states(model, ids.to(device), mask.to(device))
        if label_ids is not None:
            with torch.no_grad():
                full = lm_head_logits(model, h[:, -1]).float()
            lab = full[:, label_ids.to(device)]
            lp = lab - torch.logsumexp(full, dim=-1, keepdim=True)
        for row, i in enumerate(batch):
            states[i] = h[row].float().cpu()
            if label_ids is not None:
                logits[i] = lab[row].cpu()
                logprobs[i] = lp[row].cpu()
    return Capture(
        states=torch.stack(states),
        label_logits=torch.stack(logits) if label_ids is not None else None,
        label_logprobs=torch.stack(logprobs) if label_ids is not None else None,
    )


def answer_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> list[int]:
    """Token ids of ``answer`` as they follow ``prompt``.

    Tokenises the answer on its own (no special tokens), so the prompt's tokens are exactly
    those the query prompt has at capture time: the boundary is never merged across.
    """
    return tokenizer(answer, add_special_tokens=False)["input_ids"]


def label_token_ids(tokenizer: PreTrainedTokenizerBase, answers: Sequence[str]) -> torch.Tensor:
    """First token id of each verbalised label (answers include their leading separator).

    Raises ValueError when two labels share a first token: they could not be told apart
    from the next-token distribution.
    """
    firsts = []
    for a in answers:
        ids = tokenizer(a, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"label {a!r} tokenises to nothing")
        firsts.append(ids[0])
    if len(set(firsts)) != len(firsts):
        raise ValueError(
            f"labels {list(answers)} share a first token ({firsts}); choose label words that "
            "start differently"
        )
    return torch.tensor(firsts, dtype=torch.long)


@torch.no_grad()
def greedy_continuations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 48,
    stop: str = "\n",
    batch_size: int = 16,
) -> list[str]:
    """Greedy continuation of each prompt, cut at the first ``stop`` string."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = [""] * len(prompts)
    try:
        encoded = [len(tokenizer(p)["input_ids"]) for p in prompts]
        for batch in _batches(encoded, batch_size):
            enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True).to(device)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            for row, i in enumerate(batch):
                text = tokenizer.decode(gen[row, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                out[i] = text.split(stop)[0].strip() if stop else text.strip()
    finally:
        tokenizer.padding_side = side
    return out
