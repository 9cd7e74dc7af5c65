"""Compatibility alias: the figures and their style table live in :mod:`iclit.report.figures`."""

from iclit.report.figures import PAIR_STYLE, PairStyle, pair_style, plot_layers

__all__ = ["PAIR_STYLE", "PairStyle", "pair_style", "plot_layers"]
