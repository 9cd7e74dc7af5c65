"""Experiments: the main comparison and declarative factor sweeps (spec → plan → run → store)."""

# ``compare`` (the function) is exported from the top-level package; here the name stays the
# module's, so ``iclit.experiments.compare`` is always the module.
from iclit.experiments.compare import ARM_NAMES, Cell, Comparison, evaluate, run_comparison
from iclit.experiments.plan import Chunk, Plan, PlannedCell, make_plan, trial_key
from iclit.experiments.runner import RunSummary, run_experiment
from iclit.experiments.spec import ExperimentSpec, SpecError, SpecProblem, load_spec, loads_spec, parse_spec
from iclit.experiments.store import Store, open_store

__all__ = [
    "ARM_NAMES",
    "Cell",
    "Comparison",
    "evaluate",
    "run_comparison",
    "ExperimentSpec",
    "SpecError",
    "SpecProblem",
    "load_spec",
    "loads_spec",
    "parse_spec",
    "Plan",
    "PlannedCell",
    "Chunk",
    "make_plan",
    "trial_key",
    "RunSummary",
    "run_experiment",
    "Store",
    "open_store",
]
