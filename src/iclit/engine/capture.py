"""Capturing the last prompt token's hidden state at every layer.

States follow transformers' ``output_hidden_states`` convention: index 0 is the input of the
first block (the embeddings), index i (1 ≤ i < L) the output of block i, and index L the
output of the last block *after the final norm* (what the LM head reads). Only the rows of
the last real token of each prompt are kept: forward hooks gather them layer by layer, so no
``[batch, seq, hidden]`` tensor per layer is held, and the LM head runs on those rows only.

Batches are right-padded and the last-token index comes from the attention mask, so padding
never changes a state (positions of real tokens are unaffected by trailing pads under a
causal mask). Padding, length bucketing and the reused prefix cache are
:mod:`iclit.core.batching`'s (shared with tuning).

Another position, for the reviewers' question whether the finding is a last-token effect:
given where each prompt's query starts (``span_from``, a character offset), the same hooks
also average every layer's states over the query's tokens (``Capture.pooled``), in the same
forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedTokenizerBase

from iclit.core.batching import (
    SharedPrefix,
    common_prefix_length,
    expand_cache,
    filled,
    length_batches,
    pad_right,
    prefix_cache,
    run_decoder,
    with_prefix_mask,
)
from iclit.models.arch import layers_of, lm_head_logits, n_states


@dataclass
class Capture:
    """Captured outputs for n prompts.

    states: [n, L+1, d] float32 (CPU); label_logits: [n, n_labels] (CPU) or None;
    label_logprobs: [n, n_labels] log-probabilities under the full vocabulary, or None;
    pooled: [n, L+1, d] float32, the states averaged over each prompt's span (the query's
    tokens, see ``span_from`` of :func:`capture`), or None.
    """

    states: torch.Tensor
    label_logits: torch.Tensor | None = None
    label_logprobs: torch.Tensor | None = None
    pooled: torch.Tensor | None = None


def _pool(h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[b, s, d] states, [b, s] weights (rows summing to 1) → [b, d] weighted means (float32,
    whatever the model's dtype)."""
    return torch.einsum("bs,bsd->bd", weights.float(), h.float())


