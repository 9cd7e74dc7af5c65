"""The report's section on the nulls: per cell, each pair at the last layer against its
query-swap and demo-swap nulls (:mod:`iclit.analysis.nulls`), the whole-cell geometry
(debiased CKA, RSA) and the behaviour beside them (agreement, KL), as plain table data for
``templates/report.html.j2``."""

from __future__ import annotations

from typing import Any

import pandas as pd

from iclit.analysis.nulls import CEILINGS, PAIR_NAMES
from iclit.analysis.rundata import RunData
from iclit.report.causal import MAX_CELLS, cell_title

__all__ = ["CONTROL_PAIRS", "PAIR_TEXT", "nulls_section", "pair_text", "tested_cells"]

CONTROL_PAIRS = frozenset(CEILINGS) | {f"update_{pair}" for pair in CEILINGS}
"""The positive controls among :data:`iclit.analysis.nulls.PAIR_NAMES`."""


def pair_text(pair: str, control: str = "control") -> str:
    """``pair``'s name in a table, a positive control marked "(``control``)"; an unknown pair as is."""
    name = PAIR_NAMES.get(pair, pair)
    return f"{name} ({control})" if pair in CONTROL_PAIRS else name


PAIR_TEXT = {pair: pair_text(pair) for pair in PAIR_NAMES}
"""A test pair's name in the HTML report's tables, the console and the forest plot."""
_DIFF = "{:+#.3g}"


def _p(value: Any) -> dict[str, Any]:
    """A p-value cell (:func:`iclit.report.numbers.pvalue`: "< 0.001" below that)."""
    return {"kind": "p", "value": value}


def _num(value: Any, fmt: str = "{:.3f}") -> dict[str, Any]:
    return {"kind": "num", "value": value, "fmt": fmt}


def _ci(mean: float, lo: float, hi: float) -> dict[str, Any]:
    """An excess with its interval, signed to three significant digits ("–" where a bound is missing)."""
    return {"kind": "ci", "mean": mean, "lo": lo, "hi": hi, "fmt": _DIFF}


def _tests_table(t: pd.DataFrame) -> dict[str, Any]:
    rows = [
        [
            {"kind": "text", "value": PAIR_TEXT.get(r.pair, r.pair)},
            {"kind": "text", "value": r.centring},
            {"kind": "text", "value": r.null.replace("_", "-")},
            _num(r.observed),
            _num(r.null_mean),
            _ci(r.diff, r.ci_low, r.ci_high),
            _p(r.p),
            _p(r.p_min),
            _p(r.p_adj),
            _p(r.p_holm),
            _ci(r.diff, r.tost_low, r.tost_high),
            _num(r.margin, "±{:#.3g}"),
            _num(r.fraction, "{:+.2f}"),
            {"kind": "text", "value": r.verdict},
        ]
        for r in t.itertuples()
    ]
    return {
        "head": [
            "pair",
            "centring",
            "null",
            "observed",
            "null",
            "excess [95% CI]",
            "p",
            "smallest p",
            "p max-T",
            "p Holm",
            "TOST 90% CI",
            "margin",
            "of ceiling",
            "verdict",
        ],
        "rows": rows,
        "cls": None,
        "name": "tests",
    }


def _geometry_table(g: pd.DataFrame) -> dict[str, Any]:
    rows = [
        [
            {"kind": "text", "value": PAIR_TEXT.get(r.pair, r.pair)},
            {"kind": "text", "value": r.measure},
            {"kind": "text", "value": str(getattr(r, "null", "")).replace("_", "-")},
            _num(r.value),
            _num(r.null_mean),
            _p(r.p),
            _p(r.p_adj),
            _num(r.n, "{:.0f}"),
        ]
        for r in g.itertuples()
    ]
    return {
        "head": ["pair", "measure", "null", "value", "null mean", "p", "p max-T", "n"],
        "rows": rows,
        "cls": None,
        "name": "geometry",
    }


def _behaviour_table(b: pd.DataFrame) -> dict[str, Any]:
    rows = [
        [
            {"kind": "text", "value": r.pair.replace("_", "–")},
            {"kind": "text", "value": r.measure},
            {"kind": "text", "value": r.null.replace("_", "-")},
            _num(r.observed, "{:#.3g}"),
            _num(r.null_mean, "{:#.3g}"),
            _ci(r.diff, r.ci_low, r.ci_high),
            _p(r.p_holm),
            {"kind": "text", "value": r.verdict or ""},
        ]
        for r in b.itertuples()
    ]
    return {
        "head": ["arms", "measure", "null", "observed", "null", "diff [95% CI]", "p Holm", "verdict"],
        "rows": rows,
        "cls": None,
        "name": "behaviour",
    }


def tested_cells(run: RunData) -> list[str]:
    """The cells with nulls' tests, in the plan's order (then the store's)."""
    tested = set(run.tests["cell_key"])
    planned = [c["key"] for c in (run.plan or {}).get("cells", []) if isinstance(c, dict) and "key" in c]
    return [k for k in dict.fromkeys([*planned, *run.tests["cell_key"]]) if k in tested]


def nulls_section(run: RunData) -> dict[str, Any] | None:
    """Per cell (at most :data:`~iclit.report.causal.MAX_CELLS`): the last layer's tests (raw
    and task-anchor-centred), geometry and behaviour; None when no cell has a null."""
    if run.frame.empty or run.tests.empty:
        return None
    tests, geometry, behaviour = run.tests, run.geometry, run.behaviour
    factors = list((run.plan or {}).get("factors", {}))
    labels = run.outputs.drop_duplicates("cell_key").set_index("cell_key")
    cells = tested_cells(run)
    out = []
    for cell in cells[:MAX_CELLS]:
        cell_tests = tests[tests["cell_key"] == cell]
        last = int(cell_tests["layer"].max())  # the cell's own depth (cells of other models differ)
        t = cell_tests[(cell_tests["layer"] == last) & cell_tests["centring"].isin(["raw", "anchor"])]
        entry: dict[str, Any] = {
            "heading": cell_title(labels.loc[cell].to_dict() if cell in labels.index else {}, factors),
            "tables": [_tests_table(t)],
        }
        g = geometry[(geometry["cell_key"] == cell) & (geometry["layer"] == last)] if len(geometry) else geometry
        if len(g):
            entry["tables"].append(_geometry_table(g))
        b = behaviour[behaviour["cell_key"] == cell] if len(behaviour) else behaviour
        if len(b):
            entry["tables"].append(_behaviour_table(b))
        out.append(entry)
    more = f"{len(cells) - MAX_CELLS} more cells: iclit results RUN --tests" if len(cells) > MAX_CELLS else None
    return {"cells": out, "layer": last, "more": more}
