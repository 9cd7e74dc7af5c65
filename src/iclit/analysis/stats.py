"""Statistics over resamples: bootstrap CIs, summaries, paired comparisons.

All functions take 1-D value arrays (one value per resample; numpy, lists or CPU
tensors), ignore NaNs, and are vectorised over bootstrap draws / permutations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

_PERM_CHUNK = 2000  # permutations per vectorised block (bounds memory to ~chunk * n)


def _as_1d(values: Any) -> np.ndarray:
    if type(values).__module__.startswith("torch"):
        values = values.detach().cpu().double().numpy()
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    return x


def _finite(values: Any) -> np.ndarray:
    x = _as_1d(values)
    return x[~np.isnan(x)]


def _paired(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_1d(a), _as_1d(b)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal lengths ({a.size} vs {b.size})")
    keep = ~(np.isnan(a) | np.isnan(b))
    return a[keep], b[keep]


def bootstrap_ci(
    values: Any, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean, NaNs dropped.

    One ``rng.integers`` draw of shape ``[n_boot, n]``. n == 1 gives ``(v, v)``;
    n == 0 gives ``(nan, nan)``.
    """
    x = _finite(values)
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


def summarize(values: Any, groups: Any = None, **kw: Any) -> dict[str, float | int]:
    """``{mean, std, ci_low, ci_high, n}`` of the non-NaN values.

    std uses ddof=1 (0.0 for n == 1). groups: one label per value, the independent units the
    values nest in (a crossed cell's query blocks): the CI is then the t interval over the
    groups' means (:func:`iclit.analysis.inference.cluster_mean`); without groups, values are
    taken as independent and ``kw`` goes to :func:`bootstrap_ci`.
    """
    x_all = _as_1d(values)
    x = x_all[~np.isnan(x_all)]
    n = int(x.size)
    mean = float(x.mean()) if n else float("nan")
    std = float(x.std(ddof=1)) if n > 1 else (0.0 if n == 1 else float("nan"))
    if groups is not None and n:
        from iclit.analysis.inference import cluster_mean

        lo, hi = cluster_mean(x_all, groups).ci(0.95)
    else:
        lo, hi = bootstrap_ci(x, **kw)
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
        d = _finite(a)
    else:
        x, y = _paired(a, b)
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
    x, y = _paired(a, b)
    d = x - y
    lo, hi = bootstrap_ci(d, n_boot=n_boot, level=level, seed=seed)
    return {
        "mean_diff": float(d.mean()) if d.size else float("nan"),
        "ci_low": lo,
        "ci_high": hi,
        "cohens_d": cohens_d(d),
        "n": int(d.size),
    }


def permutation_test(
    a: Any, b: Any, *, paired: bool = True, n_perm: int = 10000, seed: int = 0
) -> float:
    """Two-sided permutation p-value for a difference in means.

    paired=True: sign-flip test on ``a - b`` (NaN pairs dropped).
    paired=False: label shuffle of the pooled values (NaNs dropped per group).
    p = (1 + #{|null| >= |observed|}) / (1 + n_perm), so never 0. NaN if a group is empty.
    """
    rng = np.random.default_rng(seed)
    if paired:
        x, y = _paired(a, b)
        d = x - y
        if d.size == 0:
            return float("nan")
        observed = abs(d.mean())
    else:
        x, y = _finite(a), _finite(b)
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
