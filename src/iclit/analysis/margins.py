"""Equivalence margins and verdicts: what a test's excess over its null is called.

Each quantity has its margin declared before the run (the spec's ``equivalence_margin``): a
number, or ``"ceiling"`` — a fraction of the excess of the cell's positive control at the same
null, centring and layer. :func:`verdict` reads a test row as above or below its null,
equivalent within the margin, undefined or inconclusive; the tests of
:mod:`iclit.analysis.nulls` and the contrasts of :mod:`iclit.analysis.contrasts` use it alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["QUANTITIES", "DEFAULT_MARGINS", "quantity", "margins", "margin_for", "verdict"]

QUANTITIES = ("raw", "centred", "update", "agreement", "kl", "between")
"""The quantities an equivalence margin is declared for (:func:`margin_for`)."""
DEFAULT_MARGINS: dict[str, Any] = {
    "raw": "ceiling",
    "centred": "ceiling",
    "update": "ceiling",
    "agreement": 0.05,
    "kl": 0.05,
    "between": 0.02,
    "ceiling_fraction": 0.25,
}
"""Cosine margins follow the ceiling rule (``ceiling_fraction`` × the ceiling's excess);
agreement (a proportion) ±0.05, KL ±0.05 nats; ``between``: a difference between two cells
(or two quantities of one cell) of a cosine or of its excess over a null, ±0.02 on the
cosine scale (:func:`iclit.analysis.contrasts.contrast_margin`)."""


def quantity(pair: str, centring: str) -> str:
    """The margin quantity of a cosine row: ``update`` for update pairs (and their ceilings),
    else ``raw`` or ``centred``."""
    if pair == "update" or pair.startswith("update_"):
        return "update"
    return "raw" if centring == "raw" else "centred"


def margins(declared: Any = None) -> dict[str, Any]:
    """The margins of every quantity: :data:`DEFAULT_MARGINS` overlaid with ``declared`` (a
    number: every cosine quantity; a mapping: per quantity, plus ``ceiling_fraction``)."""
    out = dict(DEFAULT_MARGINS)
    if declared is None:
        return out
    if isinstance(declared, Mapping):
        unknown = set(declared) - set(out)
        if unknown:
            raise ValueError(f"unknown margin quantities {sorted(unknown)}; known: {sorted(out)}")
        out.update({k: v for k, v in declared.items() if v is not None})
        return out
    value = float(declared)
    return out | {"raw": value, "centred": value, "update": value}


def margin_for(declared: Mapping[str, Any], quantity_: str, ceiling_diff: Any = np.nan) -> Any:
    """The margin of one quantity: the declared number, or for ``"ceiling"`` the declared
    ``ceiling_fraction`` of the ceiling's excess (NaN where there is no positive ceiling, so no
    equivalence can be claimed). Scalar or per-layer array like ``ceiling_diff``."""
    value = declared[quantity_]
    if value == "ceiling":
        c = np.asarray(ceiling_diff, dtype=np.float64)
        return np.where(c > 0, float(declared["ceiling_fraction"]) * c, np.nan)
    return np.full(np.shape(ceiling_diff), float(value)) if np.ndim(ceiling_diff) else float(value)


def verdict(
    diff_low: float,
    diff_high: float,
    p: float,
    equivalent: bool,
    alpha: float = 0.05,
    *,
    se: float = 1.0,
    margin: float = np.nan,
) -> str:
    """``above null`` / ``below null`` when the adjusted p is below alpha and the CI excludes
    0; ``equivalent within ±m`` when the TOST's CI lies inside ±margin; ``undefined`` when the
    contrast does not vary between blocks (se 0 or NaN: no evidence either way); otherwise
    ``inconclusive``. Never "zero": equivalence is only ever within the declared margin."""
    if not (np.isfinite(se) and se > 0):
        return "undefined"
    if np.isfinite(p) and p < alpha and (diff_low > 0 or diff_high < 0):
        return "above null" if diff_low > 0 else "below null"
    if equivalent:
        return f"equivalent within ±{margin:.3g}" if np.isfinite(margin) else "equivalent"
    return "inconclusive"
