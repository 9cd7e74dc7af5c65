"""Multiple comparisons: Holm's step-down family-wise p (Holm 1979), Benjamini–Hochberg
q-values (Benjamini & Hochberg 1995), and per-layer permutation p-values with Westfall &
Young's (1993) step-down max-T over layers."""

from __future__ import annotations

from typing import Any

import numpy as np

from iclit.analysis.stats.arrays import TOL, as_float64

__all__ = ["bh", "holm", "permutation_pvalues"]


def _adjust(p: Any, step: Any) -> np.ndarray:
    """Apply ``step(sorted non-NaN p) -> adjusted`` to the family of non-NaN p-values."""
    p = as_float64(p)
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


def permutation_pvalues(obs: np.ndarray, null: np.ndarray, *, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
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
        tol = TOL * np.maximum(1.0, np.abs(o))
        add = 0.0 if exact else 1.0
        p[ok] = (add + (z >= o - tol).sum(0)) / (add + z.shape[0])
        order = np.argsort(-o, kind="stable")
        tail_max = np.maximum.accumulate(z[:, order[::-1]], axis=1)[:, ::-1]  # max over layers order[j:]
        step = (add + (tail_max >= (o - tol)[order]).sum(0)) / (add + z.shape[0])
        adj = np.empty_like(step)
        adj[order] = np.maximum.accumulate(step)
        p_max[ok] = adj
    return p, p_max
