"""Experiments: the main comparison (and, later, declarative factor sweeps)."""

from iclit.experiments.compare import ARM_NAMES, Comparison, compare, run_comparison

__all__ = ["ARM_NAMES", "Comparison", "compare", "run_comparison"]
