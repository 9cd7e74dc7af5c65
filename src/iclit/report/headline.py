"""The report's opening: the headline figure, the forest plot and the short summary of verdicts.

* :func:`overview_figure`: per layer, up to three views side by side: raw cosines,
  anchor-centred cosines and the update cosine cos(ICL − anchor, IT − anchor). In each view
  the ICL–IT pair (the update pair in the third) carries its query-swap and demo-swap nulls as
  bands, and the positive control its line. One row of panels per cell (the first
  :data:`MAX_FIGURE_CELLS`), read from the nulls' tests (:attr:`RunData.tests`) when the run
  has a crossed design; otherwise one row from the per-trial cosines (:attr:`RunData.frame`,
  pooled over cells, mean with a 95% CI over trials), where the centred and update views
  appear when the spec stored those baselines.
* :func:`forest_figure`: at each cell's last layer, each pair's excess over each null with
  its 95% CI, a line at 0 and the ±margin band; positive controls hollow.
* :func:`headline_section`: both images and the summary table (per cell: ICL–IT raw and
  anchor-centred and the update, each against both nulls, with the positive control's
  verdict) as plain data for ``templates/report.html.j2``.

Nothing here computes a statistic: the figures draw :mod:`iclit.analysis`'s tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from iclit.analysis.cells import last_layer_rows
from iclit.analysis.factors import layer_summaries
from iclit.analysis.rundata import RunData
from iclit.report.causal import MAX_CELLS, cell_titles
from iclit.report.figures import (
    MARGIN_COLOUR,
    NULL_STYLE,
    PAIR_STYLE,
    ROLE_MARKER,
    new_figure,
    pair_style,
    png_base64,
)
from iclit.report.nulls import PAIR_TEXT, tested_cells
from iclit.report.numbers import interval, pvalue

__all__ = [
    "DIFF",
    "MAX_FIGURE_CELLS",
    "VIEWS",
    "forest_figure",
    "forest_rows",
    "headline_section",
    "layer_curves",
    "overview_figure",
]

MAX_FIGURE_CELLS = 4
"""Cells drawn as rows of the headline figure (the forest plot and the tables show up to
:data:`~iclit.report.causal.MAX_CELLS`)."""

VIEWS: dict[str, str] = {
    "raw": "raw cosine",
    "centred": "anchor-centred cosine",
    "update": "update cosine: ICL − anchor vs IT − anchor",
}
"""The headline figure's views (columns) and the forest plot's blocks, in order."""

DIFF = "{:+#.3g}"
"""How an excess or a difference is written: signed, three significant digits."""

_NULL_PAIR = {"raw": "icl_it", "centred": "icl_it", "update": "update"}
"""The pair whose nulls each view draws as bands."""
_CONTROLS = {"icl_it": ("ceiling_it", "ceiling_icl"), "update": ("update_ceiling_it", "update_ceiling_icl")}
_FRAME_PAIRS = {
    "anchor_icl": ("raw", "anchor_icl"),
    "anchor_it": ("raw", "anchor_it"),
    "icl_it": ("raw", "icl_it"),
    "it_it_seed": ("raw", "ceiling_it"),
    "icl_icl_order": ("raw", "ceiling_icl"),
    "anchor_icl_centered": ("centred", "anchor_icl"),
    "anchor_it_centered": ("centred", "anchor_it"),
    "icl_it_centered": ("centred", "icl_it"),
    "update_cosine": ("update", "update"),
}
"""Per-trial pairs of the frame → (view, the test pair whose style they take)."""
_CURVE_COLUMNS = ["row", "view", "pair", "layer", "mean", "ci_low", "ci_high"]
_NULL_COLUMNS = ["row", "view", "null", "layer", "mean", "low", "high"]


def _cells(run: RunData, limit: int) -> list[str]:
    return tested_cells(run)[:limit]


def _view(centring: str, pair: str) -> str | None:
    """The view of a test row: raw and anchor-centred pairs, and the update (its own centring)."""
    if pair.startswith("update"):
        return "update" if centring == "raw" else None
    return {"raw": "raw", "anchor": "centred"}.get(centring)


# ------------------------------------------------------------------ the tables the figures draw


def layer_curves(run: RunData) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(curves, nulls, row titles) of the headline figure.

    curves: ``row, view, pair, layer, mean, ci_low, ci_high`` (the CI is NaN for a cell's
    observed value); nulls: ``row, view, null, layer, mean, low, high``, the null's mean and
    observed − the excess's 95% CI (so that the curve lies outside the band exactly when the
    CI excludes 0). ``row`` indexes the titles."""
    tests = run.tests if not run.frame.empty else pd.DataFrame()
    curves: list[dict[str, Any]] = []
    nulls: list[dict[str, Any]] = []
    if len(tests):
        titles = cell_titles(run)
        keys = _cells(run, MAX_FIGURE_CELLS)
        for i, key in enumerate(keys):
            for r in tests[tests["cell_key"] == key].itertuples():
                view = _view(r.centring, r.pair)
                if view is None:
                    continue
                curves.append(
                    {
                        "row": i,
                        "view": view,
                        "pair": r.pair,
                        "layer": r.layer,
                        "mean": r.observed,
                        "ci_low": np.nan,
                        "ci_high": np.nan,
                    }
                )
                if r.role == "test" and r.pair == _NULL_PAIR[view]:
                    nulls.append(
                        {
                            "row": i,
                            "view": view,
                            "null": r.null,
                            "layer": r.layer,
                            "mean": r.null_mean,
                            "low": r.observed - r.ci_high,
                            "high": r.observed - r.ci_low,
                        }
                    )
        rows = [titles.get(k, "all trials") for k in keys]
    else:
        rows = ["all trials"]
        present = [p for p in _FRAME_PAIRS if p in set(run.frame["pair"])] if len(run.frame) else []
        if present:
            for r in layer_summaries(run.frame, None, [], present).itertuples():
                view, pair = _FRAME_PAIRS[r.pair]
                curves.append(
                    {
                        "row": 0,
                        "view": view,
                        "pair": pair,
                        "layer": r.layer,
                        "mean": r.mean,
                        "ci_low": r.ci_low,
                        "ci_high": r.ci_high,
                    }
                )
    curve_df = pd.DataFrame(curves, columns=_CURVE_COLUMNS).drop_duplicates(["row", "view", "pair", "layer"])
    return curve_df, pd.DataFrame(nulls, columns=_NULL_COLUMNS), rows


