"""The report's causal section: patching and steering per layer, with 95% CI bands over sets.

Drawn from :mod:`iclit.analysis.causal`'s tables (nothing here computes a statistic), in the
style of :mod:`iclit.report.figures` (Agg canvas, PNG as base64). :func:`causal_section`
arranges them as plain data for ``templates/report.html.j2`` (one figure pair and two tables
per cell that ran ``analyses``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from iclit.analysis.causal import BASE_OF, CONTRASTS, has_causal, patch_table, steer_table
from iclit.analysis.rundata import RunData
from iclit.report.figures import PairStyle, new_figure, png_base64
from iclit.report.numbers import interval, pvalue

__all__ = ["CAUSAL_STYLE", "MAX_CELLS", "cell_title", "cell_titles", "patch_figure", "steer_figure", "causal_section"]

MAX_CELLS = 8
"""Cells drawn in the report (the tables of every cell: ``iclit results RUN --metric patch``)."""

CAUSAL_STYLE: dict[str, PairStyle] = {
    # patches (iclit.engine.causal.PATCH_KINDS)
    "icl_into_anchor": PairStyle("ICL state → anchor run", "tab:blue"),
    "it_into_anchor": PairStyle("IT state → anchor run", "tab:orange"),
    "icl_into_it": PairStyle("ICL state → tuned model's run", "tab:green"),
    "it_into_icl": PairStyle("IT state → ICL run", "tab:red"),
    # steering vectors and their nulls
    "icl": PairStyle("ICL vector (mean ICL − anchor)", "tab:blue"),
    "it": PairStyle("IT vector (mean IT − anchor)", "tab:orange"),
    "random_icl": PairStyle("random, norm of the ICL vector (null)", "tab:blue", ":"),
    "random_it": PairStyle("random, norm of the IT vector (null)", "tab:orange", ":"),
    # the unpatched runs (horizontal lines)
    "anchor_run": PairStyle("anchor run", "tab:gray", "--"),
    "icl_run": PairStyle("ICL run (ceiling)", "black", "--"),
    "it_run": PairStyle("IT run", "tab:brown", "-."),
}
"""kind / vector → (legend label, colour, line style): the causal analyses' part of the style table."""

_MEASURE_TEXT = {
    "frac_icl": "fraction of the way to ICL's behaviour",
    "frac_it": "fraction of the way to IT's behaviour",
    "accuracy": "accuracy",
    "logp": "log p(gold's first token)",
    "kl_icl": "KL(ICL ‖ run)",
    "kl_it": "KL(IT ‖ run)",
}


def _band(ax: Any, rows: pd.DataFrame, style: PairStyle) -> None:
    rows = rows.sort_values("layer")
    if not len(rows):
        return
    x = rows["layer"].to_numpy(dtype=float)
    ax.plot(
        x,
        rows["value"],
        color=style.colour,
        linestyle=style.linestyle,
        marker="o",
        markersize=3,
        linewidth=1.6,
        label=style.label,
    )
    ax.fill_between(
        x,
        rows["ci_low"].to_numpy(dtype=float),
        rows["ci_high"].to_numpy(dtype=float),
        color=style.colour,
        alpha=0.15,
        linewidth=0,
    )


def _level(ax: Any, table: pd.DataFrame, column: str, run: str, measure: str) -> None:
    """The unpatched run's value as a horizontal line."""
    hit = table[(table[column] == f"{run}_run") & table["layer"].isna() & (table["measure"] == measure)]
    if len(hit) and np.isfinite(float(hit["value"].iloc[0])):
        style = CAUSAL_STYLE[f"{run}_run"]
        ax.axhline(
            float(hit["value"].iloc[0]), color=style.colour, linestyle=style.linestyle, linewidth=1.0, label=style.label
        )


FRACTION_FLOOR = -2.0
"""Fraction panels are cut below this (a patch that moves far away from an arm; the tables hold the numbers)."""


def _axes(ax: Any, title: str, ylabel: str | None, layers: list[int], fraction: bool) -> None:
    if fraction:
        ax.axhline(0.0, color="tab:gray", linewidth=0.8)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        low, high = ax.get_ylim()
        if low < FRACTION_FLOOR:
            ax.set_ylim(FRACTION_FLOOR, max(high, 1.1))
            title += f" (cut at {FRACTION_FLOOR:g})"
    ax.set_title(title, fontsize="small")
    ax.set_xlabel("state index (0 = embeddings)", fontsize="small")
    if ylabel:
        ax.set_ylabel(ylabel, fontsize="small")
    if 0 < len(layers) <= 12:
        ax.set_xticks(layers)
        ax.set_xlim(min(layers) - 0.5, max(layers) + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)


def _layers(table: pd.DataFrame) -> list[int]:
    return sorted({int(li) for li in table["layer"].dropna()})


