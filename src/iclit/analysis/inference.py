"""Inference for the crossed design: pairing permutation tests, hierarchical bootstrap,
max-T, Holm/BH, equivalence (TOST); debiased CKA and RSA are in :mod:`iclit.analysis.geometry`.

Design. A cell has S demonstration sets with Q queries each; a *unit* is one (query, set).
Both nulls have one shape: a *stratum* is a square ``C[m, m, L]`` with ``C[a, b, l]`` the
layer-l similarity of item a's first arm (ICL) with item b's second arm (IT). The diagonal
is the matched pairing, the off-diagonal the eligible swapped partners: query-swap strata
are the queries of one set and gold label, demo-swap strata the sets one query was read
under. A *group* is the bootstrap / TOST cluster (a demonstration set); units nest in it.

References. Holm (1979); Benjamini & Hochberg (1995); the two-stage (cluster, then unit)
bootstrap of Davison & Hinkley (1997, sec. 3.8); permutation p = (1 + hits) / (1 + B)
(Phipson & Smyth 2010); max-T family-wise p-values (Westfall & Young 1993); the exact
permutation mean and variance of a matched sum (Hoeffding 1951); TOST (Schuirmann 1987) on
cluster means; unbiased HSIC (Song et al. 2012) for debiased CKA (Kornblith et al. 2019;
Nguyen, Raghu & Kornblith 2021), computed by U-centring (Szekely & Rizzo 2014); RSA
(Kriegeskorte et al. 2008) with a Mantel (1967) null.

Everything is numpy / scipy in float64 (the permuted Gram sums of CKA and RSA gather in
torch, also float64); resampling is vectorised in blocks of about ``_BLOCK`` array elements. Shapes: ``n`` units or items, ``L`` layers, ``d`` hidden size.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats as sps

__all__ = [
    "MAX_EXACT", "ClusterMean", "PairingResult", "TostResult", "bh", "cluster_mean", "count_patterns",
    "hierarchical_bootstrap", "hierarchical_bootstrap_means", "holm", "pairing_test", "ratio_ci", "smallest_p", "tost",
]  # fmt: skip

Alternative = Literal["two-sided", "greater", "less"]
_BLOCK = 1 << 22  # array elements per vectorised resampling block (~32 MB of float64)
_TOL = 1e-9  # relative tolerance: a resample this close to the observed statistic is a tie
_EPS = 1e-12  # norm clamp of the cosine (as iclit.analysis.similarity: zero vector -> 0)


def _f64(x: Any) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------- multiplicity


def _adjust(p: Any, step: Any) -> np.ndarray:
    """Apply ``step(sorted non-NaN p) -> adjusted`` to the family of non-NaN p-values."""
    p = _f64(p)
    flat = p.reshape(-1).copy()
    ok = ~np.isnan(flat)
    if ok.any():
        q = flat[ok]
        order = np.argsort(q, kind="stable")
        res = np.empty(q.size)
        res[order] = np.minimum(step(q[order]), 1.0)
        flat[ok] = res
    return flat.reshape(p.shape)


def holm(p: Any) -> np.ndarray:
    """Holm step-down adjusted p-values (family-wise error), same shape as ``p``.

    adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)) over the m non-NaN p-values sorted
    ascending; NaNs are passed through and are not members of the family.
    """
    return _adjust(p, lambda q: np.maximum.accumulate((q.size - np.arange(q.size)) * q))


def bh(p: Any) -> np.ndarray:
    """Benjamini-Hochberg q-values (false discovery rate), same shape as ``p``.

    q_(i) = min_{j >= i} min(1, m p_(j) / j); NaNs passed through and left out of the family.
    """
    def step(q: np.ndarray) -> np.ndarray:
        return np.minimum.accumulate((q * q.size / np.arange(1, q.size + 1))[::-1])[::-1]

    return _adjust(p, step)


# ---------------------------------------------------------------- hierarchical bootstrap


def _group_codes(groups: Any, n: int) -> np.ndarray:
    """Integer codes 0..G-1 of any hashable labels (tuples included) ``[n]``."""
    if isinstance(groups, np.ndarray) and groups.ndim == 1:
        labels: Any = groups
    else:
        labels = pd.Series(list(groups), dtype=object)
    if len(labels) != n:
        raise ValueError(f"groups has {len(labels)} labels for {n} units")
    codes, _ = pd.factorize(labels, use_na_sentinel=False)
    return np.asarray(codes, dtype=np.int64)


def _as_2d(values: Any) -> tuple[np.ndarray, bool]:
    """``[n]`` or ``[n, L]`` values as float64 ``[n, L]``, and whether they were 1-D."""
    v = _f64(values)
    if v.ndim not in (1, 2):
        raise ValueError(f"values must be [n] or [n, L], got shape {v.shape}")
    return (v[:, None], True) if v.ndim == 1 else (v, False)


def _units(values: Any, groups: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    """``[n, L]`` values without NaN units, their group codes 0..G-1, and whether 1-D."""
    v, one_d = _as_2d(values)
    codes = _group_codes(groups, v.shape[0])
    cols = ~np.isnan(v).all(0)  # an all-NaN column stays NaN and does not drop every unit
    keep = ~np.isnan(v[:, cols]).any(1)
    codes = np.unique(codes[keep], return_inverse=True)[1].reshape(-1)
    return v[keep], codes, one_d


def hierarchical_bootstrap_means(
    values: Any, groups: Any, *, n_boot: int = 2000, seed: int = 0, within: bool = True
) -> np.ndarray:
    """Bootstrap draws of the mean of units nested in groups: ``[n_boot]`` or ``[n_boot, L]``.

    values: ``[n]`` or ``[n, L]``; groups: ``[n]`` hashable labels. Each draw resamples the
    G groups with replacement, then, in each drawn group of n_g units, n_g units with
    replacement (``within=False``: every unit of a drawn group, the bootstrap of groups, whose
    units stay balanced as the design made them: the choice for query blocks, whose units share
    queries and sets); the statistic is the mean over all units drawn. Every column uses the
    same draws, so a unit with a NaN in any column is dropped (a column that is all NaN stays
    NaN). One group per unit is the ordinary bootstrap; no units gives NaN draws.
    """
    v, codes, one_d = _units(values, groups)
    n, n_col = v.shape
    out = np.full((n_boot, n_col), np.nan)
    if n:
        order = np.argsort(codes, kind="stable")
        v, codes = v[order], codes[order]
        sizes = np.bincount(codes)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        n_groups = sizes.size
        rng = np.random.default_rng(seed)
        block = max(1, min(n_boot, _BLOCK // (n + n_groups)))
        for b0 in range(0, n_boot, block):
            b = min(block, n_boot - b0)
            g = rng.integers(0, n_groups, size=(b, n_groups))  # groups of each draw
            k = sizes[g]  # units to draw in each drawn group
            slot = np.repeat(g.reshape(-1), k.reshape(-1))  # group of every drawn unit
            draw = np.repeat(np.arange(b), k.sum(1))
            if within:
                unit = starts[slot] + rng.integers(0, sizes[slot])
            else:  # every unit of each drawn group, in order
                first = np.repeat(np.cumsum(k.reshape(-1)) - k.reshape(-1), k.reshape(-1))
                unit = starts[slot] + (np.arange(len(slot)) - first)
            w = np.bincount(draw * n + unit, minlength=b * n).reshape(b, n)
            out[b0 : b0 + b] = (w @ v) / k.sum(1)[:, None]
    return out[:, 0] if one_d else out


def hierarchical_bootstrap(
    values: Any, groups: Any, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[Any, Any]:
    """Percentile CI of the mean under :func:`hierarchical_bootstrap_means`.

    values ``[n]`` -> ``(lo, hi)`` floats; values ``[n, L]`` -> ``(lo[L], hi[L])`` arrays
    from the same draws for every column. NaN when no unit remains.
    """
    means = hierarchical_bootstrap_means(values, groups, n_boot=n_boot, seed=seed)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a], axis=0)
    return (float(lo), float(hi)) if means.ndim == 1 else (lo, hi)


# ---------------------------------------------------------------- permutation machinery


def _perm_p(obs: np.ndarray, null: np.ndarray, *, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer p and step-down max-T p over layers, larger = more extreme.

    obs ``[L]``, null ``[P, L]`` (already standardised for max-T). Monte Carlo draws give
    (1 + hits) / (1 + P) (Phipson & Smyth 2010); ``exact``: null holds every permutation,
    the identity among them, and p = hits / P. The family-wise p is Westfall & Young's (1993)
    step-down max-T: the layers sorted by their observed value, the j-th is compared with the
    maximum over itself and the layers after it, and the p-values are made monotone. Layers
    whose observed value is not finite get NaN and are left out of the max-T family.
    """
    p = np.full(obs.shape, np.nan)
    p_max = np.full(obs.shape, np.nan)
    ok = np.isfinite(obs) & np.isfinite(null).all(0)
    if ok.any():
        o, z = obs[ok], null[:, ok]
        tol = _TOL * np.maximum(1.0, np.abs(o))
        add = 0.0 if exact else 1.0
        p[ok] = (add + (z >= o - tol).sum(0)) / (add + z.shape[0])
        order = np.argsort(-o, kind="stable")
        tail_max = np.maximum.accumulate(z[:, order[::-1]], axis=1)[:, ::-1]  # max over layers order[j:]
        step = (add + (tail_max >= (o - tol)[order]).sum(0)) / (add + z.shape[0])
        adj = np.empty_like(step)
        adj[order] = np.maximum.accumulate(step)
        p_max[ok] = adj
    return p, p_max


