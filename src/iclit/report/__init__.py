"""Report: figures and the HTML report of a run directory."""

from iclit.report.html import render_report, write_report
from iclit.report.plots import plot_layers

__all__ = ["plot_layers", "render_report", "write_report"]
