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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats as sps

__all__ = [
    "PairingResult", "TostResult", "bh", "hierarchical_bootstrap", "hierarchical_bootstrap_means", "holm",
    "pairing_test", "tost",
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
    values: Any, groups: Any, *, n_boot: int = 2000, seed: int = 0
) -> np.ndarray:
    """Bootstrap draws of the mean of units nested in groups: ``[n_boot]`` or ``[n_boot, L]``.

    values: ``[n]`` or ``[n, L]``; groups: ``[n]`` hashable labels. Each draw resamples the
    G groups with replacement, then, in each drawn group of n_g units, n_g units with
    replacement; the statistic is the mean over all units drawn. Every column uses the same
    draws, so a unit with a NaN in any column is dropped (a column that is all NaN stays NaN).
    One group per unit is the ordinary bootstrap; no units gives NaN draws.
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
            unit = starts[slot] + rng.integers(0, sizes[slot])
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


def _perm_p(obs: np.ndarray, null: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer and max-T p-values, larger = more extreme.

    obs ``[L]``, null ``[P, L]`` (already standardised for max-T). Layers whose observed
    value is not finite get NaN and are left out of the max-T family.
    """
    p = np.full(obs.shape, np.nan)
    p_max = np.full(obs.shape, np.nan)
    ok = np.isfinite(obs) & np.isfinite(null).all(0)
    if ok.any():
        o, z = obs[ok], null[:, ok]
        tol = _TOL * np.maximum(1.0, np.abs(o))
        p[ok] = (1.0 + (z >= o - tol).sum(0)) / (1.0 + z.shape[0])
        mx = z.max(1)[:, None]
        p_max[ok] = (1.0 + (mx >= o - tol).sum(0)) / (1.0 + z.shape[0])
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

    observed, null, diff, p, p_maxT: ``[L]``; unit_diff ``[n_units, L]`` (diagonal minus the
    row's off-diagonal mean); unit_stratum, unit_item ``[n_units]``: each unit's stratum (its
    index in the list given) and row in that stratum, so the caller can map units back (items
    with NaN are removed) and bootstrap over its own grouping. Units are in input order.
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


def pairing_test(
    strata: Sequence[Any],
    *,
    n_perm: int = 2000,
    seed: int = 0,
    alternative: Alternative = "two-sided",
    links: Sequence[Any] | None = None,
) -> PairingResult:
    """Is the matched pairing more similar than the swapped ones? Per layer, with max-T.

    strata: arrays ``[m_s, m_s, L]`` (``[m, m]`` is one layer); ``C[a, b, l]`` pairs item a's
    first arm with item b's second arm. Items with a NaN are removed (row and column together,
    the one with most NaN entries first, until none is left); strata left with m_s < 2 are
    ignored, and with none left every number is NaN.

    Effect: ``observed[l]`` the mean diagonal over all units (rows of all strata), ``null[l]``
    the mean of each row's off-diagonal mean (every eligible partner averaged), ``diff =
    observed - null``. Test: the pairing is permuted independently within each stratum (one
    permutation for all layers); T = mean over units of ``C[a, pi(a), l]`` against its exact
    permutation mean E (the row means including the diagonal) and SD (Hoeffding 1951).
    ``p``: two-sided counts ``|T_pi - E| >= |T_obs - E|``, "greater" ``T_pi >= T_obs``, "less"
    ``T_pi <= T_obs``; ``p_maxT``: the same on z = (T - E) / SD with the max over layers,
    family-wise over the L layers. Both are (1 + hits) / (1 + n_perm).

    links: one label per stratum; strata with the same label (and, after NaN removal, the same
    items) share one permutation per draw instead of each drawing its own, for strata whose
    items are the same units seen again (the sets of a query block under demo-swap: one swap of
    whole sets for every query of the block). SD then counts the covariance of linked strata
    (Hoeffding's formula on their summed double-centred matrices). None: all independent.
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
        return PairingResult(nan, nan, nan, nan, nan, 0, 0, np.empty((0, n_l)), none, none)

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
    rng = np.random.default_rng(seed)
    z_null = np.empty((n_perm, n_l))
    block = max(1, _BLOCK // max(1, n_units * n_l))
    for b0 in range(0, n_perm, block):
        b = min(block, n_perm - b0)
        perms = {m: _random_perms(rng, (b, n_groups[m], m))[:, group_idx[m]] for m in stacks}
        z_null[b0 : b0 + b] = z_of(matched_sum(perms))
    p, p_max = _perm_p(z_of(t_obs), z_null)
    null = np.concatenate(unit_null).mean(0)
    return PairingResult(observed=t_obs, null=null, diff=ud.mean(0), p=p, p_maxT=p_max,
                         n_units=n_units, n_strata=len(used), unit_diff=ud,
                         unit_stratum=np.concatenate(unit_stratum),
                         unit_item=np.concatenate([kept[i] for i in used]))  # fmt: skip


# ---------------------------------------------------------------- equivalence


@dataclass(frozen=True, eq=False)
class TostResult:
    """Two one-sided tests of ``|mean| < margin`` on group means (see :func:`tost`).

    Floats for ``[n]`` values, ``[L]`` arrays for ``[n, L]``. ci_low / ci_high: the
    (1 - 2 alpha) t interval, inside (-margin, margin) exactly when ``equivalent``.
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


def tost(values: Any, groups: Any, margin: Any, *, alpha: float = 0.05) -> TostResult:
    """Equivalence of the mean to 0 within ``±margin``, cluster-robust.

    values: ``[n]`` or ``[n, L]``; groups: ``[n]`` labels; margin > 0, scalar or ``[L]``.
    Each group's units are averaged (NaNs ignored per column; a group with none is left
    out), then on the G group means: p_lower tests H0 mean <= -margin, p_upper H0 mean >=
    +margin (one-sided one-sample t, df = G - 1), p = max, equivalent = p < alpha. G < 2
    gives NaN and equivalent False.
    """
    v, one_d = _as_2d(values)
    marg = np.broadcast_to(_f64(margin), (v.shape[1],)).astype(np.float64)
    if not (marg > 0).all():
        raise ValueError(f"margin must be > 0, got {margin}")
    gm = pd.DataFrame(v).groupby(_group_codes(groups, v.shape[0])).mean()  # [G, L], NaN skipped
    g = gm.count().to_numpy()
    mean = gm.mean().to_numpy()
    se = (gm.std(ddof=1) / np.sqrt(g)).to_numpy()  # NaN when g < 2
    df = np.where(g >= 2, g - 1, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_lower = sps.t.sf((mean + marg) / se, df)
        p_upper = sps.t.cdf((mean - marg) / se, df)
        half = sps.t.ppf(1.0 - alpha, df) * se
    p = np.maximum(p_lower, p_upper)
    out = dict(mean=mean, ci_low=mean - half, ci_high=mean + half, p_lower=p_lower,
               p_upper=p_upper, p=p, equivalent=p < alpha, margin=marg, n_groups=g)  # fmt: skip
    if one_d:
        conv = {"equivalent": bool, "n_groups": int}
        out = {k: conv.get(k, float)(np.asarray(x)[0]) for k, x in out.items()}
    return TostResult(**out)
