"""Summary of the label-sensitivity diagnostic (:mod:`iclit.engine.diagnose`), from its
per-query correctness alone (no model).

Units are demonstration sets: each set's accuracy is the mean over its queries, and every
interval and test is over sets — a one-sample t interval and the t test on the per-set
differences, which agree by construction (the 95% interval excludes 0 exactly when p < 0.05).
Verdict on ``gold - flipped``: ``reads labels`` when the interval lies above 0, ``ignores
labels`` when it lies inside ``±margin`` (equivalence at the declared margin, TOST),
``inconclusive`` otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import stats as sps

__all__ = ["MARGIN", "label_sensitivity_summary"]

MARGIN = 0.1
"""Declared before any run: an accuracy drop from gold to flipped labels smaller than this
(on the 0–1 accuracy scale) counts as 'ignores labels' when the equivalence test says so."""


def _interval(per_set: np.ndarray, level: float) -> tuple[float, float, float, float]:
    """(mean, low, high, two-sided p of mean = 0) of per-set values: t with S - 1 df."""
    s = per_set.size
    mean = float(per_set.mean())
    if s < 2:
        return mean, float("nan"), float("nan"), float("nan")
    se = float(per_set.std(ddof=1) / np.sqrt(s))
    if se == 0.0:
        return mean, mean, mean, (1.0 if mean == 0.0 else 0.0)
    half = float(sps.t.ppf(0.5 + level / 2, s - 1)) * se
    p = float(2 * sps.t.sf(abs(mean) / se, s - 1))
    return mean, mean - half, mean + half, p


def label_sensitivity_summary(
    correct: Mapping[str, Any], zero_shot: Any | None = None, *, level: float = 0.95, margin: float = MARGIN
) -> dict[str, Any]:
    """Accuracies and contrasts of the diagnostic.

    Parameters
    ----------
    correct
        Condition (``gold``, ``flipped``, ``random``) → ``[sets, queries]`` 0/1 correctness.
    zero_shot
        ``[sets, queries]`` correctness of the query alone, or None.
    level
        Confidence level of the intervals.
    margin
        Equivalence margin of ``gold - flipped`` (:data:`MARGIN`).

    Returns
    -------
    dict
        ``accuracy``: condition → {mean, ci_low, ci_high}; ``contrasts``: ``gold-flipped`` and
        ``gold-random`` → {mean, ci_low, ci_high, p}; ``verdict``; ``sets``; ``queries``.
    """
    per_set = {c: np.asarray(v, dtype=float).reshape(len(v), -1).mean(axis=1) for c, v in correct.items()}
    if zero_shot is not None:
        per_set["zero_shot"] = np.asarray(zero_shot, dtype=float).reshape(len(zero_shot), -1).mean(axis=1)
    accuracy = {}
    for c, v in per_set.items():
        mean, lo, hi, _ = _interval(v, level)
        accuracy[c] = {"mean": mean, "ci_low": lo, "ci_high": hi}
    contrasts = {}
    for other in ("flipped", "random"):
        if "gold" in per_set and other in per_set:
            mean, lo, hi, p = _interval(per_set["gold"] - per_set[other], level)
            contrasts[f"gold-{other}"] = {"mean": mean, "ci_low": lo, "ci_high": hi, "p": p}
    verdict = "inconclusive"
    drop = contrasts.get("gold-flipped")
    if drop is not None:
        eq_level = 1 - 2 * (1 - level)  # TOST at alpha = 1 - level: its (1 - 2 alpha) interval inside ±margin
        _, lo_eq, hi_eq, _ = _interval(per_set["gold"] - per_set["flipped"], eq_level)
        if drop["ci_low"] > 0:
            verdict = "reads labels"
        elif -margin < lo_eq and hi_eq < margin:
            verdict = "ignores labels"
    first = next(iter(correct.values()))
    arr = np.asarray(first)
    return {
        "accuracy": accuracy,
        "contrasts": contrasts,
        "verdict": verdict,
        "margin": margin,
        "sets": int(arr.shape[0]),
        "queries": int(arr.size // max(1, arr.shape[0])),
    }
