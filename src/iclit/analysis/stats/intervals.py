"""Intervals and equivalence over independent groups: the mean of group means with its t
interval, the TOST (Schuirmann 1987) with the same standard error, and a delta-method
interval of a ratio of means."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from iclit.analysis.stats.arrays import as_columns, as_float64, group_codes

__all__ = ["ClusterMean", "TostResult", "cluster_mean", "ratio_ci", "tost"]


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
    v, one_d = as_columns(values)
    gm = pd.DataFrame(v).groupby(group_codes(groups, v.shape[0])).mean()  # [G, L], NaN skipped
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
    v, one_d = as_columns(values)
    marg = np.broadcast_to(as_float64(margin), (v.shape[1],)).astype(np.float64)
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
    a, one_d = as_columns(num)
    b, _ = as_columns(den)
    codes = group_codes(groups, a.shape[0])
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
