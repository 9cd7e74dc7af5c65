"""The metric registry: the table of metrics and the decorator that fills it.

A metric maps a :class:`~iclit.analysis.rundata.RunData` (read from a run directory, no
model) to a tidy DataFrame::

    @register_metric("my_metric", "what it is")
    def my_metric(run: RunData) -> pd.DataFrame: ...

The modules that define metrics import this one; :mod:`iclit.analysis.metrics` imports them
all and looks metrics up (``compute_metric("runs/main", "cka")``), so nothing here imports
a metric module back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from iclit.analysis.rundata import RunData

__all__ = ["Metric", "METRICS", "MetricFn", "register_metric"]

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