def _panels(table: pd.DataFrame) -> list[str]:
    classification = (table["measure"] == "accuracy").any()
    return ["frac_icl", "frac_it", "accuracy" if classification else "logp"]


def patch_figure(table: pd.DataFrame, title: str) -> str:
    """One cell's patching: per layer, the fractions of the way to ICL's and to IT's behaviour
    and the accuracy (or log p), one line per patch with its 95% CI band; the unpatched runs as
    horizontal lines. ``table``: one cell's rows of :func:`iclit.analysis.causal.patch_table`."""
    panels = _panels(table)
    fig = new_figure(4.0 * len(panels) + 0.6, 3.6)
    for j, measure in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), j + 1)
        for kind, base in BASE_OF.items():
            if measure == f"frac_{base}":
                continue  # no distance to close towards the run patched into
            _band(ax, table[(table["kind"] == kind) & (table["measure"] == measure)], CAUSAL_STYLE[kind])
        if not measure.startswith("frac"):
            for run in ("anchor", "icl", "it"):
                _level(ax, table, "kind", run, measure)
        _axes(ax, _MEASURE_TEXT[measure], None, _layers(table), measure.startswith("frac"))
        ax.legend(fontsize="x-small", frameon=False, loc="best")
    fig.suptitle(title, fontsize="medium")
    return png_base64(fig)


def steer_figure(table: pd.DataFrame, title: str) -> str:
    """One cell's steering: rows of panels per measure (fraction of the way to ICL's and to
    IT's behaviour, accuracy or log p), one column per scale; per layer one line per vector
    (ICL, IT and their same-norm random nulls) with its 95% CI band."""
    panels = _panels(table)
    scales = sorted(float(a) for a in table["scale"].dropna().unique())
    fig = new_figure(3.3 * len(scales) + 0.6, 2.8 * len(panels) + 0.6)
    layers = _layers(table)
    for r, measure in enumerate(panels):
        for c, scale in enumerate(scales):
            ax = fig.add_subplot(len(panels), len(scales), r * len(scales) + c + 1)
            for vector in ("icl", "it", "random_icl", "random_it"):
                rows = table[(table["vector"] == vector) & (table["measure"] == measure) & (table["scale"] == scale)]
                _band(ax, rows, CAUSAL_STYLE[vector])
            if not measure.startswith("frac"):
                for run in ("anchor", "icl", "it"):
                    _level(ax, table, "vector", run, measure)
            _axes(
                ax, f"scale {scale:g}", _MEASURE_TEXT[measure] if c == 0 else None, layers, measure.startswith("frac")
            )
            if c == 0 and r in (0, len(panels) - 1):
                ax.legend(fontsize="x-small", frameon=False, loc="best")
    fig.suptitle(title, fontsize="medium")
    return png_base64(fig)


# ------------------------------------------------------------------ plain data for the template


def _ci(row: Mapping[str, Any] | None, fmt: str = "{:.3f}") -> dict[str, Any]:
    if row is None or not np.isfinite(row["value"]):
        return {"kind": "none"}
    if not (np.isfinite(row["ci_low"]) and np.isfinite(row["ci_high"])):
        return {"kind": "num", "value": float(row["value"]), "fmt": fmt}
    return {
        "kind": "ci",
        "mean": float(row["value"]),
        "lo": float(row["ci_low"]),
        "hi": float(row["ci_high"]),
        "fmt": fmt,
    }


def _lookup(table: pd.DataFrame, column: str) -> dict[tuple, Mapping[str, Any]]:
    keys = [column, "layer", "measure"] + (["scale"] if "scale" in table.columns else [])
    out = {}
    for row in table.to_dict("records"):
        layer = None if pd.isna(row["layer"]) else int(row["layer"])
        key = (row[column], layer, row["measure"]) + (
            (None if pd.isna(row["scale"]) else float(row["scale"]),) if "scale" in keys else ()
        )
        out[key] = row
    return out


def _patch_rows(table: pd.DataFrame) -> dict[str, Any]:
    get = _lookup(table, "kind")
    classification = (table["measure"] == "accuracy").any()
    score = "accuracy" if classification else "logp"
    cols = [
        ("it_into_anchor", "frac_icl"),
        ("icl_into_anchor", "frac_icl"),
        ("icl_into_it", "frac_icl"),
        ("it_into_anchor", "frac_it"),
        ("it_into_icl", "frac_it"),
        ("it_into_anchor", score),
        ("icl_into_anchor", score),
    ]
    head = ["state index", *(f"{CAUSAL_STYLE[k].label}: {_MEASURE_TEXT[m]}" for k, m in cols)]
    layers = sorted({int(li) for li in table["layer"].dropna()})
    rows = [[{"kind": "text", "value": str(li)}, *(_ci(get.get((k, li, m))) for k, m in cols)] for li in layers]
    ref = [{"kind": "text", "value": f"unpatched runs, {_MEASURE_TEXT[score]}"}]
    ref += [{"kind": "text", "value": ""}] * 5 + [
        _ci(get.get(("it_run", None, score))),
        _ci(get.get(("icl_run", None, score))),
    ]
    rows.append(ref)
    return {"cls": "causal", "head": head, "rows": rows}


