"""Item permutations that a cell's design makes exchangeable, and permuted Frobenius inner
products under given permutations (the machinery of the restricted CKA / RSA nulls of
:mod:`iclit.analysis.stats.representation`).

A cell's items (trials) are (query, set) pairs: the sets of one query block read the same
queries, and queries of one gold label resemble each other. A permutation null of a statistic
over all items must keep what both arms share by construction, so it may only exchange what
the design makes exchangeable (:func:`design_permutations`).
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from iclit.analysis.nulls import Units

__all__ = ["SWAPS", "design_permutations"]

SWAPS = ("queries", "sets")
"""What :func:`design_permutations` exchanges: a block's queries, or a block's sets."""


def design_permutations(
    units: Units, n_perm: int, seed: int = 0, *, swap: str = "queries", exact: bool = True
) -> np.ndarray:
    """Item permutations a cell's design makes exchangeable: ``[P, n]`` int64 (P = n_perm, or
    every arrangement but the observed one when they are fewer).

    Parameters
    ----------
    units
        Where each of the cell's n items (trials, in state order) sits in the design
        (:class:`iclit.analysis.nulls.Units`).
    n_perm
        Number of permutations drawn.
    seed
        Seed of the generator.
    swap
        ``queries`` (the query null, below) or ``sets``: within one (seed, query block), the
        block's sets are permuted, one permutation for every query of the block (the item
        (set s, query q) takes the item (pi(s), q)): the demonstration null, which keeps
        every query's match with itself and breaks only what is specific to the set.
    exact
        When the design allows at most ``n_perm`` arrangements besides the observed one,
        return each of them once instead of random draws: the permutation p
        (1 + hits) / (1 + P) is then the exact p.

    Returns
    -------
    numpy.ndarray
        ``perms[k, i]``: the item whose second-arm state takes item i's place in draw k
        (the rows and columns of its Gram move together). ``swap="queries"``: within each
        (seed, query block, gold label), the block's distinct queries are permuted, one
        permutation applied to every set of the block: the item (set s, query q) takes the item (set s, pi(q)). Only
        queries read under the same sets of the block are exchanged (a query missing from a
        set stays in place), so every (block, label) group and every query's rows stay
        together. A block of a single item (one query per set, one set per block) shares
        nothing with the others: such items are permuted within their (seed, gold label).
        Items in no group of two are never moved; where no item can move
        the exact enumeration is empty (``[0, n]``; with ``exact=False`` every row is the
        identity), and the tests give a NaN null.

    Raises
    ------
    ValueError
        If one (seed, set, query) appears twice, or one query of a block has two gold labels.
    """
    n = len(units)
    seen: set[tuple[Any, Any, Any]] = set()
    queries: dict[tuple[Any, Any, Any], list[tuple[Any, int]]] = {}
    labels: dict[tuple[Any, Any, Any], Any] = {}
    for i, (sd, st, bl, q, lab) in enumerate(
        zip(units.seed, units.set, units.block, units.query, units.label, strict=True)
    ):
        if (sd, st, q) in seen:
            raise ValueError(f"query {q!r} appears twice in set {st} of seed {sd}: the design's items must be unique")
        seen.add((sd, st, q))
        key = (sd, bl, q)
        if key in labels and labels[key] != lab:
            raise ValueError(f"query {q!r} of block {bl} (seed {sd}) has two gold labels: {labels[key]!r}, {lab!r}")
        labels[key] = lab
        queries.setdefault(key, []).append((st, i))
    if swap not in SWAPS:
        raise ValueError(f"swap must be one of {', '.join(SWAPS)}, not {swap!r}")
    groups = _query_groups(queries, labels) if swap == "queries" else _set_groups(queries)
    moving = [np.asarray(cols, dtype=np.int64).T for cols in groups.values() if len(cols) >= 2]  # [fixed, moved]
    sizes = [rows.shape[1] for rows in moving]
    if exact and math.prod(math.factorial(g) for g in sizes) - 1 <= n_perm:
        orders = [list(itertools.permutations(range(g))) for g in sizes]
        sigmas = (
            [np.asarray(o, dtype=np.int64) for o in zip(*itertools.product(*orders), strict=True)] if orders else []
        )
        perms = np.tile(np.arange(n, dtype=np.int64), (len(sigmas[0]) if sigmas else 1, 1))
        for rows, sigma in zip(moving, sigmas, strict=True):
            perms[:, rows] = np.transpose(rows[:, sigma], (1, 0, 2))
        return perms[1:]  # every arrangement but the identity (itertools gives it first)
    perms = np.tile(np.arange(n, dtype=np.int64), (n_perm, 1))
    rng = np.random.default_rng(seed)
    for rows in moving:
        sigma = np.argsort(rng.random((n_perm, rows.shape[1])), axis=1)
        perms[:, rows] = np.transpose(rows[:, sigma], (1, 0, 2))
    return perms


def _query_groups(
    queries: dict[tuple[Any, Any, Any], list[tuple[Any, int]]], labels: dict[tuple[Any, Any, Any], Any]
) -> dict[tuple[Any, ...], list[list[int]]]:
    """Exchangeable queries: per (seed, block, label, sets read), one column of rows per query
    (a block of one item joins the single items of its seed and label)."""
    size: dict[tuple[Any, Any], int] = {}
    for (sd, bl, _), members in queries.items():
        size[sd, bl] = size.get((sd, bl), 0) + len(members)
    groups: dict[tuple[Any, ...], list[list[int]]] = {}
    for (sd, bl, q), members in queries.items():
        members = sorted(members, key=lambda m: m[0])
        sets = tuple(m[0] for m in members)
        key = (sd, None, labels[sd, bl, q], ()) if size[sd, bl] == 1 else (sd, bl, labels[sd, bl, q], sets)
        groups.setdefault(key, []).append([m[1] for m in members])
    return groups


def _set_groups(queries: dict[tuple[Any, Any, Any], list[tuple[Any, int]]]) -> dict[tuple[Any, ...], list[list[int]]]:
    """Exchangeable sets: per (seed, block, queries read), one column of rows per set."""
    by_set: dict[tuple[Any, Any, Any], list[tuple[Any, int]]] = {}
    for (sd, bl, q), members in queries.items():
        for st, i in members:
            by_set.setdefault((sd, bl, st), []).append((str(q), i))
    groups: dict[tuple[Any, ...], list[list[int]]] = {}
    for (sd, bl, _), members in by_set.items():
        members = sorted(members)
        groups.setdefault((sd, bl, tuple(m[0] for m in members)), []).append([m[1] for m in members])
    return groups
