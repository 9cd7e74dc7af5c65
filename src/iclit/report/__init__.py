"""Report: figures (and later the HTML report)."""

from iclit.report.plots import plot_layers

__all__ = ["plot_layers"]
