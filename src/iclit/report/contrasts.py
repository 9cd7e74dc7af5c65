"""The report's table of between-cell contrasts (:func:`iclit.analysis.contrasts.cell_contrasts`:
each factor value against the reference value, query blocks as units), as plain table data for
``templates/report.html.j2``."""

from __future__ import annotations

from typing import Any

from iclit.analysis.contrasts import PAIR_LABELS, cell_contrasts
from iclit.analysis.rundata import RunData

__all__ = ["contrasts_section"]


_DIFF = "{:+#.3g}"


def _num(value: Any, fmt: str = "{:#.3g}") -> dict[str, Any]:
    return {"kind": "num", "value": value, "fmt": fmt}


def _p(value: Any) -> dict[str, Any]:
    return {"kind": "p", "value": value}


def _diff(mean: float, lo: float, hi: float) -> dict[str, Any]:
    """A difference with its interval, signed to three significant digits."""
    return {"kind": "ci", "mean": mean, "lo": lo, "hi": hi, "fmt": _DIFF}


def contrasts_section(run: RunData) -> dict[str, Any] | None:
    """The contrasts table (last layer of each cell), or None without a factor of two or more
    values or without stored states."""
    if run.frame.empty or not any(len(v) > 1 for v in (run.plan or {}).get("factors", {}).values()):
        return None
    table = cell_contrasts(run)
    if table.empty:
        return None
    rows = [
        [
            {"kind": "text", "value": r.factor},
            {"kind": "text", "value": f"{r.level_a} vs {r.level_b}"},
            {"kind": "text", "value": PAIR_LABELS.get(r.pair, r.pair)},
            {"kind": "text", "value": r.quantity.replace("_", "-")},
            _num(r.mean_a, "{:.3f}"),
            _num(r.mean_b, "{:.3f}"),
            _diff(r.diff, r.ci_low, r.ci_high),
            _p(r.p),
            _p(r.p_holm),
            _num(r.margin, "±{:#.3g}"),
            _diff(r.diff, r.tost_low, r.tost_high),
            _p(r.p_tost),
            {"kind": "text", "value": r.verdict},
            {"kind": "text", "value": f"{r.n_blocks_a} / {r.n_blocks_b} ({'paired' if r.paired else 'Welch'})"},
        ]
        for r in table.itertuples()
    ]
    head = [
        "factor",
        "levels",
        "pair",
        "quantity",
        "mean a",
        "mean b",
        "a − b [95% CI]",
        "p",
        "p Holm",
        "margin",
        "TOST 90% CI",
        "TOST p",
        "verdict",
        "blocks",
    ]
    return {"table": {"head": head, "rows": rows, "cls": None}}