@contextmanager
def _gather_hooks(
    model: nn.Module, rows: list[torch.Tensor], pooled: list[torch.Tensor] | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Hooks that append, per layer, the hidden state at ``ctx['index']`` ([b] positions).

    ``rows`` receives L tensors [b, d]: the input of block 0 and the outputs of blocks
    0..L-2; the last state (post-norm) is taken from the decoder's output. With ``pooled``,
    it receives the same L rows averaged with ``ctx['weights']`` ([b, s]) over positions.
    """
    ctx: dict[str, torch.Tensor] = {}
    layers = layers_of(model)

    def take(h: torch.Tensor) -> None:
        rows.append(h[torch.arange(h.shape[0], device=h.device), ctx["index"]])
        if pooled is not None:
            pooled.append(_pool(h, ctx["weights"]))

    def pre_hook(_m, args, kwargs):
        take(args[0] if args else kwargs["hidden_states"])

    def post_hook(_m, _args, output):
        take(output[0] if isinstance(output, tuple) else output)

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
    *,
    index: torch.Tensor | None = None,
    cache=None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One padded batch → last-real-token states [b, L+1, d] (on the model's device).

    input_ids: [b, s] right-padded; attention_mask: [b, s], or [b, p + s] when ``cache``
    holds a cached prefix of p tokens, copied for this batch (then positions continue from p).
    index: [b] position of the last real token within ``input_ids`` (default: from the mask).
    weights: [b, s] averaging weights over ``input_ids``' positions (rows summing to 1); when
    given, returns (last-token states, weighted-mean states), both [b, L+1, d].
    """
    rows: list[torch.Tensor] = []
    pooled: list[torch.Tensor] | None = [] if weights is not None else None
    if index is None:
        index = attention_mask.sum(dim=1) - 1
    with _gather_hooks(model, rows, pooled) as ctx:
        ctx["index"] = index
        if weights is not None:
            ctx["weights"] = weights
        out = run_decoder(
            model, input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=cache is not None
        )
    last = out.last_hidden_state[torch.arange(input_ids.shape[0], device=input_ids.device), index]
    rows.append(last)
    assert len(rows) == n_states(model), (len(rows), n_states(model))
    if pooled is None or weights is None:
        return torch.stack(rows, dim=1)
    pooled.append(_pool(out.last_hidden_state, weights))
    return torch.stack(rows, dim=1), torch.stack(pooled, dim=1)


@torch.no_grad()
def reference_last_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The straightforward way, for checking: a full forward with ``output_hidden_states``
    (and full-vocabulary logits at every position), then the last real token. [b, L+1, d].
    With ``weights`` [b, s], also the weighted means over positions, as
    :func:`forward_last_states`."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    index = attention_mask.sum(dim=1) - 1
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    last = torch.stack([h[rows, index] for h in out.hidden_states], dim=1)
    if weights is None:
        return last
    return last, torch.stack([_pool(h, weights) for h in out.hidden_states], dim=1)


def capture(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    label_ids: torch.Tensor | None = None,
    batch_size: int = 16,
    prefixes: Sequence[str | None] | None = None,
    before_batch: Callable[[list[int]], None] | None = None,
    reference: bool = False,
    span_from: Sequence[int] | None = None,
    variants: Sequence[int] | None = None,
) -> Capture:
    """Last-prompt-token states at every layer for each prompt, plus label scores.

    label_ids: [n_labels] token ids whose logits are read at the last position (the first
    token of each verbalised label); only those rows of the LM head are computed, plus one
    full-vocabulary row per prompt for the log-normaliser.

    prefixes: for each prompt, a text prefix it shares with other prompts (e.g. the
    demonstrations of an ICL prompt) or None. Prompts with the same prefix are run as one
    group: the prefix's key/value cache is computed once and every query of the group is
    batched on top of it.

    before_batch: called with the prompt indices of each batch before its forward pass (used
    to route each row to its own adapter in batched multi-adapter IT).

    variants: for each prompt, the variant of the model it runs through (its adapter, as
    ``before_batch`` routes it). A shared prefix then differs between variants: its cache is
    computed once per variant of the group, in one batch routed by ``before_batch`` called
    with one prompt of each variant (:class:`~iclit.core.batching.SharedPrefix`), and
    each row continues its own variant's. Without it, a group's prefix runs once, as is.

    reference: use the straightforward path instead (full forward per batch with
    ``output_hidden_states`` and no prefix cache), for checking.

    span_from: for each prompt, the character offset where its span starts (e.g. where the
    query begins after the demonstrations); the states averaged over the span's tokens — from
    the first token that ends after that offset to the last token — are returned as
    ``Capture.pooled``. A cached prefix never reaches into a span.
    """
    device = next(model.parameters()).device
    if span_from is None:
        encoded, starts = [tokenizer(p)["input_ids"] for p in prompts], None
    else:
        pairs = [encode_with_span(tokenizer, p, c) for p, c in zip(prompts, span_from, strict=True)]
        encoded, starts = [ids for ids, _ in pairs], [t for _, t in pairs]
    pad = tokenizer.pad_token_id
    states: list[torch.Tensor | None] = [None] * len(prompts)
    pooled: list[torch.Tensor | None] = [None] * len(prompts)
    logits: list[torch.Tensor | None] = [None] * len(prompts)
    logprobs: list[torch.Tensor | None] = [None] * len(prompts)

    def finish(batch: list[int], h: torch.Tensor, pool: torch.Tensor | None) -> None:
        if label_ids is not None:
            with torch.no_grad():
                full = lm_head_logits(model, h[:, -1]).float()
            lab = full[:, label_ids.to(device)]
            lp = lab - torch.logsumexp(full, dim=-1, keepdim=True)
        for row, i in enumerate(batch):
            states[i] = h[row].float().cpu()
            if pool is not None:
                pooled[i] = pool[row].float().cpu()
            if label_ids is not None:
                logits[i] = lab[row].cpu()
                logprobs[i] = lp[row].cpu()

    groups: dict[str | None, list[int]] = {}
    for i in range(len(prompts)):
        key = None if (prefixes is None or reference) else prefixes[i]
        groups.setdefault(key, []).append(i)
    for key, members in groups.items():
        if key is not None and len(members) > 1:
            p = common_prefix_length([encoded[i] for i in members])
        else:
            p = 0
        if starts is not None:
            p = min([p] + [starts[i] for i in members])
        cache = shared = None
        if p > 0 and variants is None:
            cache = prefix_cache(model, encoded[members[0]][:p])
        elif p > 0 and variants is not None:
            first: dict[int, int] = {}  # variant → its first prompt, which routes its prefix row
            for i in members:
                first.setdefault(variants[i], i)
            if before_batch is not None:
                before_batch(list(first.values()))
            with torch.no_grad():
                shared = SharedPrefix(
                    model,
                    torch.tensor([encoded[members[0]][:p]], device=device),
                    torch.tensor(list(first)),
                    train=False,
                )
        for part in length_batches([len(encoded[i]) for i in members], batch_size):
            batch = [members[j] for j in part]
            if before_batch is not None:
                before_batch(batch)
            ids, mask = pad_right([encoded[i][p:] for i in batch], pad)
            ids, mask = ids.to(device), mask.to(device)
            weights = None
            if starts is not None:
                weights = _span_weights([starts[i] - p for i in batch], mask).to(device)
            if reference:
                out = reference_last_states(model, ids, mask, weights)
            elif cache is None and shared is None:
                out = forward_last_states(model, ids, mask, weights=weights)
            else:
                if shared is None:
                    kv = expand_cache(cache, len(batch))
                else:
                    assert variants is not None  # a shared prefix is built only for variants
                    kv = shared.for_rows(torch.tensor([variants[i] for i in batch], device=device))
                out = forward_last_states(
                    model,
                    ids,
                    with_prefix_mask(mask, p),
                    index=mask.sum(dim=1) - 1,
                    cache=kv,
                    weights=weights,
                )
            h, pool = out if isinstance(out, tuple) else (out, None)
            finish(batch, h, pool)
    return Capture(
        states=torch.stack(filled(states)),
        pooled=torch.stack(filled(pooled)) if starts is not None else None,
        label_logits=torch.stack(filled(logits)) if label_ids is not None else None,
        label_logprobs=torch.stack(filled(logprobs)) if label_ids is not None else None,
    )


def encode_with_span(tokenizer: PreTrainedTokenizerBase, prompt: str, char: int) -> tuple[list[int], int]:
    """The prompt's token ids, and the index of its first token that ends after character
    ``char`` (the first token of a span starting there); special tokens (BOS) never count.
    One tokenisation with the fast tokenizer's offsets; a slow tokenizer uses the length of
    the tokenised text before ``char``."""
    if not 0 <= char < len(prompt):
        raise ValueError(f"span start {char} outside the prompt ({len(prompt)} characters)")
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(prompt, return_offsets_mapping=True, return_special_tokens_mask=True)
        ids = enc["input_ids"]
        for t, ((_, end), special) in enumerate(zip(enc["offset_mapping"], enc["special_tokens_mask"], strict=True)):
            if not special and end > char:
                return ids, t
        return ids, len(ids) - 1
    ids = tokenizer(prompt)["input_ids"]
    before = len(tokenizer(prompt[:char])["input_ids"]) if char else len(tokenizer("")["input_ids"])
    return ids, min(before, len(ids) - 1)


def span_start_token(tokenizer: PreTrainedTokenizerBase, prompt: str, char: int) -> int:
    """Index of the first token of ``prompt`` that ends after character ``char``
    (see :func:`encode_with_span`)."""
    return encode_with_span(tokenizer, prompt, char)[1]


def _span_weights(starts: Sequence[int], mask: torch.Tensor) -> torch.Tensor:
    """[b, s] weights averaging positions ``starts[row]`` .. last real token of each row."""
    pos = torch.arange(mask.shape[1]).unsqueeze(0)
    inside = (pos >= torch.tensor(starts).unsqueeze(1)) & mask.cpu().bool()
    w = inside.to(torch.float32)
    return w / w.sum(dim=1, keepdim=True).clamp(min=1.0)


@torch.no_grad()
def greedy_continuations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 48,
    stop: str = "\n",
    batch_size: int = 16,
    before_batch: Callable[[list[int]], None] | None = None,
) -> list[str]:
    """Greedy continuation of each prompt, cut at the first ``stop`` string.

    A row stops generating once its continuation contains ``stop`` (transformers'
    ``stop_strings``), and a batch once every row has: the text before the first ``stop`` is
    what generating all ``max_new_tokens`` and cutting would give (greedy rows are
    independent), for a fraction of the decoding steps where answers are short."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = [""] * len(prompts)
    try:
        encoded = [len(tokenizer(p)["input_ids"]) for p in prompts]
        for batch in length_batches(encoded, batch_size):
            if before_batch is not None:
                before_batch(batch)
            enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True).to(device)
            gen = cast(GenerationMixin, model).generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                **({"stop_strings": [stop], "tokenizer": tokenizer} if stop else {}),
            )
            for row, i in enumerate(batch):
                text = tokenizer.decode(gen[row, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                assert isinstance(text, str)  # one sequence decodes to one string
                out[i] = text.split(stop)[0].strip() if stop else text.strip()
    finally:
        tokenizer.padding_side = side
    return out
