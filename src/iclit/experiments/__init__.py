"""Experiments: the typed spec, the plan, the runner (local, Ray) and the store.

Names load on first use, so reading a spec imports neither torch nor transformers."""

from __future__ import annotations

from typing import Any

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
    "Store": "iclit.experiments.store",
    "open_store": "iclit.experiments.store",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'iclit.experiments' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
