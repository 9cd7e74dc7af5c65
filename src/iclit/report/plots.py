"""Per-layer figures. Renders off-screen with the Agg canvas (no pyplot, no display,
no change to the global matplotlib backend)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

PAIR_STYLE: dict[str, tuple[str, str]] = {
    # pair -> (legend label, colour)
    "anchor_icl": ("anchor – ICL", "tab:blue"),
    "anchor_it": ("anchor – IT", "tab:orange"),
    "icl_it": ("ICL – IT", "tab:green"),
}
_EXTRA_COLOURS = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive")


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
    ylabel: str = "cosine similarity",
    dpi: int = 150,
) -> Path:
    """Similarity curves over layers, one per arm pair, mean with a shaded CI band.

    summary: the ``summarize_layers`` table (columns ``pair, layer, mean, ci_low,
    ci_high``). baseline: same format (e.g. unrelated-prompt or shuffled-pair cosines),
    drawn dashed in the pair's colour. Writes the figure to ``path`` (format from the
    suffix, PNG by default; parent folders created) and returns it as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()

    extra = iter(_EXTRA_COLOURS)
    for pair in _ordered_pairs(summary, baseline):
        label, colour = PAIR_STYLE.get(pair, (pair.replace("_", " – "), ""))
        colour = colour or next(extra, "black")
        rows = summary[summary["pair"] == pair].sort_values("layer")
        if len(rows):
            ax.plot(rows["layer"], rows["mean"], color=colour, marker="o", markersize=3,
                    linewidth=1.8, label=label)
            ax.fill_between(rows["layer"], rows["ci_low"], rows["ci_high"], color=colour,
                            alpha=0.2, linewidth=0)
        if baseline is not None:
            base = baseline[baseline["pair"] == pair].sort_values("layer")
            if len(base):
                ax.plot(base["layer"], base["mean"], color=colour, linestyle="--",
                        linewidth=1.2, alpha=0.8, label=f"{label} (baseline)")

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
