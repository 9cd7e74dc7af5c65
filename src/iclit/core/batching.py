"""Batching shared by capture and tuning: length bucketing, right-padding, and the key/value
cache of a token prefix reused across batches.

A forward pass appends to the cache it is given (transformers' ``DynamicCache`` concatenates
into new tensors per layer), so a reused prefix cache is never handed to the model itself:
each batch gets a shallow copy whose per-layer key/value tensors are views of, or rows
selected from, the prefix's (:func:`expand_cache`, :meth:`SharedPrefix.for_rows`). Sequences
are right-padded, so positions of the tokens after the prefix continue from the prefix
length (transformers counts them from the cache's length) and trailing pads never change a
real token's state under a causal mask.

The prefix cache goes to the decoder as ``cache=`` (transformers' current name; it was
``past_key_values``, deprecated for removal in 5.40) and is read back from the output's
``cache``: :func:`run_decoder`, :func:`returned_cache`.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any, TypeVar

import torch
from torch import nn

from iclit.models.arch import decoder_of

# --- length bucketing -------------------------------------------------------------------


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of ``batch_size`` items of similar length (longest
    first), to limit padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def micro_batches(lengths: Sequence[int], max_tokens: int, sizes: Sequence[int] | None = None) -> list[list[int]]:
    """Split items into micro-batches of similar length whose padded size (rows × longest)
    stays within ``max_tokens`` (at least one item each): bounded memory, little padding.
    An item is one row, or ``sizes[i]`` rows of at most ``lengths[i]`` tokens."""
    sizes = sizes or [1] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    rows = 0
    for i in order:
        if batches and (rows + sizes[i]) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
            rows += sizes[i]
        else:
            batches.append([i])
            rows = sizes[i]
    return batches


def padded_groups(lengths: Sequence[int], max_tokens: int, call_tokens: int = 32) -> list[list[list[int]]]:
    """Items (one row of ``lengths[i]`` tokens each) split into groups of at most ``max_tokens``
    padded tokens (at least one item each), each group into sub-batches of similar length.

    The sub-batches (runs of the length-sorted items) are chosen to minimise padded tokens plus
    ``call_tokens`` per sub-batch (the cost of one more, smaller forward, in tokens), and are
    packed in order into groups. A group's sub-batches run as separate forwards whose outputs
    are taken together (one loss, one backward), so memory stays bounded by ``max_tokens`` while
    far less compute goes to padding than with one padded batch per group (:func:`micro_batches`).

    Examples
    --------
    Two long and two short items: one padded batch would be 4 × 30 tokens; two sub-batches
    are 2 × 30 + 2 × 5, one group within 128 tokens:

    >>> padded_groups([30, 5, 29, 4], max_tokens=128, call_tokens=8)
    [[[0, 2], [1, 3]]]
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    width = [lengths[i] for i in order]
    n = len(order)
    best: list[float] = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):  # best[j]: cheapest split of the j longest items; width[i] longest of i..j-1
        for i in range(j - 1, -1, -1):
            if j - i > 1 and (j - i) * width[i] > max_tokens:
                break
            cost = best[i] + (j - i) * width[i] + call_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    subs: list[list[int]] = []
    j = n
    while j > 0:
        subs.append(order[cut[j] : j])
        j = cut[j]
    groups: list[list[list[int]]] = []
    used = 0
    for sub in reversed(subs):
        size = len(sub) * lengths[sub[0]]
        if groups and used + size <= max_tokens:
            groups[-1].append(sub)
            used += size
        else:
            groups.append([sub])
            used = size
    return groups


# --- right-padding ----------------------------------------------------------------------


def pad_right(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences → (input_ids, attention_mask), both [b, longest] long, padded on the
    right with ``pad`` (mask 0 there)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def with_prefix_mask(mask: torch.Tensor, prefix: int) -> torch.Tensor:
    """The attention mask [b, prefix + s] of right-padded rows [b, s] that continue a cached
    prefix of ``prefix`` real tokens."""
    ones = torch.ones(mask.shape[0], prefix, dtype=mask.dtype, device=mask.device)
    return torch.cat([ones, mask], dim=1)


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common token prefix, leaving at least one token to each sequence.

    The prefix is cut where the *tokenised full prompts* agree, so a tokenizer that merges
    across the text boundary between demonstrations and query can never make the cached and
    the uncached inputs differ.
    """
    first = seqs[0]
    n = min(len(s) for s in seqs) - 1
    for i in range(max(n, 0)):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return max(n, 0)


# --- the decoder with a cache (transformers' current API) -------------------------------


@cache
def _cache_argument(forward: Callable[..., Any]) -> str:
    """The keyword a decoder class's ``forward`` takes its cache under: ``cache`` (current
    transformers), else the older ``past_key_values`` (earlier 5.x releases)."""
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def run_decoder(model: nn.Module, *, cache=None, **inputs):
    """``decoder_of(model)(**inputs)``, with ``cache`` (a prefix's key/value cache, already
    copied for this batch) passed under the keyword this transformers version takes."""
    decoder = decoder_of(model)
    if cache is not None:
        inputs[_cache_argument(type(decoder).forward)] = cache
    return decoder(**inputs)


def returned_cache(out):
    """The key/value cache of a decoder output run with ``use_cache=True``."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def cache_tensors(cache) -> list[torch.Tensor]:
    """Every layer's keys and values, in order: [k0, v0, k1, v1, ...]."""
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def cache_with(cache, tensors: Sequence[torch.Tensor]):
    """A shallow copy of ``cache`` (and of its layers) holding ``tensors`` (as laid out by
    :func:`cache_tensors`) instead of its own: a forward pass on the copy concatenates into
    new tensors and leaves ``cache`` as it was."""
    fresh = copy.copy(cache)
    fresh.layers = [copy.copy(layer) for layer in cache.layers]
    for j, layer in enumerate(fresh.layers):
        layer.keys, layer.values = tensors[2 * j], tensors[2 * j + 1]
    return fresh


