"""Every figure of iclit and its one style table (pair → label, colour, line style).

Figures draw tables that :mod:`iclit.analysis` already summarised — nothing here computes a
statistic. They render off-screen with the Agg canvas (no pyplot, no display, no change to
the global matplotlib backend). :func:`plot_layers` writes ``layers.png`` of a comparison;
the report's figures (:func:`factor_figure`, :func:`layer_panels_figure`,
:func:`baselines_figure`, :func:`dose_figure`) return the PNG as base64 text, ready for a
``data:`` URI.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = [
    "MARGIN_COLOUR",
    "NULL_STYLE",
    "PAIR_STYLE",
    "ROLE_MARKER",
    "PairStyle",
    "baselines_figure",
    "dose_figure",
    "factor_figure",
    "layer_panels_figure",
    "new_figure",
    "pair_style",
    "plot_layers",
    "png_base64",
]


class PairStyle(NamedTuple):
    label: str
    colour: str
    linestyle: str = "-"


PAIR_STYLE: dict[str, PairStyle] = {
    # the three arm pairs (solid), in display order
    "anchor_icl": PairStyle("anchor – ICL", "tab:blue"),
    "anchor_it": PairStyle("anchor – IT", "tab:orange"),
    "icl_it": PairStyle("ICL – IT", "tab:green"),
    # baselines stored per trial × layer (iclit.analysis.BASELINE_PAIRS)
    "icl_it_centered": PairStyle("ICL – IT, centred", "tab:green", "--"),
    "anchor_icl_centered": PairStyle("anchor – ICL, centred", "tab:blue", "--"),
    "anchor_it_centered": PairStyle("anchor – IT, centred", "tab:orange", "--"),
    "icl_it_centered_ref": PairStyle("ICL – IT, centred on unrelated text", "tab:green", ":"),
    "anchor_icl_centered_ref": PairStyle("anchor – ICL, centred on unrelated text", "tab:blue", ":"),
    "anchor_it_centered_ref": PairStyle("anchor – IT, centred on unrelated text", "tab:orange", ":"),
    "icl_icl_order": PairStyle("ICL – ICL, demonstrations reordered (ceiling)", "tab:gray", "-."),
    "icl_it_shuffled": PairStyle("ICL – IT, shuffled pairs (null)", "tab:gray", ":"),
    "it_it_seed": PairStyle("IT – IT, other seed (noise ceiling)", "tab:red", "-."),
    "update_cosine": PairStyle("update direction cos(ICL−anchor, IT−anchor)", "tab:purple"),
    "icl_it_qmean": PairStyle("ICL – IT, mean over the query", "tab:olive"),
    "anchor_icl_qmean": PairStyle("anchor – ICL, mean over the query", "tab:cyan"),
    "anchor_it_qmean": PairStyle("anchor – IT, mean over the query", "tab:brown"),
    # linear CKA across all queries of a cell (RunData.cka)
    "cka_icl_it": PairStyle("linear CKA ICL vs IT across a cell's queries", "black"),
    "cka_anchor_icl": PairStyle("linear CKA anchor vs ICL across a cell's queries", "dimgray", "--"),
    "cka_anchor_it": PairStyle("linear CKA anchor vs IT across a cell's queries", "darkgray", ":"),
    # the pairs of the nulls' tests (iclit.analysis.nulls.TEST_PAIRS, CEILINGS): positive controls dash-dotted
    "update": PairStyle("update (ICL − anchor vs IT − anchor)", "tab:purple"),
    "ceiling_it": PairStyle("IT – IT′, other seed (positive control)", "tab:red", "-."),
    "ceiling_icl": PairStyle("ICL – ICL′, reordered (positive control)", "tab:gray", "-."),
    "update_ceiling_it": PairStyle("update IT – IT′ (positive control)", "tab:red", "-."),
    "update_ceiling_icl": PairStyle("update ICL – ICL′ (positive control)", "tab:gray", "-."),
}
"""pair → (legend label, colour, line style); every pair the store or the analysis names."""

NULL_STYLE: dict[str, PairStyle] = {
    "query_swap": PairStyle("query-swap null", "tab:gray", ":"),
    "demo_swap": PairStyle("demo-swap null", "tab:pink", "-."),
}
"""null → (legend label, colour of its band in the report's headline figure, line style of its
mean; ``layers.png`` draws each pair's nulls in the pair's colour with these line styles)."""

ROLE_MARKER: dict[str, str] = {"test": "o", "control": "s"}
"""A test's marker in the forest plot (filled), a positive control's (hollow)."""

MARGIN_COLOUR = "tab:cyan"
"""The equivalence margin's band (±margin) in the forest plot."""

_SPARE_COLOURS = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive")
_VALUE_COLOURS = ("tab:blue", "tab:green", "tab:red", "tab:purple", "tab:orange", "tab:brown")