def _random_perms(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform random permutations along the last axis (argsort of random keys)."""
    return np.argsort(rng.random(shape), axis=-1)


def _permuted_inner(a: np.ndarray, b: np.ndarray, n_perm: int, seed: int) -> np.ndarray:
    """``<A, B[pi][:, pi]>_F`` per layer for random item permutations pi: ``[n_perm, L]``.

    a, b: ``[L, n, n]``; one permutation per draw, shared by every layer. Costs
    O(n_perm L n^2); blocks of permutations (and of layers when n is large) bound memory.
    When both are symmetric (Gram and similarity matrices are), only the upper triangle is
    read (the off-diagonal terms counted twice): the same sums, half the gathers. The
    permutations come from numpy's generator; the gathers and sums run in torch (float64, on
    every CPU thread), about 4x faster than numpy's fancy indexing at n = 300.
    """
    return _permuted_inners([a], b, n_perm, seed)[0]


def _permuted_inners(a_list: Sequence[np.ndarray], b: np.ndarray, n_perm: int, seed: int) -> np.ndarray:
    """:func:`_permuted_inner` of each A of ``a_list`` with the same B and the same
    permutations: ``[len(a_list), n_perm, L]``, B's permuted entries gathered once for all."""
    import torch

    n_layers, n, _ = b.shape
    rng = np.random.default_rng(seed)
    if np.array_equal(b, b.transpose(0, 2, 1)) and all(np.array_equal(a, a.transpose(0, 2, 1)) for a in a_list):
        i, j = np.triu_indices(n)
        a_sel = np.stack([a[:, i, j] * np.where(i == j, 1.0, 2.0) for a in a_list])  # [A, L, m]
    else:
        i, j = (ix.ravel() for ix in np.indices((n, n)))
        a_sel = np.stack([a.reshape(n_layers, n * n) for a in a_list])
    m = len(i)
    a_t = torch.from_numpy(np.ascontiguousarray(a_sel, dtype=np.float64))
    b_t = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float64).reshape(n_layers, n * n))
    i_t, j_t = torch.from_numpy(i), torch.from_numpy(j)
    out = np.empty((len(a_list), n_perm, n_layers))
    budget = 2 * _BLOCK  # gathered elements per block (64 MB): fewer, larger gathers
    block = max(1, budget // (n_layers * m))
    step = n_layers if block > 1 else max(1, budget // m)
    for b0 in range(0, n_perm, block):
        k = min(block, n_perm - b0)
        pi = torch.from_numpy(_random_perms(rng, (k, n)))
        idx = pi[:, i_t] * n + pi[:, j_t]  # [k, m]
        for l0 in range(0, n_layers, step):
            bp = b_t[l0 : l0 + step][:, idx]  # [step, k, m]
            out[:, b0 : b0 + k, l0 : l0 + step] = torch.einsum("alm,lkm->akl", a_t[:, l0 : l0 + step], bp).numpy()
    return out


# ---------------------------------------------------------------- pairing test


@dataclass(frozen=True, eq=False)
class PairingResult:
    """Matched vs swapped pairing, per layer (see :func:`pairing_test`).

    observed, null, diff, p, p_maxT, sd: ``[L]``; unit_diff ``[n_units, L]`` (diagonal minus
    the row's off-diagonal mean); unit_stratum, unit_item ``[n_units]``: each unit's stratum
    (its index in the list given) and row in that stratum, so the caller can map units back
    (items with NaN are removed) and form its own groups. Units are in input order.
    exact: every distinct pairing was enumerated (p = hits / patterns); n_perm: the pairings
    compared (all of them when exact, else the Monte Carlo draws); patterns: how many distinct
    pairings the design has (``inf`` when too many to count in a float); p_min: the smallest
    p this design and test can return whatever the data (:func:`smallest_p`). sd: the exact
    permutation SD of the matched mean (0: every pairing gives the same value, the test has
    nothing to say).
    """

    observed: np.ndarray
    null: np.ndarray
    diff: np.ndarray
    p: np.ndarray
    p_maxT: np.ndarray
    n_units: int
    n_strata: int
    unit_diff: np.ndarray
    unit_stratum: np.ndarray
    unit_item: np.ndarray
    exact: bool = False
    n_perm: int = 0
    patterns: float = float("nan")
    p_min: float = float("nan")
    sd: np.ndarray | None = None


def _clean_stratum(c: Any) -> tuple[np.ndarray, np.ndarray]:
    """``[m', m', L]`` float64 without NaN, and the items kept ``[m']``: items (row a with
    column a) are removed greedily, the one with most NaN entries first."""
    c = _f64(c)
    c = c[..., None] if c.ndim == 2 else c
    if c.ndim != 3 or c.shape[0] != c.shape[1]:
        raise ValueError(f"a stratum must be [m, m, L] or [m, m], got shape {c.shape}")
    bad = np.isnan(c).any(-1)
    keep = np.ones(c.shape[0], dtype=bool)
    while (sub := bad[np.ix_(keep, keep)]).any():
        keep[np.flatnonzero(keep)[np.argmax(sub.sum(0) + sub.sum(1))]] = False
    return c[np.ix_(keep, keep)], np.flatnonzero(keep)


MAX_EXACT = 50_000
"""Designs with at most this many distinct pairings are tested exactly (every pairing
enumerated); larger ones by Monte Carlo."""


def count_patterns(group_sizes: Mapping[int, int]) -> float:
    """Distinct pairings of independent permutation groups: ``prod (m!)^count`` over
    ``{m: count}`` (``inf`` beyond a float's range)."""
    log = sum(count * math.lgamma(m + 1) for m, count in group_sizes.items())
    return float(math.prod(math.factorial(m) ** count for m, count in group_sizes.items())) if log < 700 else math.inf


def smallest_p(group_sizes: Mapping[int, int], *, n_perm: int, alternative: Alternative = "two-sided",
               max_exact: int = MAX_EXACT) -> tuple[float, bool]:
    """The smallest p a pairing test can return on this design, whatever the data, and
    whether the test is exact.

    group_sizes: ``{m: count}``, the independent permutation groups (linked strata count once).
    Exact (at most ``max_exact`` pairings): 1 / patterns, or 2 / patterns two-sided when every
    group has two items (a sign flip: the identity and the all-swapped pattern reach the same
    |T - E|). Monte Carlo: at least 1 / (n_perm + 1), and never below the exact floor. With two
    sets per query block and G blocks, the demo-swap test is a sign flip of G block contrasts:
    its floor is 2 / 2^G two-sided (1/16 for 5 blocks), 1 / 2^G one-sided.
    """
    patterns = count_patterns(group_sizes)
    sym = 2.0 if alternative == "two-sided" and group_sizes and set(group_sizes) == {2} else 1.0
    floor = min(1.0, sym / patterns) if patterns > 0 else 1.0
    exact = patterns <= max_exact
    return (floor, True) if exact else (max(floor, 1.0 / (n_perm + 1)), False)


def _enumerated(perm_sets: Mapping[int, np.ndarray], n_groups: Mapping[int, int], start: int, stop: int) -> dict[int, np.ndarray]:
    """Patterns ``start..stop`` of every combination of the groups' permutations (mixed radix,
    pattern 0 the identity): ``{m: [stop - start, n_groups[m], m]}``."""
    idx = np.arange(start, stop, dtype=np.int64)
    out = {}
    for m in sorted(n_groups):
        base = len(perm_sets[m])
        digits = np.empty((len(idx), n_groups[m]), dtype=np.int64)
        for g in range(n_groups[m]):
            digits[:, g] = idx % base
            idx = idx // base
        out[m] = perm_sets[m][digits]
    return out


def pairing_test(
    strata: Sequence[Any],
    *,
    n_perm: int = 2000,
    seed: int = 0,
    alternative: Alternative = "two-sided",
    links: Sequence[Any] | None = None,
    max_exact: int = MAX_EXACT,
) -> PairingResult:
    """Is the matched pairing more similar than the swapped ones? Per layer, with max-T.

    Parameters
    ----------
    strata : sequence of arrays ``[m_s, m_s, L]`` (``[m, m]`` is one layer)
        ``C[a, b, l]`` pairs item a's first arm with item b's second arm. Items with a NaN
        are removed (row and column together, the one with most NaN entries first); strata
        left with m_s < 2 are ignored, and with none left every number is NaN.
    n_perm : int
        Monte Carlo draws when the design has more than ``max_exact`` distinct pairings.
    seed : int
        Seed of the Monte Carlo draws.
    alternative : {"two-sided", "greater", "less"}
        Two-sided counts ``|T_pi - E| >= |T_obs - E|``, "greater" ``T_pi >= T_obs``, "less"
        ``T_pi <= T_obs``.
    links : sequence, optional
        One label per stratum; strata with the same label (and, after NaN removal, the same
        items) share one permutation per draw, for strata whose items are the same units seen
        again (the sets of a query block under demo-swap: one swap of whole sets for every
        query of the block). SD then counts the covariance of linked strata (Hoeffding's
        formula on their summed double-centred matrices). None: all independent.
    max_exact : int
        Enumerate every pairing when there are at most this many (:data:`MAX_EXACT`).

    Returns
    -------
    PairingResult
        ``observed[l]`` the mean diagonal over all units, ``null[l]`` the mean of each row's
        off-diagonal mean (every eligible partner averaged), ``diff = observed - null``. The
        statistic T is the mean of ``C[a, pi(a), l]`` against its exact permutation mean E and
        SD (Hoeffding 1951); one permutation serves every layer. ``p``: exact (hits / patterns,
        the identity included) or Monte Carlo ((1 + hits) / (1 + n_perm)); ``p_maxT``:
        step-down max-T over the layers on z = (T - E) / SD (Westfall & Young 1993);
        ``p_min``: the design's floor (:func:`smallest_p`).

    Examples
    --------
    Two sets of one block read by three queries, each stratum ``[2, 2]`` (linked: one swap of
    the sets for all three queries), so the test is exact over 2 patterns:

    >>> import numpy as np
    >>> c = np.array([[0.9, 0.1], [0.2, 0.8]])
    >>> res = pairing_test([c, c, c], links=[0, 0, 0])
    >>> bool(res.exact), res.n_perm, float(res.p_min), float(res.p[0])
    (True, 2, 1.0, 1.0)
    """
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be two-sided, greater or less, not {alternative!r}")
    cleaned, kept = zip(*(_clean_stratum(c) for c in strata)) if len(strata) else ((), ())
    n_layers = {c.shape[2] for c in cleaned}
    if len(n_layers) > 1:
        raise ValueError(f"strata disagree on the number of layers: {sorted(n_layers)}")
    n_l = n_layers.pop() if n_layers else 0
    used = [i for i, c in enumerate(cleaned) if c.shape[0] >= 2]
    if links is not None and len(links) != len(strata):
        raise ValueError(f"links has {len(links)} labels for {len(strata)} strata")
    if not used:
        nan = np.full(n_l, np.nan)
        none = np.empty(0, dtype=np.int64)
        return PairingResult(nan, nan, nan, nan, nan, 0, 0, np.empty((0, n_l)), none, none, sd=nan)

    unit_diff, unit_stratum, unit_null = [], [], []
    exp_sum = np.zeros(n_l)
    by_m: dict[int, list[np.ndarray]] = {}
    group_of: dict[int, list[int]] = {}  # per stratum size: each stratum's permutation group (0, 1, ...)
    numbering: dict[int, dict[Any, int]] = {}
    centred: dict[Any, np.ndarray] = {}  # permutation group -> its strata's summed double-centred C
    for i in used:
        c = cleaned[i]
        m = c.shape[0]
        diag = c[np.arange(m), np.arange(m)]  # [m, L]
        off = (c.sum(1) - diag) / (m - 1)
        unit_diff.append(diag - off)
        unit_null.append(off)
        unit_stratum.append(np.full(m, i, dtype=np.int64))
        exp_sum += c.sum((0, 1)) / m
        d = c - c.mean(1, keepdims=True) - c.mean(0, keepdims=True) + c.mean((0, 1), keepdims=True)
        group = (m, i) if links is None else (m, links[i], tuple(kept[i]))
        centred[group] = centred[group] + d if group in centred else d
        number = numbering.setdefault(m, {})
        group_of.setdefault(m, []).append(number.setdefault(group, len(number)))
        by_m.setdefault(m, []).append(c)
    var_sum = sum(((d**2).sum((0, 1)) / (g[0] - 1) for g, d in centred.items()), np.zeros(n_l))
    stacks = {m: np.stack(cs) for m, cs in by_m.items()}  # [K, m, m, L] per stratum size
    n_groups = {m: len(number) for m, number in numbering.items()}
    group_idx = {m: np.asarray(g) for m, g in group_of.items()}
    n_units = sum(len(u) for u in unit_diff)
    ud = np.concatenate(unit_diff)

    def matched_sum(perms: dict[int, np.ndarray]) -> np.ndarray:  # perms[m]: [B, K, m]
        total = 0.0
        for m, st in stacks.items():
            k_idx = np.arange(st.shape[0])[None, :, None]
            total = total + st[k_idx, np.arange(m)[None, None, :], perms[m]].sum((1, 2))
        return total / n_units  # [B, L]

    mean = exp_sum / n_units
    sd = np.sqrt(np.maximum(var_sum, 0.0)) / n_units
    ok = sd > _TOL * np.maximum(1.0, np.abs(mean))  # SD 0: every pairing gives the same T
    sign = {"two-sided": 0.0, "greater": 1.0, "less": -1.0}[alternative]

    def z_of(t: np.ndarray) -> np.ndarray:
        z = np.where(ok, (t - mean) / np.where(ok, sd, 1.0), 0.0)
        return np.abs(z) if sign == 0.0 else sign * z

    ident = {m: np.broadcast_to(np.arange(m), (1, st.shape[0], m)) for m, st in stacks.items()}
    t_obs = matched_sum(ident)[0]
    p_min, exact = smallest_p(n_groups, n_perm=n_perm, alternative=alternative, max_exact=max_exact)
    patterns = count_patterns(n_groups)
    total = round(patterns) if exact else n_perm
    z_null = np.empty((total, n_l))
    block = max(1, _BLOCK // max(1, n_units * n_l))
    if exact:
        perm_sets = {m: np.asarray(list(itertools.permutations(range(m))), dtype=np.int64) for m in stacks}
        for b0 in range(0, total, block):
            b1 = min(total, b0 + block)
            perms = {m: p[:, group_idx[m]] for m, p in _enumerated(perm_sets, n_groups, b0, b1).items()}
            z_null[b0:b1] = z_of(matched_sum(perms))
    else:
        rng = np.random.default_rng(seed)
        for b0 in range(0, total, block):
            b = min(block, total - b0)
            perms = {m: _random_perms(rng, (b, n_groups[m], m))[:, group_idx[m]] for m in stacks}
            z_null[b0 : b0 + b] = z_of(matched_sum(perms))
    p, p_max = _perm_p(z_of(t_obs), z_null, exact=exact)
    null = np.concatenate(unit_null).mean(0)
    return PairingResult(observed=t_obs, null=null, diff=ud.mean(0), p=p, p_maxT=p_max,
                         n_units=n_units, n_strata=len(used), unit_diff=ud,
                         unit_stratum=np.concatenate(unit_stratum),
                         unit_item=np.concatenate([kept[i] for i in used]), exact=exact, n_perm=total,
                         patterns=patterns, p_min=p_min, sd=sd)  # fmt: skip


# ---------------------------------------------------------------- equivalence


@dataclass(frozen=True, eq=False)
class ClusterMean:
    """The mean of units nested in groups, with groups as the independent units (see
    :func:`cluster_mean`). Arrays ``[L]`` (floats for ``[n]`` values)."""

    mean: Any
    se: Any
    df: Any
    n_groups: Any

    def ci(self, level: float = 0.95) -> tuple[Any, Any]:
        """The t interval ``mean ± t(1 - (1 - level)/2, df) se``: NaN when fewer than two
        groups or the groups' means do not vary (se 0)."""
        with np.errstate(invalid="ignore"):
            half = sps.t.ppf(0.5 + level / 2.0, self.df) * np.where(np.asarray(self.se) > 0, self.se, np.nan)
        lo, hi = np.asarray(self.mean) - half, np.asarray(self.mean) + half
        return (float(lo), float(hi)) if np.ndim(self.mean) == 0 else (lo, hi)


def cluster_mean(values: Any, groups: Any) -> ClusterMean:
    """The mean of the group means and its standard error over groups.

    Parameters
    ----------
    values : array ``[n]`` or ``[n, L]``
        One value per unit (NaNs ignored per column; a group with none is left out).
    groups : sequence ``[n]``
        Hashable labels: the independent units (query blocks). Each group's units are
        averaged, then the G group means give mean, se = SD / sqrt(G), df = G - 1.

    Returns
    -------
    ClusterMean
        Its :meth:`ClusterMean.ci` is the t interval that :func:`tost` and the verdicts use,
        so an interval and the equivalence test beside it share one standard error. With two
        sets per block and a block's units averaged, a set's main effect (present in the
        block's own and swapped pairings alike) cancels in a block contrast and does not
        widen the interval.

    Examples
    --------
    >>> res = cluster_mean([1.0, 3.0, 2.0, 4.0], ["a", "a", "b", "b"])
    >>> float(res.mean), float(res.se), int(res.df)
    (2.5, 0.5, 1)
    """
    v, one_d = _as_2d(values)
    gm = pd.DataFrame(v).groupby(_group_codes(groups, v.shape[0])).mean()  # [G, L], NaN skipped
    g = gm.count().to_numpy()
    mean = gm.mean().to_numpy()
    se = (gm.std(ddof=1) / np.sqrt(g)).to_numpy()  # NaN when g < 2
    df = np.where(g >= 2, g - 1, np.nan)
    if one_d:
        return ClusterMean(float(mean[0]), float(se[0]), float(df[0]), int(g[0]))
    return ClusterMean(mean, se, df, g)


@dataclass(frozen=True, eq=False)
class TostResult:
    """Two one-sided tests of ``|mean| < margin`` on group means (see :func:`tost`).

    Floats for ``[n]`` values, ``[L]`` arrays for ``[n, L]``. ci_low / ci_high: the
    (1 - 2 alpha) t interval, inside (-margin, margin) exactly when ``equivalent``; se: the
    standard error of :func:`cluster_mean` they share.
    """

    mean: Any
    ci_low: Any
    ci_high: Any
    p_lower: Any
    p_upper: Any
    p: Any
    equivalent: Any
    margin: Any
    n_groups: Any
    se: Any = None


def tost(values: Any, groups: Any, margin: Any, *, alpha: float = 0.05) -> TostResult:
    """Equivalence of the mean to 0 within ``±margin``, cluster-robust.

    values: ``[n]`` or ``[n, L]``; groups: ``[n]`` labels; margin > 0, scalar or ``[L]``
    (NaN: no margin declared, never equivalent). On the G group means of
    :func:`cluster_mean`: p_lower tests H0 mean <= -margin, p_upper H0 mean >= +margin
    (one-sided one-sample t, df = G - 1), p = max, equivalent = p < alpha. G < 2 or group
    means that do not vary (se 0) give NaN and equivalent False: no evidence either way.

    Examples
    --------
    >>> res = tost([0.01, 0.0, -0.01, 0.005, 0.0, -0.005], [0, 0, 1, 1, 2, 2], 0.1)
    >>> bool(res.equivalent), res.n_groups
    (True, 3)
    """
    v, one_d = _as_2d(values)
    marg = np.broadcast_to(_f64(margin), (v.shape[1],)).astype(np.float64)
    if not (np.isnan(marg) | (marg > 0)).all():
        raise ValueError(f"margin must be > 0, got {margin}")
    cm = cluster_mean(v, groups)
    mean, g, df = cm.mean, cm.n_groups, cm.df
    se = np.where(np.asarray(cm.se) > 0, cm.se, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_lower = sps.t.sf((mean + marg) / se, df)
        p_upper = sps.t.cdf((mean - marg) / se, df)
        half = sps.t.ppf(1.0 - alpha, df) * se
    p = np.maximum(p_lower, p_upper)
    out = dict(mean=mean, ci_low=mean - half, ci_high=mean + half, p_lower=p_lower,
               p_upper=p_upper, p=p, equivalent=p < alpha, margin=marg, n_groups=g, se=se)  # fmt: skip
    if one_d:
        conv = {"equivalent": bool, "n_groups": int}
        out = {k: conv.get(k, float)(np.asarray(x)[0]) for k, x in out.items()}
    return TostResult(**out)


def ratio_ci(num: Any, den: Any, groups: Any, *, level: float = 0.95) -> tuple[Any, Any, Any]:
    """A ratio of two means over the same groups, with a delta-method t interval.

    num, den: ``[n]`` or ``[n, L]`` unit values (NaN-free rows used), groups ``[n]``. Each is
    averaged per group; R = mean(num) / mean(den) over the G groups, and its SE from the
    groups' linearised values (num_g - R den_g) / mean(den), df = G - 1. Returns (R, lo, hi);
    the interval is NaN where the denominator's own t interval includes 0 (the ratio has no
    finite interval there).
    """
    a, one_d = _as_2d(num)
    b, _ = _as_2d(den)
    codes = _group_codes(groups, a.shape[0])
    ga = pd.DataFrame(a).groupby(codes).mean().to_numpy()
    gb = pd.DataFrame(b).groupby(codes).mean().to_numpy()
    n_g = ga.shape[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        ma, mb = ga.mean(0), gb.mean(0)
        r = ma / mb
        lin = (ga - r * gb) / mb
        se = lin.std(0, ddof=1) / np.sqrt(n_g) if n_g > 1 else np.full(ma.shape, np.nan)
        t = sps.t.ppf(0.5 + level / 2.0, n_g - 1) if n_g > 1 else np.nan
        den_se = gb.std(0, ddof=1) / np.sqrt(n_g) if n_g > 1 else np.full(ma.shape, np.nan)
        bounded = np.abs(mb) > t * den_se
        lo, hi = np.where(bounded, r - t * se, np.nan), np.where(bounded, r + t * se, np.nan)
    if one_d:
        return float(r[0]), float(lo[0]), float(hi[0])
    return r, lo, hi