def forest_rows(run: RunData) -> pd.DataFrame:
    """The forest plot's rows, each cell's last layer (the first :data:`MAX_CELLS` cells):
    ``block`` (a view), ``label``, ``pair``, ``role``, ``null``, ``diff``, ``ci_low``,
    ``ci_high``, ``margin``, ``verdict``. Empty without the nulls' tests."""
    cols = ["block", "label", "pair", "role", "null", "diff", "ci_low", "ci_high", "margin", "verdict"]
    if run.frame.empty or run.tests.empty:
        return pd.DataFrame(columns=cols)
    titles = cell_titles(run)
    tests = last_layer_rows(run.tests)
    keys = _cells(run, MAX_CELLS)
    out = []
    for block in VIEWS:
        for key in keys:
            cell = tests[tests["cell_key"] == key]
            order = [p for p in PAIR_STYLE if p in set(cell["pair"])]  # tests first, then their controls
            for pair in sorted(order, key=lambda p: ("ceiling" in p, order.index(p))):
                for r in cell[cell["pair"] == pair].itertuples():
                    if _view(r.centring, r.pair) != block:
                        continue
                    label = PAIR_TEXT.get(pair, pair) + (f" · {titles[key]}" if len(keys) > 1 and key in titles else "")
                    out.append(
                        {
                            "block": block,
                            "label": label,
                            "pair": pair,
                            "role": r.role,
                            "null": r.null,
                            "diff": r.diff,
                            "ci_low": r.ci_low,
                            "ci_high": r.ci_high,
                            "margin": r.margin,
                            "verdict": r.verdict,
                        }
                    )
    return pd.DataFrame(out, columns=cols)


# ------------------------------------------------------------------ figures