def _steer_rows(table: pd.DataFrame) -> dict[str, Any]:
    """Per layer × scale: IT vector − random on (KL to ICL, accuracy), ICL vector − random on KL to IT."""
    get = _lookup(table, "vector")
    classification = (table["measure"] == "accuracy").any()
    cols = (
        [
            ("it-random_it", "kl_icl"),
            ("it-random_it", "accuracy"),
            ("icl-random_icl", "kl_it"),
            ("icl-random_icl", "accuracy"),
        ]
        if classification
        else [("it-random_it", "logp"), ("icl-random_icl", "logp")]
    )
    head = ["state index", "scale", *(f"{v.replace('-', ' − ')}: {_MEASURE_TEXT[m]}" for v, m in cols)]
    rows = []
    pairs = sorted(
        {
            (int(li), float(a))
            for li, a in zip(table["layer"].dropna(), table.loc[table["layer"].notna(), "scale"], strict=True)
        }
    )
    for li, a in pairs:
        cells = [{"kind": "text", "value": str(li)}, {"kind": "text", "value": f"{a:g}"}]
        for v, m in cols:
            row = get.get((v, li, m, a))
            if row is None or not np.isfinite(row["value"]):
                cells.append({"kind": "none"})
                continue
            mark = " *" if np.isfinite(row["p_holm"]) and row["p_holm"] < 0.05 else ""
            cells.append(
                {
                    "kind": "text",
                    "value": f"{interval(row['value'], row['ci_low'], row['ci_high'], '{:+#.3g}')}"
                    f" p = {pvalue(row['p_holm'])}{mark}",
                }
            )
        rows.append(cells)
    return {"cls": "causal", "head": head, "rows": rows}


def cell_title(labels: Mapping[str, Any], factors: list[str]) -> str:
    """A cell's heading: its factors' values (``k = 2, wrong_labels = 0.0``), "all trials" without factors."""
    shown = [f"{f} = {labels[f]}" for f in factors if f in labels]
    return ", ".join(shown) if shown else "all trials"


def cell_titles(run: RunData) -> dict[str, str]:
    """cell_key → :func:`cell_title` for every cell with a stored output, in the store's order."""
    factors = list((run.plan or {}).get("factors", {}))
    if run.outputs.empty:
        return {}
    labels = run.outputs.drop_duplicates("cell_key").set_index("cell_key")
    return {str(key): cell_title(row.to_dict(), factors) for key, row in labels.iterrows()}


def causal_section(run: RunData) -> dict[str, Any] | None:
    """The causal section's data (None when no trial ran ``analyses``): per cell (at most
    :data:`MAX_CELLS`) a heading, the patch and steer figures and tables."""
    if not has_causal(run.outputs):
        return None
    patch, steer = patch_table(run), steer_table(run)
    factors = list((run.plan or {}).get("factors", {}))
    cells = list(
        dict.fromkeys(run.outputs.loc[run.outputs["causal"].map(lambda c: isinstance(c, Mapping)), "cell_key"])
    )
    labels = run.outputs.drop_duplicates("cell_key").set_index("cell_key")
    out = []
    for cell in cells[:MAX_CELLS]:
        title = cell_title(labels.loc[cell].to_dict() if cell in labels.index else {}, factors)
        entry: dict[str, Any] = {"heading": title, "images": [], "tables": []}
        p = patch[patch["cell_key"] == cell] if len(patch) else patch
        if len(p):
            entry["images"].append(
                {
                    "alt": f"patching per layer, {title}",
                    "png": patch_figure(p, f"patching per layer ({title}; mean, 95% CI over sets)"),
                }
            )
            entry["tables"].append(_patch_rows(p))
        s = steer[steer["cell_key"] == cell] if len(steer) else steer
        if len(s):
            entry["images"].append(
                {
                    "alt": f"steering per layer, {title}",
                    "png": steer_figure(s, f"steering per layer ({title}; mean, 95% CI over sets)"),
                }
            )
            entry["tables"].append(_steer_rows(s))
        out.append(entry)
    note = (
        f"{len(cells) - MAX_CELLS} more cells: iclit results RUN --metric patch / steer"
        if len(cells) > MAX_CELLS
        else None
    )
    return {"cells": out, "more": note, "contrasts": list(CONTRASTS)}
