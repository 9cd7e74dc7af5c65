"""Every number ``iclit results --metric NAME`` can compute: the built-in metrics (registered
by :mod:`iclit.analysis.tables`, :mod:`iclit.analysis.causal` and
:mod:`iclit.analysis.contrasts` on import) and any registered with
:func:`~iclit.analysis.registry.register_metric`, looked up by name::

    compute_metric("runs/main", "cka")      # a run directory or a RunData
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

import iclit.analysis.causal  # noqa: F401 - registers patch and steer
import iclit.analysis.contrasts  # noqa: F401 - registers contrasts
import iclit.analysis.tables  # noqa: F401 - registers the built-in metrics
from iclit.analysis.registry import METRICS, Metric
from iclit.analysis.rundata import RunData, load_run

__all__ = ["compute_metric", "get_metric", "list_metrics"]


def list_metrics() -> list[Metric]:
    """Every registered metric, by name."""
    return [METRICS[n] for n in sorted(METRICS)]


def get_metric(name: str) -> Metric:
    """The metric ``name``; KeyError naming the known ones otherwise."""
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
