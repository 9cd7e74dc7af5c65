"""Causal tests at the query's last prompt token: activation patching and steering, per layer.

For a prompt, the residual state of its last token at *state index* ℓ is either replaced by a
given vector (patching: e.g. the query's ICL state put into the anchor run) or has a vector
added (steering with a task vector); then the output at that token is read, over the label
tokens only.

The state index is the one of :func:`iclit.engine.capture.capture` (transformers'
``output_hidden_states`` convention), so a captured ``states[:, ℓ]`` can be put back at ℓ:

* ℓ = 0: the input of block 0, exactly what that block reads (a forward pre-hook on it):
  token embeddings as the model builds them — Gemma's ``√d``-scaled embeddings, GPT-2's
  token + position embeddings, …;
* 1 ≤ ℓ ≤ L−1: the output of block ℓ−1;
* ℓ = L (= ``n_states(model) − 1``): the decoder's output *after the final norm*, what the LM
  head reads (transformers replaces the last block's output by it in ``hidden_states``; the
  last block's pre-norm output has no index). Replacing it by another run's last state gives
  that run's label logits exactly.

Changing the last token's state changes nothing at earlier positions (causal attention), so
the fast path (default) runs each prompt's tokens but the last once, keeps that prefix's
key/value cache, and runs only the last token for all the prompt's interventions together:
one row per intervention, each on a view of the same prefix cache (:func:`expand_cache`:
a forward appends into new tensors, the prefix's are never written), positions continuing
from the prefix length. Every row goes through every block; a hook at state ℓ edits only the
rows whose intervention targets ℓ, and the LM head is computed for the label rows only. A
prefix runs alone (batch 1, never padded), so no padding, position or sliding-window
question arises there; several prompts' rows are never mixed in one forward on this path.

``reference=True`` is the straightforward path, for checking: each (prompt, intervention) row
is a full forward of the whole prompt (rows of different prompts right-padded together, the
last token's position from the attention mask), with forward hooks on block 0's input,
block ℓ−1's output, or the final norm's output editing the last real token's row only.

Prompts that share a long prefix (an ICL prompt's demonstrations) can share its cache on the
fast path: ``prefixes`` groups them (as :func:`iclit.engine.capture.capture` does); the
group's longest common *token* prefix (of the whole prompts' tokenisations, so no boundary
question) runs once, each prompt's own tokens but the last run on a view of it, then its
runs as above.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from iclit.core.batching import (
    common_prefix_length,
    expand_cache,
    length_batches,
    pad_right,
    prefix_cache,
    returned_cache,
    run_decoder,
)
from iclit.models.arch import decoder_of, final_norm_of, layers_of, lm_head_logits, n_states


@dataclass(frozen=True, eq=False)
class Intervention:
    """One edit of the last prompt token's state (compared by identity: it holds a tensor).

    layer: the state index ℓ in 0..L (L = ``n_states(model) − 1``, see the module's doc);
    vector: [d] the replacement (``"replace"``) or the addition (``"add"``), any dtype/device;
    scale: multiplies the vector when adding; a replacement takes the vector as it is, so its
    scale must be 1.0.
    """

    layer: int
    vector: torch.Tensor
    mode: Literal["replace", "add"]
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in ("replace", "add"):
            raise ValueError(f"intervention mode {self.mode!r}: 'replace' or 'add'")
        if self.mode == "replace" and self.scale != 1.0:
            raise ValueError(f"a replacement takes its vector as it is: scale must be 1.0, not {self.scale}")
        if not isinstance(self.vector, torch.Tensor) or self.vector.dim() != 1:
            raise ValueError("an intervention's vector is one [d] tensor")

    def values(self) -> torch.Tensor:
        """[d] float32: what is written (replace) or added (add, already scaled)."""
        v = self.vector.detach().float()
        return v if self.mode == "replace" else v * self.scale


def layerwise(
    vectors: torch.Tensor,
    mode: Literal["replace", "add"] = "replace",
    scale: float = 1.0,
    layers: Sequence[int] | None = None,
) -> list[Intervention]:
    """One intervention per state index: ``vectors`` [L+1, d] (e.g. one run's captured
    states), ``vectors[ℓ]`` at ℓ for each ℓ of ``layers`` (default: all)."""
    picked = range(vectors.shape[0]) if layers is None else layers
    return [Intervention(int(li), vectors[li], mode, scale) for li in picked]


# --- the edits and their hooks ------------------------------------------------------------

Edit = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""(rows [k], positions [k], values [k, d] float32, add [k] bool) of one state index."""


def _edits(runs: Sequence[Intervention | None], positions: torch.Tensor, device: torch.device) -> dict[int, Edit]:
    """The batch's edits grouped by state index: row r (intervention ``runs[r]``) at sequence
    position ``positions[r]``; rows without an intervention are left alone."""
    by_layer: dict[int, list[tuple[int, Intervention]]] = {}
    for r, run in enumerate(runs):
        if run is not None:
            by_layer.setdefault(run.layer, []).append((r, run))
    out: dict[int, Edit] = {}
    for layer, picked in by_layer.items():
        idx = torch.tensor([r for r, _ in picked], dtype=torch.long, device=device)
        vals = torch.stack([run.values() for _, run in picked]).to(device)
        add = torch.tensor([run.mode == "add" for _, run in picked], device=device)
        out[layer] = (idx, positions.to(device)[idx], vals, add)
    return out


def _apply(h: torch.Tensor, edit: Edit) -> torch.Tensor:
    """A copy of ``h`` [b, s, d] (or [b, d] with positions ignored) with the edit's rows
    replaced or added to (in float32, then back to ``h``'s dtype)."""
    rows, pos, vals, add = edit
    h = h.clone()
    if h.dim() == 2:
        cur = h[rows].float()
        h[rows] = torch.where(add[:, None], cur + vals, vals).to(h.dtype)
    else:
        cur = h[rows, pos].float()
        h[rows, pos] = torch.where(add[:, None], cur + vals, vals).to(h.dtype)
    return h


def _replace_output(output, edit: Edit):
    if isinstance(output, torch.Tensor):
        return _apply(output, edit)
    if isinstance(output, tuple):
        return (_apply(output[0], edit), *output[1:])
    output[0] = _apply(output[0], edit)  # a ModelOutput
    return output


@contextmanager
def _hooks(model: nn.Module, edits: dict[int, Edit], *, final_norm: bool) -> Iterator[None]:
    """Hooks applying ``edits`` at their state indices: block 0's input (ℓ = 0), block ℓ−1's
    output (1 ≤ ℓ < L), and with ``final_norm`` the final norm's output (ℓ = L; the fast path
    edits the decoder's output itself instead). Only the state indices edited get a hook."""
    layers = layers_of(model)
    handles = []

    def pre_hook(_m, args, kwargs):
        if args:
            return (_apply(args[0], edits[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": _apply(kwargs["hidden_states"], edits[0])}

    def post_hook(edit: Edit):
        return lambda _m, _args, output: _replace_output(output, edit)

    try:
        for layer, edit in edits.items():
            if layer == 0:
                handles.append(layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
            elif layer < len(layers):
                handles.append(layers[layer - 1].register_forward_hook(post_hook(edit)))
            elif final_norm:
                handles.append(final_norm_of(model).register_forward_hook(post_hook(edit)))
        yield
    finally:
        for h in handles:
            h.remove()


# --- reading the output -------------------------------------------------------------------


def _read(model: nn.Module, h: torch.Tensor, label_ids: torch.Tensor | None, logprobs: bool) -> torch.Tensor:
    """[b, d] final states → [b, n_labels] label logits (log-probabilities under the full
    vocabulary with ``logprobs``), or [b, 1] the top-1 token id (``label_ids`` None)."""
    if label_ids is not None and not logprobs:
        return lm_head_logits(model, h, label_ids.to(h.device)).float()
    full = lm_head_logits(model, h).float()
    if label_ids is None:
        return full.argmax(dim=-1, keepdim=True).float()
    return full[:, label_ids.to(h.device)] - torch.logsumexp(full, dim=-1, keepdim=True)


def _check(
    model: nn.Module,
    prompts: Sequence[str],
    interventions: Sequence[Sequence[Intervention | None]],
    label_ids: torch.Tensor | None,
    logprobs: bool,
) -> None:
    if len(interventions) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(interventions)} lists of interventions")
    if label_ids is None and logprobs:
        raise ValueError("logprobs=True reads the log-probabilities of label_ids: give label_ids")
    if label_ids is not None and label_ids.dim() != 1:
        raise ValueError(f"label_ids is one [n_labels] tensor, not of shape {tuple(label_ids.shape)}")
    last = n_states(model) - 1
    d = getattr(getattr(decoder_of(model), "config", None), "hidden_size", None)
    for runs in interventions:
        for run in runs:
            if run is None:
                continue
            if not 0 <= run.layer <= last:
                raise ValueError(f"state index {run.layer} outside 0..{last} (L = {last})")
            if d is not None and run.vector.shape[0] != d:
                raise ValueError(f"intervention vector of size {run.vector.shape[0]}, the model's states have {d}")


# --- the two paths ------------------------------------------------------------------------


@torch.no_grad()
def intervene(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    interventions: Sequence[Sequence[Intervention | None]],
    *,
    label_ids: torch.Tensor | None,
    batch_size: int = 16,
    before_batch: Callable[[list[int]], None] | None = None,
    reference: bool = False,
    logprobs: bool = False,
    prefixes: Sequence[str | None] | None = None,
) -> torch.Tensor:
    """The output at each prompt's last token under each of its interventions.

    interventions[i]: prompt i's runs, one output row each: an :class:`Intervention`, or
    None for the run without one; an empty list counts as ``[None]``.

    label_ids: [n_labels] token ids (e.g. each label's first token) → their logits, or with
    ``logprobs=True`` their log-probabilities under the full vocabulary (one full-vocabulary
    head row per run, for the normaliser: for generation tasks, pass the first tokens of the
    answers of interest). ``label_ids=None`` → the top-1 next-token id over the full
    vocabulary, as a float in a last dimension of size 1.

    Returns [n_prompts, max_j, n_labels] float32 on the CPU, where max_j is the longest list
    of runs; a prompt's missing runs are NaN.

    batch_size: rows per forward (fast path: one prompt's runs, chunked; reference: runs of
    any prompts, padded together).

    before_batch(rows): called before every forward pass with the prompt index of each of
    its rows, in row order (for routing each row to its own adapter, e.g.
    ``lambda rows: router.set(rows, device)`` of :mod:`iclit.tuning.batched`). On the fast
    path that is ``[i]`` before prompt i's prefix, then ``[i] * k`` before its k runs at the
    last token; on the reference path the runs' prompt indices.

    reference: the straightforward path (a full forward per run), for checking.

    prefixes: per prompt a group key (e.g. its demonstrations' text) or None. On the fast
    path, prompts with the same key share the key/value cache of their longest common token
    prefix, run once (``before_batch`` is called with the group's first prompt index before
    it): they must run through the same model variant (adapter). Ignored by ``reference``.
    """
    _check(model, prompts, interventions, label_ids, logprobs)
    if prefixes is not None and len(prefixes) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(prefixes)} prefixes")
    runs = [list(r) if len(r) else [None] for r in interventions]
    width = 1 if label_ids is None else len(label_ids)
    out = torch.full((len(prompts), max((len(r) for r in runs), default=1), width), math.nan)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    empty = next((i for i, ids in enumerate(encoded) if not ids), None)
    if empty is not None:
        raise ValueError(f"prompt {empty} ({prompts[empty]!r}) tokenises to nothing: no last token to intervene on")
    if reference:
        _reference(model, encoded, runs, out, tokenizer.pad_token_id, label_ids, batch_size, before_batch, logprobs)
    else:
        _fast(model, encoded, runs, out, label_ids, batch_size, before_batch, logprobs, prefixes)
    return out


def _shared_prefixes(model, encoded, prefixes, before_batch) -> dict[int, tuple[int, object]]:
    """prompt index → (p0, cache of its group's common token prefix of p0 tokens), for the
    prompts of groups of two or more (p0 at most each member's length − 1: its last token
    always runs alone)."""
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(prefixes or ()):
        if key is not None:
            groups.setdefault(key, []).append(i)
    shared: dict[int, tuple[int, object]] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        p0 = min(common_prefix_length([encoded[i] for i in members]), min(len(encoded[i]) for i in members) - 1)
        if p0 <= 0:
            continue
        if before_batch is not None:
            before_batch([members[0]])
        cache = prefix_cache(model, encoded[members[0]][:p0])
        shared.update({i: (p0, cache) for i in members})
    return shared


def _prompt_cache(model, ids: Sequence[int], shared: tuple[int, object] | None):
    """The cache of ``ids`` but the last token: from scratch, or the rest run on a view of
    the group's shared prefix cache (whose tensors stay as they are)."""
    p = len(ids) - 1
    if shared is None:
        return prefix_cache(model, ids[:p])
    p0, cache = shared
    if p0 == p:
        return cache
    device = next(model.parameters()).device
    rest = torch.tensor([list(ids[p0:p])], dtype=torch.long, device=device)
    out = run_decoder(
        model,
        input_ids=rest,
        attention_mask=torch.ones((1, p), dtype=torch.long, device=device),
        use_cache=True,
        cache=expand_cache(cache, 1),
    )
    return returned_cache(out)


def _fast(model, encoded, runs, out, label_ids, batch_size, before_batch, logprobs, prefixes=None) -> None:
    device = next(model.parameters()).device
    last_state = n_states(model) - 1
    shared = _shared_prefixes(model, encoded, prefixes, before_batch)
    for i, ids in enumerate(encoded):
        p = len(ids) - 1
        cache = None
        if p > 0:
            if before_batch is not None:
                before_batch([i])
            cache = _prompt_cache(model, ids, shared.get(i))
        for start in range(0, len(runs[i]), batch_size):
            chunk = runs[i][start : start + batch_size]
            k = len(chunk)
            if before_batch is not None:
                before_batch([i] * k)
            x = torch.full((k, 1), ids[-1], dtype=torch.long, device=device)
            mask = torch.ones((k, p + 1), dtype=torch.long, device=device)
            edits = _edits(chunk, torch.zeros(k, dtype=torch.long), device)
            with _hooks(model, edits, final_norm=False):
                dec = run_decoder(
                    model,
                    input_ids=x,
                    attention_mask=mask,
                    use_cache=cache is not None,
                    cache=expand_cache(cache, k) if cache is not None else None,
                )
            h = dec.last_hidden_state[:, -1]
            if last_state in edits:
                h = _apply(h, edits[last_state])
            out[i, start : start + k] = _read(model, h, label_ids, logprobs).cpu()


def _reference(model, encoded, runs, out, pad, label_ids, batch_size, before_batch, logprobs) -> None:
    device = next(model.parameters()).device
    flat = [(i, j) for i, r in enumerate(runs) for j in range(len(r))]
    for batch in length_batches([len(encoded[i]) for i, _ in flat], batch_size):
        rows = [flat[b] for b in batch]
        if before_batch is not None:
            before_batch([i for i, _ in rows])
        ids, mask = pad_right([encoded[i] for i, _ in rows], pad)
        ids, mask = ids.to(device), mask.to(device)
        index = mask.sum(dim=1) - 1
        edits = _edits([runs[i][j] for i, j in rows], index, device)
        with _hooks(model, edits, final_norm=True):
            dec = decoder_of(model)(input_ids=ids, attention_mask=mask, use_cache=False)
        h = dec.last_hidden_state[torch.arange(len(rows), device=device), index]
        got = _read(model, h, label_ids, logprobs).cpu()
        for r, (i, j) in enumerate(rows):
            out[i, j] = got[r]


# --- helpers for the analyses -------------------------------------------------------------


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P‖Q) over the last dimension, P and Q the softmax of the given logits; float64.

    [..., n] × [..., n] (broadcast) → [...]. A row with a NaN in either (e.g. the padding of
    :func:`intervene`'s output) gives NaN; a category with P = 0 adds nothing (also where Q =
    0 there); one with P > 0 and Q = 0 gives +inf.
    """
    lp = torch.log_softmax(p_logits.double(), dim=-1)
    lq = torch.log_softmax(q_logits.double(), dim=-1)
    lp, lq = torch.broadcast_tensors(lp, lq)
    prob = lp.exp()
    terms = torch.where(prob > 0, prob * (lp - lq), torch.zeros((), dtype=torch.float64, device=lp.device))
    kl = terms.sum(dim=-1).clamp(min=0.0)
    bad = torch.isnan(lp).any(dim=-1) | torch.isnan(lq).any(dim=-1)
    return kl.masked_fill(bad, math.nan)


def random_directions(norms: torch.Tensor, d: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[n] norms → [n, d] directions drawn uniformly on the sphere (normalised Gaussians),
    scaled to those norms: the null of a steering vector (same size, random direction).
    float32 (or the norms' floating dtype), on the norms' device; ``generator`` must live on
    that device."""
    dtype = norms.dtype if norms.is_floating_point() else torch.float32
    g = torch.randn(norms.shape[0], d, generator=generator, dtype=torch.float64, device=norms.device)
    g = g / g.norm(dim=1, keepdim=True)
    return (g * norms.double()[:, None]).to(dtype)
