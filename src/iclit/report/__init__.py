"""Report: figures and the HTML report of a run directory."""

from iclit.report.html import dose_summary, factor_effects, factor_summary, render_report, write_report
from iclit.report.plots import plot_layers

__all__ = ["dose_summary", "factor_effects", "factor_summary", "plot_layers", "render_report", "write_report"]
