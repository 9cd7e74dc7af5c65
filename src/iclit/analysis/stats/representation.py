"""Representational similarity: debiased linear CKA and RSA between two sets of states of the
same items, each with a permutation null and max-T over layers.

Debiased CKA uses the unbiased HSIC estimator (Song et al. 2012) as in Kornblith et al.
(2019) and Nguyen, Raghu & Kornblith (2021), computed by U-centring (Szekely & Rizzo 2014);
linear CKA with n ≪ d is biased towards 1, this estimator is not. RSA (Kriegeskorte et al.
2008) is the Spearman correlation between the two arms' query × query cosine matrices, with
a Mantel (1967) null. Both nulls permute the items of the second arm (the same permutation at
every layer) and are one-sided (greater). Shapes: ``x, y [n, L, d]``.

Which permutations. Over plain arrays the items are permuted uniformly. A cell's items are
not exchangeable that way: the sets of one query block read the same queries (the anchor's
rows are copies across the block's sets), and queries of one gold label resemble each other.
Two arms that each cluster by query share that structure by construction, so their CKA is
positive even when they are otherwise independent, and a uniform null calls it significant.
:func:`iclit.analysis.permutations.design_permutations` draws only what the design makes
exchangeable: the query null permutes, within one (seed, query block, gold label), the
block's queries, one permutation for every set of the block (a query's rows move together);
the demonstration null permutes a block's sets, one permutation for all its queries (every
query stays matched with itself, as both arms read it).
:func:`iclit.analysis.cells.geometry` passes those to ``perms``. Values are comparable only
between cells of the same design (same S sets, Q queries per set, sets per block): see
docs/statistics.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import stats as sps

from iclit.analysis.stats.arrays import EPS, as_float64
from iclit.analysis.stats.multiplicity import permutation_pvalues
from iclit.analysis.stats.permutation import permuted_inners, random_perms

__all__ = ["cka_permutation_test", "debiased_cka", "debiased_cka_per_layer", "pair_tests", "rsa", "rsa_per_layer"]


def _uniform(n: int, n_perm: int, seed: int) -> np.ndarray:
    """``n_perm`` uniform permutations of n items ``[n_perm, n]``, seeded."""
    return random_perms(np.random.default_rng(seed), (n_perm, n))


def _paired_states(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """``[n, L, d]`` float64 pair (``[n, d]`` becomes L = 1) without rows that have a NaN."""
    x, y = as_float64(x), as_float64(y)
    x = x[:, None] if x.ndim == 2 else x
    y = y[:, None] if y.ndim == 2 else y
    if x.ndim != 3 or y.ndim != 3 or x.shape[:2] != y.shape[:2]:
        raise ValueError(f"x and y must be [n, L, d] with equal n and L: {x.shape}, {y.shape}")
    keep = ~(np.isnan(x).any((1, 2)) | np.isnan(y).any((1, 2)))
    return x[keep], y[keep]


def _u_centred_gram(x: np.ndarray) -> np.ndarray:
    """U-centred linear Gram ``[L, n, n]`` of ``[n, L, d]``: <U(K), U(M)> / (n (n - 3)) is
    Song et al.'s unbiased HSIC (zero diagonal; needs n >= 4)."""
    xt = np.moveaxis(x, 1, 0)
    k = xt @ xt.transpose(0, 2, 1)
    n = k.shape[-1]
    idx = np.arange(n)
    k[:, idx, idx] = 0.0
    r = k.sum(-1)
    total = r.sum(-1)[:, None, None] / ((n - 1) * (n - 2))
    u = k - (r[:, :, None] + r[:, None, :]) / (n - 2) + total
    u[:, idx, idx] = 0.0
    return u


def _scale(den: np.ndarray, factor: float) -> np.ndarray:
    """``factor / sqrt(den)`` per layer, NaN where the denominator is <= 0."""
    return np.where(den > 0, factor / np.sqrt(np.where(den > 0, den, 1.0)), np.nan)


