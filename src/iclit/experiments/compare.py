"""``iclit compare`` as an experiment: its arguments become a one-cell :class:`ExperimentSpec`.

The comparison then runs like any spec (plan → engine → store), into an ordinary run
directory: ``iclit results``, ``iclit report``, resume and ``--reuse`` work on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from iclit.experiments.spec import ExperimentSpec
from iclit.tasks import Task, TaskDataError, check_enough, resolve_task
from iclit.tuning.recipe import TuningRecipe

__all__ = ["COMPARE_CHUNK_SIZE", "comparison_spec", "resolve_task", "check_comparison", "apply_settings"]

COMPARE_CHUNK_SIZE = 10
"""Resamples per chunk of a comparison (the unit that is stored, and resumed after a kill)."""


def check_comparison(k: int, resamples: int, task: Task, queries_per_set: int = 1) -> None:
    """The checks that need no model: k ≥ 0, resamples ≥ 1, enough examples for both (with
    one query per set, ``resamples`` distinct queries; with several, a set's queries and its
    k demonstrations all distinct)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, not {k}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, not {resamples}")
    if queries_per_set < 1:
        raise ValueError(f"queries_per_set must be >= 1, not {queries_per_set}")
    check_enough(task, k)
    if queries_per_set > 1:
        if queries_per_set + k > len(task):
            raise TaskDataError(
                f"{task.source}: a set of {queries_per_set} queries and {k} demonstrations needs "
                f"{queries_per_set + k} distinct examples, the task has {len(task)}"
            )
    elif resamples > len(task):
        raise TaskDataError(
            f"{task.source}: {resamples} resamples need {resamples} distinct queries, the task has {len(task)} examples"
        )


def apply_settings(data: dict[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """``key=value`` settings laid over a spec's dict; ``recipe.epochs`` sets a nested key."""
    out = dict(data)
    for key, value in settings.items():
        head, _, rest = key.partition(".")
        if rest:
            inner = dict(out.get(head) or {})
            out[head] = apply_settings(inner, {rest: value})
        else:
            out[key] = value
    return out


def comparison_spec(
    model: str = "gemma-3-270m",
    task: str = "sentiment",
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
    name: str = "compare",
) -> dict[str, Any]:
    """The spec (as a dict, for :func:`~iclit.experiments.spec.parse_spec`) of one comparison:
    one cell, one seed. ``settings``: any other spec keys (``similarity``, ``wrong_labels``,
    ``demo_task``, ``task_options``, ``chunk_size``, ``recipe.rank``, …), laid over the rest."""
    recipe = recipe or TuningRecipe()
    data: dict[str, Any] = {
        "name": name,
        "model": model,
        "task": task,
        "template": template or "default",
        "instruction": instruction,
        "k": k,
        "resamples": resamples,
        "queries_per_set": queries_per_set,
        "it_seeds": it_seeds,
        "seeds": [seed],
        "sampler": sampler,
        "recipe": _recipe_fields(recipe),
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "fast": fast,
        "device": device,
        "dtype": dtype,
        "baselines": list(baselines),
        "chunk_size": COMPARE_CHUNK_SIZE,
    }
    if settings and "seed" in settings:  # `--set seed=3` means the one seed, not a second key
        data.pop("seeds")
    return apply_settings(data, settings or {})


def _recipe_fields(recipe: TuningRecipe) -> dict[str, Any]:
    d = recipe.to_dict()
    d["lr"] = recipe.lr  # None stays None (the method's default), as the user gave it
    return d


def spec_of(data: Mapping[str, Any], *, check_resources: bool = True) -> ExperimentSpec:
    """A comparison's spec dict validated (:class:`~iclit.experiments.spec.SpecError` lists every problem)."""
    from iclit.experiments.spec import SpecError, SpecProblem, parse_spec

    spec = parse_spec(dict(data), source="compare", check_resources=check_resources)
    if spec.factors or len(spec.seeds) != 1:
        raise SpecError(
            [
                SpecProblem(
                    "factors" if spec.factors else "seeds",
                    "a comparison is one cell and one seed; for factors or several seeds write a "
                    "spec and use `iclit run`",
                )
            ],
            "compare",
        )
    return spec
