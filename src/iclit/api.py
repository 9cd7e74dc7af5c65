"""The Python API a notebook uses (the CLI is a thin layer over it): one comparison, end to end.

    Example (not run: it needs a model or a run directory)::

        import iclit
        result = iclit.run_comparison("gemma-3-270m", "sentiment", k=4, resamples=30, out="runs/main")
        result.summary, result.metrics, result.states["icl"]     # [n, L+1, d]
        iclit.compare(...)                                        # the same, as one tidy DataFrame


A comparison is a one-cell experiment (:func:`iclit.experiments.compare.comparison_spec`)
run through the same plan → engine → store path as ``iclit run``; its tables are computed
from the run directory by :mod:`iclit.analysis` and written by :mod:`iclit.report.exports`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from iclit.experiments.compare import check_comparison, comparison_spec, resolve_task, spec_of
from iclit.tasks import Task
from iclit.tuning.recipe import TuningRecipe

__all__ = ["Comparison", "run_comparison", "run_comparison_spec", "compare", "comparison_from_run"]


@dataclass
class Comparison:
    """The result of one comparison run, read back from its run directory.

    config: what ``config.json`` holds; trials: one dict per resample (``trials.jsonl``);
    summary: per pair × layer mean/std/CI of the cosine (``summary.csv``); frame: tidy rows
    resample × layer × pair (the three pairs); metrics: per-arm accuracy (or chrF),
    agreement, IT losses (``metrics.json``); states: per stored state name (``anchor``,
    ``icl``, ``it``, …) the last-token states ``[n, L+1, d]`` (torch, float32); run_dir: the
    run directory (None when it was a temporary one).
    """

    config: dict[str, Any]
    trials: list[dict[str, Any]]
    summary: pd.DataFrame
    frame: pd.DataFrame
    metrics: dict[str, Any]
    states: dict[str, Any] = field(repr=False)
    run_dir: Path | None = None
    tests: pd.DataFrame | None = None
    """Each pair against its query-swap and demo-swap nulls per centring and layer
    (``tests.csv``; :data:`iclit.analysis.nulls.TEST_COLUMNS`)."""

    def write(self, out: str | Path) -> Path:
        """Write trials.jsonl, summary.csv, tests.csv, metrics.json, config.json and layers.png
        to ``out`` (each to a temporary name first, then moved into place)."""
        from iclit.report.exports import write_files

        return write_files(out, self.trials, self.summary, self.metrics, self.config, self.tests)


def run_comparison_spec(
    spec: Any, out: str | Path, *, models: Mapping[str, Any] | None = None, progress: bool = False
) -> Any:
    """Run a one-cell spec (:func:`iclit.experiments.compare.spec_of`) into ``out`` and write
    its exports there; returns the :class:`~iclit.experiments.runner.RunSummary`."""
    from iclit.experiments.runner import run_experiment
    from iclit.report.exports import write_exports

    summary = run_experiment(spec, out, models=models, progress=progress)
    write_exports(out)
    return summary


def comparison_from_run(run_dir: str | Path) -> Comparison:
    """A :class:`Comparison` read from a one-cell run directory (no model)."""
    import torch

    from iclit.analysis import load_run, load_states
    from iclit.analysis.tables import comparison_frame
    from iclit.report.exports import comparison_parts

    run = load_run(run_dir)
    states = load_states(run_dir) if not run.notes else None  # notes: trials without stored states
    parts = comparison_parts(run)
    return Comparison(
        config=parts["config"],
        trials=parts["trials"],
        summary=parts["summary"],
        frame=comparison_frame(run),
        metrics=parts["metrics"],
        tests=parts["tests"],
        states={name: torch.from_numpy(a) for name, a in states.arrays.items()} if states else {},
        run_dir=Path(run_dir),
    )


_REGISTERED: dict[int, tuple[Task, str]] = {}


def _task_name(task: str | Task) -> str:
    """A task object is registered under a name of its own, so a spec can name it."""
    if not isinstance(task, Task):
        return str(task)
    hit = _REGISTERED.get(id(task))
    if hit is None or hit[0] is not task:
        from iclit.experiments.plan import task_digest
        from iclit.tasks import register_task

        name = f"{task.name}@{task_digest(task)[:12]}"
        given = task
        register_task(name, lambda: given, f"{task.name} (given as an object)")
        _REGISTERED[id(task)] = (task, name)
    return _REGISTERED[id(task)][1]


def run_comparison(
    model: Any = "gemma-3-270m",
    task: str | Task = "sentiment",
    *,
    k: int = 4,
    resamples: int = 30,
    queries_per_set: int = 1,
    it_seeds: int = 1,
    seed: int = 0,
    recipe: TuningRecipe | None = None,
    template: str | None = None,
    instruction: bool = True,
    sampler: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 48,
    fast: bool = True,
    device: str | None = None,
    dtype: str | None = None,
    baselines: Sequence[str] = (),
    settings: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    progress: bool = False,
) -> Comparison:
    """Run anchor, ICL and IT on ``resamples`` seeded demonstration sets of k, each read with
    ``queries_per_set`` queries (the crossed design; 1: one (query, demonstrations) draw per
    set), the IT arm tuned with ``it_seeds`` seeds per set.

    ``model`` is a name (see ``iclit models``) or an already loaded
    :class:`~iclit.models.LoadedModel`; ``task`` a name (see ``iclit tasks``), a data file or
    a :class:`~iclit.tasks.Task`. ``settings``: any other spec key (``similarity``,
    ``wrong_labels``, ``demo_task``, ``chunk_size``, ``recipe.rank``, ``task_options``…).
    ``out``: the run directory (resumable; ``iclit results``/``report`` read it); None: a
    temporary one, removed once the results are read back. ``fast=False`` forces the
    straightforward path; ``device``/``dtype`` override the defaults (CUDA in bf16 when
    present, else CPU fp32); ``baselines``: extra similarities (see ``iclit run``'s spec).
    Bad input (unknown model or task, k or resamples that do not fit) raises before any
    model is loaded.
    """
    from iclit.models import LoadedModel

    options = dict((settings or {}).get("task_options") or {})
    if isinstance(task, Task):
        options = {}
    check_comparison(k, resamples, resolve_task(task, template, instruction, options=options or None), queries_per_set)
    given = isinstance(model, LoadedModel)
    if not given:
        from iclit.models.loading import resolve

        resolve(model)  # an unknown name fails before the slow load
    data = comparison_spec(
        model.name if given else model,
        _task_name(task),
        k=k,
        resamples=resamples,
        queries_per_set=queries_per_set,
        it_seeds=it_seeds,
        seed=seed,
        recipe=recipe,
        template=template,
        instruction=instruction,
        sampler=sampler,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        fast=fast,
        device=device,
        dtype=dtype,
        baselines=baselines,
        settings=settings,
    )
    spec = spec_of(data, check_resources=not given)
    temporary = out is None
    run_dir = Path(tempfile.mkdtemp(prefix="iclit-compare-")) if out is None else Path(out)
    try:
        summary = run_comparison_spec(spec, run_dir, models={model.name: model} if given else None, progress=progress)
        if summary.fit_warning():
            import warnings

            warnings.warn(summary.fit_warning(), stacklevel=2)
        result = comparison_from_run(run_dir)
    finally:
        if temporary:
            shutil.rmtree(run_dir, ignore_errors=True)
    if temporary:
        result.run_dir = None
    return result


def compare(*args: Any, **kwargs: Any) -> pd.DataFrame:
    """:func:`run_comparison` as one tidy DataFrame: resample, query_id, layer, pair, cosine.

    The summary, metrics, per-trial records and config are in ``df.attrs`` under those names.
    """
    result = run_comparison(*args, **kwargs)
    df = result.frame
    df.attrs.update(summary=result.summary, metrics=result.metrics, trials=result.trials, config=result.config)
    return df
