"""Experiments: the main comparison (and, later, declarative factor sweeps)."""

# ``compare`` (the function) is exported from the top-level package; here the name stays the
# module's, so ``iclit.experiments.compare`` is always the module.
from iclit.experiments.compare import ARM_NAMES, Cell, Comparison, evaluate, run_comparison

__all__ = ["ARM_NAMES", "Cell", "Comparison", "evaluate", "run_comparison"]