def pair_style(pair: str) -> PairStyle:
    """The pair's style; an unknown pair gets its name as label, black and a solid line."""
    return PAIR_STYLE.get(pair, PairStyle(pair.replace("_", " – "), "black"))


def png_base64(fig: Figure, dpi: int = 110) -> str:
    """The figure as PNG, base64-encoded (for ``src='data:image/png;base64,…'``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def new_figure(width: float, height: float) -> Figure:
    """An off-screen figure (Agg canvas, constrained layout) of ``width`` × ``height`` inches."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


_figure = new_figure


def _stats(cells: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mean, ci_low, ci_high of a column of ``summarize`` dicts."""
    mean, lo, hi = (
        np.array([s[key] if isinstance(s, dict) else np.nan for s in cells], dtype=float)
        for key in ("mean", "ci_low", "ci_high")
    )
    return mean, lo, hi


# ------------------------------------------------------------------ layers.png


def _ordered_pairs(*frames: pd.DataFrame | None) -> list[str]:
    seen: list[str] = []
    for df in frames:
        if df is not None:
            seen += [p for p in pd.unique(df["pair"]) if p not in seen]
    return [p for p in PAIR_STYLE if p in seen] + [p for p in seen if p not in PAIR_STYLE]


def plot_layers(
    summary: pd.DataFrame,
    path: str | Path,
    *,
    title: str | None = None,
    baseline: pd.DataFrame | None = None,
    nulls: pd.DataFrame | None = None,
    ylabel: str = "cosine similarity",
    dpi: int = 150,
) -> Path:
    """Similarity curves over layers, one per arm pair, mean with a shaded CI band.

    summary: the ``summarize_layers`` table (columns ``pair, layer, mean, ci_low,
    ci_high``). baseline: same format (e.g. unrelated-prompt or shuffled-pair cosines),
    drawn dashed in the pair's colour. nulls: the raw-centring rows of the cell's tests
    (:data:`iclit.analysis.nulls.TEST_COLUMNS`): each pair's query-swap (dotted) and
    demo-swap (dash-dotted) null mean, as a band from observed − ci_high to observed − ci_low
    (the null's level with the CI of the excess). Writes the figure to ``path`` (format from
    the suffix, PNG by default; parent folders created) and returns it as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot()
    spare = iter(_SPARE_COLOURS)
    for pair in _ordered_pairs(summary, baseline):
        label, colour, style = PAIR_STYLE.get(pair) or PairStyle(pair.replace("_", " – "), next(spare, "black"))
        rows = summary[summary["pair"] == pair].sort_values("layer")
        if len(rows):
            ax.plot(
                rows["layer"],
                rows["mean"],
                color=colour,
                linestyle=style,
                marker="o",
                markersize=3,
                linewidth=1.8,
                label=label,
            )
            ax.fill_between(rows["layer"], rows["ci_low"], rows["ci_high"], color=colour, alpha=0.2, linewidth=0)
        if baseline is not None:
            base = baseline[baseline["pair"] == pair].sort_values("layer")
            if len(base):
                ax.plot(
                    base["layer"],
                    base["mean"],
                    color=colour,
                    linestyle="--",
                    linewidth=1.2,
                    alpha=0.8,
                    label=f"{label} (baseline)",
                )
        if nulls is not None:
            for null, dash in ((n, s.linestyle) for n, s in NULL_STYLE.items()):
                band = nulls[(nulls["pair"] == pair) & (nulls["null"] == null)].sort_values("layer")
                if len(band):
                    ax.plot(
                        band["layer"],
                        band["null_mean"],
                        color=colour,
                        linestyle=dash,
                        linewidth=1.0,
                        label=f"{label}: {null.replace('_', '-')} null",
                    )
                    ax.fill_between(
                        band["layer"],
                        band["observed"] - band["ci_high"],
                        band["observed"] - band["ci_low"],
                        color=colour,
                        alpha=0.12,
                        linewidth=0,
                        hatch="//" if null == "demo_swap" else None,
                    )
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small", frameon=False)
    fig.savefig(path, dpi=dpi)
    return path


# ------------------------------------------------------------------ the report's figures


def factor_figure(
    summary: pd.DataFrame, factor: str, title: str, pairs: Sequence[str] = ("anchor_icl", "anchor_it", "icl_it")
) -> str:
    """The paper-style figure: each pair's similarity against the factor's values, mean with
    its 95% CI, at the last layer (left) and averaged over layers (right).

    summary: a ``factor_summary`` table (a ``factor`` column, ``<pair>:<what>`` columns of
    summaries)."""
    fig = _figure(10.0, 3.8)
    values = [str(v) for v in summary[factor]]
    x = np.arange(len(values))
    for col, (what, heading) in enumerate((("last_layer", "last layer"), ("mean_over_layers", "mean over layers"))):
        ax = fig.add_subplot(1, 2, col + 1)
        for j, pair in enumerate(pairs):
            if f"{pair}:{what}" not in summary.columns:
                continue
            label, colour, _ = pair_style(pair)
            mean, lo, hi = _stats(summary[f"{pair}:{what}"].tolist())
            yerr = np.vstack([np.nan_to_num(mean - lo), np.nan_to_num(hi - mean)])
            ax.errorbar(
                x + (j - 1) * 0.06,
                mean,
                yerr=yerr,
                color=colour,
                marker="o",
                markersize=4,
                capsize=3,
                linewidth=1.6,
                label=label,
            )
        ax.set_xticks(x, values)
        ax.set_xlabel(factor)
        ax.set_ylabel("cosine similarity")
        ax.set_title(heading, fontsize="medium")
        ax.grid(True, alpha=0.3)
        if col == 0:
            ax.legend(fontsize="small", frameon=False, loc="best")
    fig.suptitle(title, fontsize="medium")
    return png_base64(fig)


def layer_panels_figure(
    layers: pd.DataFrame,
    factor: str | None,
    values: Sequence[Any],
    title: str,
    pairs: Sequence[str] = ("anchor_icl", "anchor_it", "icl_it"),
) -> str:
    """Per-layer curves, one panel per factor value (one panel, "all trials", when ``factor``
    is None), mean with a 95% CI band per pair.

    layers: a ``layer_summaries`` table (``value, pair, layer, mean, ci_low, ci_high``)."""
    n = max(1, len(values))
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig = _figure(3.4 * cols + 0.6, 2.9 * rows + 0.5)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    for ax in axes[1:]:
        ax.sharey(axes[0])
    labels = layers["value"].astype(str) if len(layers) else pd.Series([], dtype=str)
    for ax, value in zip(axes, values if values else [None], strict=True):
        sub = layers if factor is None else layers[(labels == str(value)).to_numpy()]
        for pair in pairs:
            r = sub[sub["pair"] == pair].sort_values("layer")
            if len(r):
                label, colour, style = pair_style(pair)
                ax.plot(
                    r["layer"],
                    r["mean"],
                    color=colour,
                    marker="o",
                    markersize=2.5,
                    linewidth=1.5,
                    label=label,
                    linestyle=style,
                )
                ax.fill_between(r["layer"], r["ci_low"], r["ci_high"], color=colour, alpha=0.2, linewidth=0)
        ax.set_title(f"{factor} = {value}" if factor else "all trials", fontsize="small")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer (0 = embeddings)", fontsize="small")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("cosine similarity")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize="x-small", frameon=False, loc="best")
    fig.suptitle(title, fontsize="medium")
    return png_base64(fig)


def baselines_figure(
    layers: pd.DataFrame, factor: str | None, values: Sequence[Any], title: str, baselines: Sequence[str]
) -> str:
    """ICL–IT beside its per-trial baselines, per layer, one panel per factor value."""
    return layer_panels_figure(layers, factor, values, title, ("icl_it", *baselines))


def dose_figure(dose: pd.DataFrame, factor: str | None, score_name: str) -> str:
    """The dose curves against the optimiser step (log 2), one line per factor value: ICL–IT
    and anchor–IT cosine at the last layer, the IT score, the training loss (log).

    dose: a ``dose_summary`` table."""
    fig = _figure(13.0, 3.6)
    panels = [
        ("icl_it:last_layer", "ICL – IT cosine, last layer"),
        ("anchor_it:last_layer", "anchor – IT cosine, last layer"),
        ("it_score", f"IT {score_name}"),
        ("train_loss", "training loss at the step (log)"),
    ]
    for col, (key, heading) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), col + 1)
        for j, (value, grp) in enumerate(dose.groupby("value", sort=False, dropna=False)):
            mean, lo, hi = _stats(grp[key].tolist())
            colour = _VALUE_COLOURS[j % len(_VALUE_COLOURS)]
            ax.plot(
                grp["step"],
                mean,
                marker="o",
                markersize=3,
                color=colour,
                label=f"{factor} = {value}" if factor else "all trials",
            )
            ax.fill_between(grp["step"], lo, hi, color=colour, alpha=0.15, linewidth=0)
        ax.set_xscale("log", base=2)
        if key == "train_loss":
            ax.set_yscale("log")
        ax.set_xlabel("optimiser step")
        ax.set_title(heading, fontsize="small")
        ax.grid(True, alpha=0.3)
        if col == 0:
            ax.legend(fontsize="x-small", frameon=False, loc="best")
    fig.suptitle("IT dose: the tuned model read after each captured step (mean, 95% CI over trials)", fontsize="medium")
    return png_base64(fig)
