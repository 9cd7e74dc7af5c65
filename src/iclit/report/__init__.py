"""Report: figures and the HTML report of a run directory."""

from iclit.report.html import factor_effects, render_report, write_report
from iclit.report.plots import plot_layers

__all__ = [
    "factor_effects","plot_layers", "render_report", "write_report"]
