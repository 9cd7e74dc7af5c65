"""Report: figures (one style table), the HTML report of a run directory from a template."""

from iclit.analysis.factors import dose_summary, factor_effects, factor_summary
from iclit.report.figures import PAIR_STYLE, plot_layers
from iclit.report.html import render_report, write_report

__all__ = [
    "PAIR_STYLE",
    "dose_summary",
    "factor_effects",
    "factor_summary",
    "plot_layers",
    "render_report",
    "write_report",
]
