"""Experiments: the typed spec, the plan, the runner (local, Ray, SLURM, shards) that writes a run
directory (:mod:`iclit.rundir`).

Names load on first use, so reading a spec imports neither torch nor transformers."""

from __future__ import annotations

from iclit._lazy import lazy_exports

_EXPORTS = {
    "comparison_spec": "iclit.experiments.compare",
    "ExperimentSpec": "iclit.experiments.spec",
    "SpecError": "iclit.experiments.spec",
    "SpecProblem": "iclit.experiments.spec",
    "load_spec": "iclit.experiments.spec",
    "loads_spec": "iclit.experiments.spec",
    "parse_spec": "iclit.experiments.spec",
    "Plan": "iclit.experiments.plan",
    "PlannedCell": "iclit.experiments.plan",
    "Chunk": "iclit.experiments.plan",
    "make_plan": "iclit.experiments.plan",
    "trial_key": "iclit.experiments.plan",
    "RunSummary": "iclit.experiments.runner",
    "run_experiment": "iclit.experiments.runner",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