def _legend(fig: Any, axes: Sequence[Any], extra: Sequence[tuple[Any, str]] = ()) -> None:
    """One legend under the figure, each label once."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    for handle, label in extra:
        seen.setdefault(label, handle)
    if seen:
        fig.legend(
            list(seen.values()),
            list(seen.keys()),
            loc="outside lower center",
            ncols=min(3, len(seen)),
            frameon=False,
            fontsize="small",
        )


def _draw_view(ax: Any, curves: pd.DataFrame, nulls: pd.DataFrame) -> None:
    for null, band_style in NULL_STYLE.items():
        band = nulls[nulls["null"] == null].sort_values("layer")
        if len(band):
            ax.fill_between(
                band["layer"],
                band["low"],
                band["high"],
                color=band_style.colour,
                alpha=0.22,
                linewidth=0,
                label=f"{band_style.label} (band: 95% CI of the excess)",
            )
            ax.plot(band["layer"], band["mean"], color=band_style.colour, linestyle=band_style.linestyle, linewidth=1.1)
    for pair in [p for p in PAIR_STYLE if p in set(curves["pair"])]:
        r = curves[curves["pair"] == pair].sort_values("layer")
        label, colour, style = pair_style(pair)
        if pair.startswith("update_"):  # the update view's control reads as the control
            label = pair_style(pair.removeprefix("update_")).label
        ax.plot(
            r["layer"], r["mean"], color=colour, linestyle=style, marker="o", markersize=3.5, linewidth=1.8, label=label
        )
        if r["ci_low"].notna().any():
            ax.fill_between(r["layer"], r["ci_low"], r["ci_high"], color=colour, alpha=0.18, linewidth=0)


def overview_figure(curves: pd.DataFrame, nulls: pd.DataFrame, rows: Sequence[str], title: str) -> str:
    """The headline figure: one column per view of :data:`VIEWS` present in ``curves``, one
    row per entry of ``rows``; curves and null bands as :func:`layer_curves` returns them.
    Returns the PNG as base64 text."""
    views = [v for v in VIEWS if (curves["view"] == v).any()]
    n_rows, n_cols = max(1, len(rows)), max(1, len(views))
    fig = new_figure(max(10.0, 3.9 * n_cols + 1.2), 2.9 * n_rows + 1.5)
    axes: list[Any] = []
    for i in range(n_rows):
        for j, view in enumerate(views):
            top = axes[j] if i else None
            ax = fig.add_subplot(n_rows, n_cols, i * n_cols + j + 1, sharex=axes[0] if axes else None, sharey=top)
            axes.append(ax)
            here = (curves["row"] == i) & (curves["view"] == view)
            _draw_view(ax, curves[here], nulls[(nulls["row"] == i) & (nulls["view"] == view)])
            if i == 0:
                ax.set_title(VIEWS[view], fontsize="medium")
            if j == 0:
                ax.set_ylabel(f"{rows[i]}\ncosine" if n_rows > 1 else "cosine")
            if i == n_rows - 1:
                ax.set_xlabel("layer (0 = embeddings)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
    _legend(fig, axes)
    fig.suptitle(title, fontsize="large")
    return png_base64(fig)


def forest_figure(table: pd.DataFrame, title: str) -> str:
    """Each row's excess over its null with its 95% CI (a :func:`forest_rows` table): one row
    of panels per block, one column per null (the x axis shared along a block), a line at 0
    and ±margin shaded where the margin is finite; positive controls hollow squares."""
    blocks = [b for b in VIEWS if (table["block"] == b).any()]
    nulls = [n for n in NULL_STYLE if (table["null"] == n).any()]
    labels = {b: list(dict.fromkeys(table.loc[table["block"] == b, "label"])) for b in blocks}
    heights = [len(labels[b]) + 1.2 for b in blocks]
    fig = new_figure(10.5, 0.3 * sum(heights) + 1.6)
    grid = fig.add_gridspec(len(blocks), len(nulls), height_ratios=heights)
    for i, block in enumerate(blocks):
        ys = {lab: len(labels[block]) - 1 - k for k, lab in enumerate(labels[block])}
        first = None
        for j, null in enumerate(nulls):
            ax = fig.add_subplot(grid[i, j], sharex=first, sharey=first)
            first = first or ax
            ax.axvline(0.0, color="black", linewidth=0.9)
            for r in table[(table["block"] == block) & (table["null"] == null)].itertuples():
                y, control, style = ys[r.label], r.role == "control", pair_style(r.pair)
                if np.isfinite(r.margin):
                    ax.fill_betweenx(
                        [y - 0.42, y + 0.42], -r.margin, r.margin, color=MARGIN_COLOUR, alpha=0.25, linewidth=0
                    )
                if not np.isfinite(r.diff):
                    continue
                finite = np.isfinite(r.ci_low) and np.isfinite(r.ci_high)
                xerr = [[r.diff - r.ci_low], [r.ci_high - r.diff]] if finite else None
                ax.errorbar(
                    [r.diff],
                    [y],
                    xerr=xerr,
                    fmt=ROLE_MARKER[r.role],
                    color=style.colour,
                    markerfacecolor="white" if control else style.colour,
                    markersize=6,
                    capsize=3,
                    linewidth=1.6,
                )
            ax.set_yticks(list(ys.values()), list(ys.keys()))
            ax.tick_params(axis="y", labelleft=j == 0, labelsize="small")
            ax.set_ylim(-0.7, len(ys) - 0.3)
            ax.grid(True, axis="x", alpha=0.3)
            if i == 0:
                ax.set_title(f"excess over the {NULL_STYLE[null].label}", fontsize="medium")
            if j == 0:
                ax.set_ylabel(VIEWS[block].split(":")[0])
            if i == len(blocks) - 1:
                ax.set_xlabel("observed − null (cosine), 95% CI")
    extra = [
        (Line2D([], [], marker=ROLE_MARKER["test"], color="0.3", linestyle="none"), "test (filled)"),
        (
            Line2D([], [], marker=ROLE_MARKER["control"], color="0.3", markerfacecolor="white", linestyle="none"),
            "positive control (hollow)",
        ),
        (Patch(color=MARGIN_COLOUR, alpha=0.25), "± equivalence margin"),
    ]
    _legend(fig, [], extra)
    fig.suptitle(title, fontsize="large")
    return png_base64(fig)


# ------------------------------------------------------------------ plain data for the template


def _verdict(r: Any, name: str = "") -> dict[str, Any]:
    if r is None:
        return {"kind": "none"}
    detail = f"{interval(r['diff'], r['ci_low'], r['ci_high'], DIFF)}, p Holm {pvalue(r['p_holm'])}"
    return {
        "kind": "verdict",
        "verdict": r["verdict"] or "–",
        "cls": str(r["verdict"] or "none").split()[0],
        "detail": f"{name}: {detail}" if name else detail,
    }


def _summary(run: RunData) -> dict[str, Any]:
    titles = cell_titles(run)
    tests = last_layer_rows(run.tests)
    nulls = [n for n in NULL_STYLE if (tests["null"] == n).any()]
    rows = []
    for key in _cells(run, MAX_CELLS):
        cell = tests[tests["cell_key"] == key]
        first = True
        get = {(r["pair"], r["centring"], r["null"]): r for r in cell.to_dict("records")}
        for pair, centring, text in (
            ("icl_it", "raw", "ICL–IT, raw"),
            ("icl_it", "anchor", "ICL–IT, anchor-centred"),
            ("update", "raw", "update"),
        ):
            if not any((pair, centring, n) in get for n in nulls):
                continue
            control = next((c for c in _CONTROLS[pair] if any((c, centring, n) in get for n in nulls)), None)
            cells = [
                {"kind": "text", "value": titles.get(key, "all trials") if first else ""},
                {"kind": "text", "value": text},
            ]
            first = False
            cells += [_verdict(get.get((pair, centring, n))) for n in nulls]
            cells += [
                _verdict(get.get((control, centring, n)), PAIR_TEXT.get(control, "")) if control else {"kind": "none"}
                for n in nulls
            ]
            rows.append(cells)
    head = [
        "cell",
        "pair",
        *(f"vs {NULL_STYLE[n].label}" for n in nulls),
        *(f"positive control vs {NULL_STYLE[n].label}" for n in nulls),
    ]
    return {"cls": "summary", "head": head, "rows": rows}


def headline_section(run: RunData) -> dict[str, Any] | None:
    """The report's opening: ``figure`` (alt, png; None for a run with factors and no nulls'
    tests, whose factor sections draw the per-layer curves per value rather than pooled over
    cells), ``forest`` and ``summary`` (None without the tests), ``tests`` (whether there are
    any) and ``more`` (how many tested cells the figure leaves out). None without cosines."""
    if run.frame.empty:
        return None
    has_tests = not run.tests.empty
    if not has_tests and (run.plan or {}).get("factors"):
        return {"figure": None, "tests": False, "forest": None, "summary": None, "more": 0}
    curves, nulls, rows = layer_curves(run)
    if curves.empty:
        return None
    n_cells = run.tests["cell_key"].nunique() if has_tests else 0
    what = ("one row per cell" if len(rows) > 1 else rows[0]) if has_tests else "mean with a 95% CI over trials"
    figure = {
        "alt": "similarity per layer: raw, anchor-centred, update; with the nulls",
        "png": overview_figure(curves, nulls, rows, f"ICL vs IT per layer ({what})"),
    }
    out: dict[str, Any] = {
        "figure": figure,
        "tests": has_tests,
        "forest": None,
        "summary": None,
        "more": max(0, n_cells - MAX_FIGURE_CELLS),
    }
    if has_tests:
        table = forest_rows(run)
        if len(table):
            out["forest"] = {
                "alt": "forest plot: excess over the nulls at the last layer",
                "png": forest_figure(table, "Excess over the nulls at each cell's last layer"),
            }
        out["summary"] = _summary(run)
    return out