def _inner(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("lij,lij->l", a, b)


def _cka_parts(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """U-centred Grams ``[L, n, n]`` of x and y, 1 / CKA denominator ``[L]`` (NaN if <= 0), n."""
    x, y = _paired_states(x, y)
    n, n_l = x.shape[:2]
    if n < 4:
        return np.empty(0), np.empty(0), np.full(n_l, np.nan), n
    uk, um = _u_centred_gram(x), _u_centred_gram(y)
    den = _inner(uk, uk) * _inner(um, um)
    return uk, um, _scale(den, 1.0), n


def debiased_cka_per_layer(x: Any, y: Any) -> np.ndarray:
    """Debiased linear CKA per layer: x, y ``[n, L, d]`` (d may differ) -> ``[L]``.

    HSIC_u(K, M) / sqrt(HSIC_u(K, K) HSIC_u(M, M)) with K = X X^T, M = Y Y^T and the
    unbiased HSIC of Song et al. (2012); invariant to centring the features, orthogonal
    transforms and isotropic scaling, and near 0 for independent states even when n << d
    (unlike biased CKA). Rows with a NaN are dropped; NaN when n < 4 or a denominator <= 0.
    """
    uk, um, scale, _ = _cka_parts(x, y)
    return _inner(uk, um) * scale if uk.size else scale


def debiased_cka(x: Any, y: Any) -> float:
    """Debiased linear CKA of x ``[n, dx]`` and y ``[n, dy]`` (:func:`debiased_cka_per_layer`)."""
    return float(debiased_cka_per_layer(as_float64(x)[:, None], as_float64(y)[:, None])[0])


def _permutation_summary(
    a: np.ndarray,
    b: np.ndarray,
    scale: np.ndarray,
    n_perm: int,
    seed: int,
    permuted: np.ndarray | None = None,
    degenerate: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``<A, B> * scale`` ``[L]``, its null mean under item permutations of B, one-sided p
    and max-T p (values standardised by the null draws' mean and SD; z = 0 where SD is 0).
    permuted: ``<A, B[pi][:, pi]>`` ``[n_perm, L]`` when already computed; degenerate: the
    permutations allowed move nothing (null mean and p are NaN)."""
    value = _inner(a, b) * scale
    if degenerate:
        nan = np.full(value.shape, np.nan)
        return value, nan, nan.copy(), nan.copy()
    null = (permuted_inners([a], b, _uniform(b.shape[-1], n_perm, seed))[0] if permuted is None else permuted) * scale
    mu = null.mean(0)
    sd = null.std(0, ddof=1) if null.shape[0] > 1 else np.zeros_like(mu)
    ok, s = sd > 0, np.where(sd > 0, sd, 1.0)
    z_obs = np.where(ok, (value - mu) / s, 0.0)
    p, p_max = permutation_pvalues(np.where(np.isnan(value), np.nan, z_obs), np.where(ok, (null - mu) / s, 0.0))
    return value, mu, p, p_max


def _given(perms: Any, n: int) -> np.ndarray | None:
    """``perms`` as ``[P, n]`` int64 (None stays None)."""
    if perms is None:
        return None
    perms = np.asarray(perms, dtype=np.int64)
    if perms.ndim != 2 or perms.shape[1] != n:
        raise ValueError(f"perms must be [P, {n}] (one permutation of the items per row), got {perms.shape}")
    return perms


def _no_nan_rows(x: np.ndarray, y: np.ndarray) -> None:
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError(
            "given permutations need states without NaN rows: drop those items from the states and "
            "from the design before drawing the permutations"
        )


def _is_identity(perms: np.ndarray) -> bool:
    """No permutation, or none that moves an item: the null is not defined."""
    return bool((perms == np.arange(perms.shape[1])).all())


def cka_permutation_test(x: Any, y: Any, *, n_perm: int = 1000, seed: int = 0, perms: Any = None) -> dict[str, Any]:
    """Debiased CKA per layer against a permutation null of the rows of y.

    x, y: ``[n, L, d]``. One permutation per draw for all layers (permuting the rows of y
    permutes rows and columns of its U-centred Gram, computed once). Returns ``{value [L],
    null_mean [L], p [L], p_maxT [L], n}``; one-sided (greater), (1 + hits) / (1 + n_perm);
    max-T over layers on the values standardised by the null draws' mean and SD. Cost
    O(n_perm L n^2): pass the states of one whole cell, and fewer permutations for large n.

    perms: None draws ``n_perm`` uniform permutations (seeded); or ``[P, n]`` permutations
    to use instead (:func:`iclit.analysis.permutations.design_permutations`; x and y must have no NaN row). When none of
    them moves an item, null_mean and the p-values are NaN.
    """
    given = _given(perms, as_float64(x).shape[0])
    if given is not None:
        _no_nan_rows(as_float64(x), as_float64(y))
    uk, um, scale, n = _cka_parts(x, y)
    if not uk.size:
        return {k: scale.copy() for k in ("value", "null_mean", "p", "p_maxT")} | {"n": n}
    permuted = None if given is None else permuted_inners([uk], um, given)[0]
    degenerate = given is not None and _is_identity(given)
    value, mu, p, p_max = _permutation_summary(uk, um, scale, n_perm, seed, permuted, degenerate)
    return {"value": value, "null_mean": mu, "p": p, "p_maxT": p_max, "n": n}


def _centred_rank_matrix(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine-similarity matrix of the rows of ``[n, L, d]``, its upper triangle replaced by
    its centred ranks (ties averaged) and mirrored, zero diagonal: ``[L, n, n]``; and the
    per-layer sum of squared centred ranks ``[L]``."""
    xt = np.moveaxis(x, 1, 0)
    u = xt / np.maximum(np.linalg.norm(xt, axis=-1, keepdims=True), EPS)
    s = u @ u.transpose(0, 2, 1)
    i, j = np.triu_indices(s.shape[-1], 1)
    r = sps.rankdata(s[:, i, j], axis=-1)
    r -= r.mean(-1, keepdims=True)
    out = np.zeros_like(s)
    out[:, i, j] = r
    out[:, j, i] = r
    return out, (r**2).sum(-1)


def _rsa_parts(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    x, y = _paired_states(x, y)
    n, n_l = x.shape[:2]
    if n < 3:
        return np.empty(0), np.empty(0), np.full(n_l, np.nan), n
    rx, ssx = _centred_rank_matrix(x)
    ry, ssy = _centred_rank_matrix(y)
    scale = _scale(ssx * ssy, 0.5)
    return rx, ry, scale, n


def rsa(x: Any, y: Any) -> float:
    """RSA: Spearman correlation of the upper triangles of the rows' cosine-similarity
    matrices of x ``[n, dx]`` and y ``[n, dy]``. Rows with a NaN dropped; NaN for n < 3 or
    constant similarities."""
    rx, ry, scale, _ = _rsa_parts(as_float64(x)[:, None], as_float64(y)[:, None])
    return float(_inner(rx, ry)[0] * scale[0]) if rx.size else float("nan")


def rsa_per_layer(x: Any, y: Any, *, n_perm: int = 1000, seed: int = 0, perms: Any = None) -> dict[str, Any]:
    """:func:`rsa` per layer with a Mantel null: x, y ``[n, L, d]``.

    The items of y are permuted (rows and columns of its similarity matrix together), one
    permutation for all layers. Returns ``{value [L], p [L], p_maxT [L], n}``; one-sided
    (greater), (1 + hits) / (1 + n_perm); max-T on values standardised by the null draws.
    perms: as for :func:`cka_permutation_test`.
    """
    given = _given(perms, as_float64(x).shape[0])
    if given is not None:
        _no_nan_rows(as_float64(x), as_float64(y))
    rx, ry, scale, n = _rsa_parts(x, y)
    if not rx.size:
        return {k: scale.copy() for k in ("value", "p", "p_maxT")} | {"n": n}
    permuted = None if given is None else permuted_inners([rx], ry, given)[0]
    degenerate = given is not None and _is_identity(given)
    value, _, p, p_max = _permutation_summary(rx, ry, scale, n_perm, seed, permuted, degenerate)
    return {"value": value, "p": p, "p_maxT": p_max, "n": n}


def pair_tests(
    states: Mapping[str, Any],
    pairs: dict[str, tuple[str, str]],
    *,
    n_perm: int = 1000,
    seed: int = 0,
    perms: Any = None,
) -> dict[tuple[str, str], dict[str, Any]]:
    """:func:`cka_permutation_test` and :func:`rsa_per_layer` of several arm pairs over the
    same items: ``{(pair, "cka" | "rsa"): result}``; states: arm → ``[n, L, d]``, pairs:
    name → (first arm, second arm). The same numbers as the pair-by-pair functions (same
    seed, so the same permutations), computed once per arm: each arm's U-centred Gram and
    rank matrix, and each second arm's permuted entries gathered once for every pair that
    shares it. With a NaN row in any arm (each pair drops its own) it runs pair by pair.

    perms: None, uniform permutations of the items; or ``[P, n]`` permutations the design
    allows (:func:`iclit.analysis.permutations.design_permutations`), used for every pair (no
    arm may have a NaN row)."""
    arms = {arm: as_float64(states[arm]) for pair in pairs.values() for arm in pair}
    one = {arm: (x[:, None] if x.ndim == 2 else x) for arm, x in arms.items()}
    n = {x.shape[0] for x in one.values()}
    if len(n) > 1 or any(np.isnan(x).any() for x in one.values()) or n.pop() < 4:
        return {
            (name, measure): fn(arms[a], arms[b], n_perm=n_perm, seed=seed, perms=perms)
            for name, (a, b) in pairs.items()
            for measure, fn in (("cka", cka_permutation_test), ("rsa", rsa_per_layer))
        }
    given = _given(perms, next(iter(one.values())).shape[0])
    degenerate = given is not None and _is_identity(given)
    grams = {arm: _u_centred_gram(x) for arm, x in one.items()}
    norms = {arm: _inner(g, g) for arm, g in grams.items()}
    ranks = {arm: _centred_rank_matrix(x) for arm, x in one.items()}
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for second in dict.fromkeys(b for _, b in pairs.values()):
        names = [name for name, (_, b) in pairs.items() if b == second]
        firsts = [pairs[name][0] for name in names]
        for measure in ("cka", "rsa"):
            mats = grams if measure == "cka" else {arm: r for arm, (r, _) in ranks.items()}
            a_list = [mats[a] for a in firsts]
            permuted = (
                permuted_inners(a_list, mats[second], _uniform(mats[second].shape[-1], n_perm, seed))
                if given is None
                else permuted_inners(a_list, mats[second], given)
            )
            for name, first, perm in zip(names, firsts, permuted, strict=True):
                scale = (
                    _scale(norms[first] * norms[second], 1.0)
                    if measure == "cka"
                    else _scale(ranks[first][1] * ranks[second][1], 0.5)
                )
                value, mu, p, p_max = _permutation_summary(
                    mats[first], mats[second], scale, n_perm, seed, perm, degenerate
                )
                res = {"value": value, "null_mean": mu, "p": p, "p_maxT": p_max, "n": len(one[first])}
                out[name, measure] = res if measure == "cka" else {k: v for k, v in res.items() if k != "null_mean"}
    return out
