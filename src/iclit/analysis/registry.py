"""The metric registry: every number ``iclit results --metric NAME`` can compute, one function each.

A metric maps a :class:`~iclit.analysis.rundata.RunData` (read from a run directory, no
model) to a tidy DataFrame::

    @register_metric("my_metric", "what it is")
    def my_metric(run: RunData) -> pd.DataFrame: ...

    compute_metric("runs/main", "cka")      # a run directory or a RunData
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from iclit.analysis.rundata import RunData, load_run

__all__ = ["Metric", "METRICS", "register_metric", "get_metric", "compute_metric", "list_metrics"]

MetricFn = Callable[[RunData], pd.DataFrame]


@dataclass(frozen=True)
class Metric:
    """name: what ``--metric`` takes; fn: RunData → DataFrame; help: one line for the CLI;
    needs_cka: the run must be read with CKA for every cell."""

    name: str
    fn: MetricFn
    help: str = ""
    needs_cka: bool = False


METRICS: dict[str, Metric] = {}


def register_metric(name: str, help: str = "", *, needs_cka: bool = False) -> Callable[[MetricFn], MetricFn]:
    """Decorator: register ``fn`` as metric ``name`` (replacing one of the same name)."""
    def wrap(fn: MetricFn) -> MetricFn:
        METRICS[name] = Metric(name, fn, help or (fn.__doc__ or "").strip().split("\n")[0], needs_cka)
        return fn

    return wrap


def _ensure_builtins() -> None:
    import iclit.analysis.causal  # noqa: F401 - registers patch and steer
    import iclit.analysis.contrasts  # noqa: F401 - registers contrasts
    import iclit.analysis.tables  # noqa: F401 - registers the built-in metrics


def list_metrics() -> list[Metric]:
    _ensure_builtins()
    return [METRICS[n] for n in sorted(METRICS)]


def get_metric(name: str) -> Metric:
    _ensure_builtins()
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r} (metrics: {', '.join(sorted(METRICS))})")
    return METRICS[name]


def compute_metric(run: RunData | str | Path, name: str, *, all_trials: bool = False) -> pd.DataFrame:
    """Metric ``name`` over a run directory (or an already loaded :class:`RunData`)."""
    metric = get_metric(name)
    if not isinstance(run, RunData):
        run = load_run(run, all_trials=all_trials, cka=True if metric.needs_cka else None)
    elif metric.needs_cka and run.cka.empty and not run.frame.empty:
        run = load_run(run.path, all_trials=run.plan is None, cka=True)
    return metric.fn(run)