@torch.no_grad()
def prefix_cache(model: nn.Module, prefix_ids: Sequence[int]):
    """The key/value cache of one token prefix (batch 1)."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=device)
    return returned_cache(run_decoder(model, input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True))


def expand_cache(cache, batch: int):
    """A cache that starts from the batch-1 prefix cache, broadcast to ``batch`` rows.

    The cache object and its layers are shallow-copied and their key/value tensors expanded
    (views, no copy); appending concatenates into new tensors, so the prefix tensors are
    never written. Caches without per-layer tensors are deep-copied.
    """
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(layer, "keys") for layer in layers):
        fresh = copy.deepcopy(cache)
        fresh.batch_repeat_interleave(batch)
        return fresh
    fresh = copy.copy(cache)
    fresh.layers = [copy.copy(layer) for layer in layers]
    for layer in fresh.layers:
        if isinstance(layer.keys, torch.Tensor) and layer.keys.numel():
            layer.keys = layer.keys.expand(batch, *layer.keys.shape[1:])
            layer.values = layer.values.expand(batch, *layer.values.shape[1:])
    return fresh


class SharedPrefix:
    """The key/value cache of a token prefix that every sequence of a batch starts with, run
    once per variant of the model (one per adapter) and reused, with gradients, by any number
    of micro-batches.

    The prefix runs as one batch [a, prefix] (row i as variant ``variants[i]``; ``route`` is
    called with ``variants`` first, e.g. to point each row at its adapter). Its key/value
    tensors are handed to the micro-batches as detached leaves (:meth:`for_rows`); their
    gradients accumulate on the leaves and :meth:`backward` sends them through the prefix
    computation once. A row's prefix states depend only on its variant, so this is the same
    computation as running every sequence whole, with the prefix's gradient summed over the
    rows that share it.
    """

    def __init__(
        self,
        model: nn.Module,
        prefix_ids: torch.Tensor,
        variants: torch.Tensor,
        train: bool,
        route: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        self.length = prefix_ids.shape[1]
        self.slot = {int(v): i for i, v in enumerate(variants.tolist())}
        ids = prefix_ids.expand(len(variants), -1)
        if route is not None:
            route(variants)
        self.cache = returned_cache(
            run_decoder(model, input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        )
        self.graph = cache_tensors(self.cache)
        self.leaves = [t.detach().requires_grad_(train and t.requires_grad) for t in self.graph]

    def for_rows(self, row_variant: torch.Tensor):
        """A cache for a micro-batch: row r gets the prefix of variant ``row_variant[r]``
        (rows selected from the leaves: new tensors, the leaves are never written)."""
        index = torch.tensor([self.slot[int(v)] for v in row_variant.tolist()], device=row_variant.device)
        return cache_with(self.cache, [leaf[index] for leaf in self.leaves])

    def backward(self) -> None:
        """Send the gradients gathered on the leaves back through the prefix computation."""
        pairs = [(t, leaf.grad) for t, leaf in zip(self.graph, self.leaves, strict=True) if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], grad_tensors=[g for _, g in pairs])


_T = TypeVar("_T")


def filled(items: Sequence[_T | None]) -> list[_T]:
    """``items``, every one of them set: the rows of a list filled position by position
    (batch by batch) once all batches are done; RuntimeError naming the first one missing.

    Examples
    --------
    >>> filled([1, 2])
    [1, 2]
    >>> filled([1, None])
    Traceback (most recent call last):
    ...
    RuntimeError: row 1 of 2 was never computed
    """
    missing = next((i for i, x in enumerate(items) if x is None), None)
    if missing is not None:
        raise RuntimeError(f"row {missing} of {len(items)} was never computed")
    return [x for x in items if x is not None]
