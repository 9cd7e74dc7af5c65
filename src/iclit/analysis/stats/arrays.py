"""Array conversions shared by the statistics: one float64 converter, unit columns and
group codes, and the numerical constants."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

__all__ = ["BLOCK", "EPS", "TOL", "as_float64", "as_columns", "group_codes", "finite", "paired_finite"]

BLOCK = 1 << 22  # array elements per vectorised resampling block (~32 MB of float64)
TOL = 1e-9  # relative tolerance: a resample this close to the observed statistic is a tie
EPS = 1e-12  # norm clamp of the cosine (as iclit.analysis.similarity: zero vector -> 0)


def as_float64(x: Any) -> np.ndarray:
    """Any array-like (numpy, lists, CPU or GPU torch tensors) as a float64 numpy array."""
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def as_columns(values: Any) -> tuple[np.ndarray, bool]:
    """``[n]`` or ``[n, L]`` values as float64 ``[n, L]``, and whether they were 1-D."""
    v = as_float64(values)
    if v.ndim not in (1, 2):
        raise ValueError(f"values must be [n] or [n, L], got shape {v.shape}")
    return (v[:, None], True) if v.ndim == 1 else (v, False)


def group_codes(groups: Any, n: int) -> np.ndarray:
    """Integer codes 0..G-1 of any hashable labels (tuples included) ``[n]``."""
    if isinstance(groups, np.ndarray) and groups.ndim == 1:
        labels: Any = groups
    else:
        labels = pd.Series(list(groups), dtype=object)
    if len(labels) != n:
        raise ValueError(f"groups has {len(labels)} labels for {n} units")
    codes, _ = pd.factorize(labels, use_na_sentinel=False)
    return np.asarray(codes, dtype=np.int64)


def finite(values: Any) -> np.ndarray:
    """The non-NaN values, flattened, as float64."""
    x = as_float64(values).reshape(-1)
    return x[~np.isnan(x)]


def paired_finite(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """Two flattened float64 arrays of equal length without the pairs that have a NaN."""
    a, b = as_float64(a).reshape(-1), as_float64(b).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal lengths ({a.size} vs {b.size})")
    keep = ~(np.isnan(a) | np.isnan(b))
    return a[keep], b[keep]
