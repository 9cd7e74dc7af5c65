"""Resampling: bootstrap CIs, summaries, paired comparisons, and the hierarchical
bootstrap of units nested in groups (Davison & Hinkley 1997, sec. 3.8) or of whole groups.

All functions ignore NaNs and are vectorised over bootstrap draws / permutations."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from iclit.analysis.stats.arrays import BLOCK, as_columns, as_float64, finite, group_codes, paired_finite
from iclit.analysis.stats.intervals import cluster_mean

__all__ = [
    "SUMMARY_COLUMNS",
    "bootstrap_ci",
    "cohens_d",
    "hierarchical_bootstrap",
    "hierarchical_bootstrap_means",
    "paired_bootstrap_diff",
    "permutation_test",
    "summarize",
    "summarize_layers",
]

_PERM_CHUNK = 2000  # permutations per vectorised block (bounds memory to ~chunk * n)


def bootstrap_ci(values: Any, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean, NaNs dropped.

    One ``rng.integers`` draw of shape ``[n_boot, n]``. n == 1 gives ``(v, v)``;
    n == 0 gives ``(nan, nan)``.
    """
    x = finite(values)
    n = x.size
    if n == 0:
        return (float("nan"), float("nan"))
    if n == 1:
        return (float(x[0]), float(x[0]))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


def summarize(
    values: Any, groups: Any = None, *, bounds: tuple[float, float] | None = None, **kw: Any
) -> dict[str, float | int]:
    """``{mean, std, ci_low, ci_high, n}`` of the non-NaN values.

    std uses ddof=1 (0.0 for n == 1). groups: one label per value, the independent units the
    values nest in (a crossed cell's query blocks): the CI is then the t interval over the
    groups' means (:func:`iclit.analysis.stats.intervals.cluster_mean`); without groups, values are
    taken as independent and ``kw`` goes to :func:`bootstrap_ci`. bounds: the range the
    quantity can take (an accuracy's [0, 1]); a t interval near its edge is cut to it.

    Examples
    --------
    >>> s = summarize([1.0, 1.0, 0.0, 1.0], groups=[0, 1, 2, 3], bounds=(0.0, 1.0))
    >>> s["mean"], s["ci_high"]
    (0.75, 1.0)
    """
    x_all = as_float64(values).reshape(-1)
    x = x_all[~np.isnan(x_all)]
    n = int(x.size)
    mean = float(x.mean()) if n else float("nan")
    std = float(x.std(ddof=1)) if n > 1 else (0.0 if n == 1 else float("nan"))
    if groups is not None and n:
        lo, hi = cluster_mean(x_all, groups).ci(0.95)
    else:
        lo, hi = bootstrap_ci(x, **kw)
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {"mean": mean, "std": std, "ci_low": lo, "ci_high": hi, "n": n}


SUMMARY_COLUMNS: tuple[str, ...] = ("pair", "layer", "mean", "std", "ci_low", "ci_high", "n")


def summarize_layers(per_resample: Mapping[str, Any], groups: Any = None, **kw: Any) -> pd.DataFrame:
    """Per pair x layer summary: the table written to ``summary.csv``.

    per_resample: ``{pair: [n, L]}`` (e.g. the output of ``pairwise_cosines``; a 1-D
    ``[n]`` is taken as one layer). Returns a DataFrame with columns
    ``pair, layer, mean, std, ci_low, ci_high, n``, one row per pair x layer, in input
    order. groups: the rows' independent units (:func:`summarize`); ``kw`` goes to
    :func:`bootstrap_ci` (same seed for every layer).
    """
    rows: list[dict[str, Any]] = []
    for pair, values in per_resample.items():
        if type(values).__module__.startswith("torch"):
            values = values.detach().cpu().double().numpy()
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.ndim != 2:
            raise ValueError(f"{pair}: expected [n, L], got shape {arr.shape}")
        for layer in range(arr.shape[1]):
            rows.append({"pair": pair, "layer": layer, **summarize(arr[:, layer], groups, **kw)})
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def cohens_d(a: Any, b: Any | None = None) -> float:
    """Cohen's d for paired differences: mean(a - b) / std(a - b, ddof=1).

    With ``b=None``, ``a`` is already the differences. NaN pairs dropped; NaN for n < 2;
    ±inf (or 0.0) when the differences are constant.
    """
    if b is None:
        d = finite(a)
    else:
        x, y = paired_finite(a, b)
        d = x - y
    if d.size < 2:
        return float("nan")
    m, s = float(d.mean()), float(d.std(ddof=1))
    if s == 0.0:
        return 0.0 if m == 0.0 else float(np.copysign(np.inf, m))
    return m / s


def paired_bootstrap_diff(
    a: Any, b: Any, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, float | int]:
    """Mean of the paired differences ``a - b`` with a percentile bootstrap CI over pairs.

    a, b: ``[n]`` values of the same resamples; pairs with a NaN are dropped.
    Returns ``{mean_diff, ci_low, ci_high, cohens_d, n}``.
    """
    x, y = paired_finite(a, b)
    d = x - y
    lo, hi = bootstrap_ci(d, n_boot=n_boot, level=level, seed=seed)
    return {
        "mean_diff": float(d.mean()) if d.size else float("nan"),
        "ci_low": lo,
        "ci_high": hi,
        "cohens_d": cohens_d(d),
        "n": int(d.size),
    }


def permutation_test(a: Any, b: Any, *, paired: bool = True, n_perm: int = 10000, seed: int = 0) -> float:
    """Two-sided permutation p-value for a difference in means.

    paired=True: sign-flip test on ``a - b`` (NaN pairs dropped).
    paired=False: label shuffle of the pooled values (NaNs dropped per group).
    p = (1 + #{|null| >= |observed|}) / (1 + n_perm), so never 0. NaN if a group is empty.
    """
    rng = np.random.default_rng(seed)
    if paired:
        x, y = paired_finite(a, b)
        d = x - y
        if d.size == 0:
            return float("nan")
        observed = abs(d.mean())
    else:
        x, y = finite(a), finite(b)
        if x.size == 0 or y.size == 0:
            return float("nan")
        pooled = np.concatenate([x, y])
        observed = abs(x.mean() - y.mean())
    tol = 1e-12 * max(1.0, observed)
    hits = 0
    done = 0
    while done < n_perm:
        m = min(_PERM_CHUNK, n_perm - done)
        if paired:
            signs = rng.integers(0, 2, size=(m, d.size)) * 2.0 - 1.0
            null = np.abs((signs * d).mean(axis=1))
        else:
            perm = rng.permuted(np.broadcast_to(pooled, (m, pooled.size)), axis=1)
            null = np.abs(perm[:, : x.size].mean(axis=1) - perm[:, x.size :].mean(axis=1))
        hits += int((null >= observed - tol).sum())
        done += m
    return (1.0 + hits) / (1.0 + n_perm)


def _units(values: Any, groups: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    """``[n, L]`` values without NaN units, their group codes 0..G-1, and whether 1-D."""
    v, one_d = as_columns(values)
    codes = group_codes(groups, v.shape[0])
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
        block = max(1, min(n_boot, BLOCK // (n + n_groups)))
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
