"""From a spec to trials: cells (one combination of factor values), trials and chunks.

A **trial** is one (query, demonstration set) pair of one cell under one seed. A cell draws
``resamples`` demonstration sets and reads each with ``queries_per_set`` queries (the crossed
design, :func:`iclit.tasks.draw_sets`): trial ``resample = set * queries_per_set + slot``. Its key is the sha256 of the
canonical JSON of everything that determines it (:meth:`PlannedCell.settings` plus the seed
and the resample index): the model name, the task and a hash of its data, the query
template (instruction included), the demonstrations' task and template, k, how the
demonstrations are chosen (sampler or similarity mode), the wrong-label fraction, the IT
recipe, the arms, the batch settings and the chunking; the baselines, a data file's
``task_options``, the crossed design (``queries_per_set``, ``sets_per_query``) and the causal
``analyses`` with their settings only when given, so the keys of one-query-per-set specs
without them stay as they were. A finished trial is never recomputed.

Trials run in **chunks**: the pairs of sets ``[0, c)``, ``[c, 2c)``, … of a (cell, seed), with
``c = spec.chunk_size`` (sets; with one query per set, resamples). The chunks are fixed by
the spec (not by what is already done), so a resumed run feeds the model exactly the batches
an uninterrupted one would, and computes the same numbers. Draws depend only on (cell, seed, set index).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

from iclit.experiments.spec import FACTORS, ExperimentSpec, factor_label
from iclit.tasks import Resample, Sampler, Task, Template, draw_sets, get_sampler, resolve_task
from iclit.tasks.draws import BlockSets
from iclit.tasks.samplers import (
    LeastSimilarSampler,
    MostSimilarSampler,
    WrongLabelSampler,
    default_sampler_name,
)
from iclit.tuning import TuningRecipe

__all__ = ["KEY_VERSION", "PlannedCell", "Chunk", "Plan", "make_plan", "trial_key", "canonical_json", "task_digest"]

KEY_VERSION = 1
"""Bumped when what a trial computes changes meaning; part of every key."""
CAUSAL_VERSION = 1
"""Bumped when what the causal analyses (``analyses``) compute changes; part of the keys of
trials that run them only."""


TUNING_SETTINGS = ("recipe", "it_seeds")
"""The cell settings that only the tuned arms read."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def _sha(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode("ascii")).hexdigest()


_DIGESTS: dict[int, tuple[Task, str]] = {}


def task_digest(task: Task) -> str:
    """A hash of a task's data (ids, inputs, outputs, labels): changed data, changed keys."""
    hit = _DIGESTS.get(id(task))
    if hit is not None and hit[0] is task:
        return hit[1]
    digest = _sha([task.kind, list(task.labels or ()), [[e.id, e.input, e.output] for e in task.examples]])[:32]
    _DIGESTS[id(task)] = (task, digest)
    return digest


def trial_key(settings: dict[str, Any], seed: int, resample: int) -> str:
    """The trial's key: sha256 of the canonical JSON of its cell settings, seed and resample."""
    return _sha({**settings, "seed": int(seed), "resample": int(resample)})


@dataclass(frozen=True)
class PlannedCell:
    """One combination of factor values, resolved to what the run needs.

    labels: the value of every factor (as shown and stored: ``demo_task`` "same", recipe
    names); task: the query task with its template (instruction applied); demo_task: the
    task the demonstrations come from (None: the query task); demo_template: their template
    when they come from another task.
    """

    labels: dict[str, Any]
    model: str
    task: Task
    demo_task: Task | None
    demo_template: Template | None
    k: int
    similarity: str
    wrong_labels: float
    sampler: str
    recipe_label: str
    recipe: TuningRecipe
    settings: dict[str, Any] = field(repr=False)
    key: str = ""
    queries_per_set: int = 1
    sets_per_query: int = 1
    block_sets: BlockSets = "drawn"

    def chooser(self) -> Sampler:
        """The sampler that draws this cell's demonstrations."""
        if self.similarity == "most":
            base: Sampler = MostSimilarSampler()
        elif self.similarity == "least":
            base = LeastSimilarSampler()
        else:
            base = get_sampler(self.sampler)
        if self.wrong_labels > 0:
            source = self.demo_task or self.task
            labels = source.labels if source.kind == "classification" else None
            return WrongLabelSampler(base, self.wrong_labels, labels)
        return base

    @cached_property
    def base_key(self) -> str:
        """A hash of the settings without the IT recipe (:data:`TUNING_SETTINGS`): cells with
        the same base key read the base model on the same prompts, so they share the
        read-outs of the arms that do not tune (:data:`iclit.engine.evaluate.BASE_ARMS`)."""
        return _sha({k: v for k, v in self.settings.items() if k not in TUNING_SETTINGS})

    def draws(self, seed: int, indices: Sequence[int]) -> list[Resample]:
        """The resamples (pairs) ``indices`` of this cell under ``seed`` (the same whatever else is drawn)."""
        if not indices:
            return []
        if self.similarity != "random":
            from iclit.tasks.embed import embed_examples

            embed_examples(self.task.examples)  # one batch, cached on disk
            if self.demo_task is not None:
                embed_examples(self.demo_task.examples)
        n_sets = max(indices) // self.queries_per_set + 1
        every = draw_sets(
            self.task,
            self.k,
            n_sets,
            self.queries_per_set,
            seed,
            self.chooser(),
            demo_task=self.demo_task,
            sets_per_query=self.sets_per_query,
            block_sets=self.block_sets,
        )
        return [every[i] for i in indices]


@dataclass(frozen=True)
class Chunk:
    """Resamples ``resamples`` of ``cell`` under ``seed``: computed and stored together."""

    cell: PlannedCell
    seed: int
    number: int
    resamples: tuple[int, ...]
    keys: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.resamples)

    @cached_property
    def base_key(self) -> str:
        """The chunk's base-model read-outs: equal for the chunks of cells that differ only in
        the IT recipe (:attr:`PlannedCell.base_key`), the same seed and the same resamples."""
        return _sha([self.cell.base_key, int(self.seed), list(self.resamples)])


@dataclass
class Plan:
    """The cells of a spec and their chunks, in run order (grouped by model)."""

    spec: ExperimentSpec
    cells: list[PlannedCell]
    chunks: list[Chunk]

    @property
    def n_trials(self) -> int:
        return sum(c.size for c in self.chunks)

    def trial_keys(self) -> list[str]:
        return [k for c in self.chunks for k in c.keys]

    @property
    def factor_names(self) -> list[str]:
        """The factors the spec varies, in spec order."""
        return list(self.spec.factors)

    def describe(self) -> dict[str, Any]:
        """What the store keeps about the plan (the report reads it back)."""
        spec = self.spec
        return {
            "factors": {
                n: [factor_label(n, v) if n != "recipe" else spec.resolve_recipe(v)[0] for v in vs]
                for n, vs in spec.factors.items()
            },
            "base": {n: _label(spec, n, spec.base_value(n)) for n in FACTORS},
            "design": spec.design,
            "seeds": list(spec.seeds),
            "resamples": spec.resamples,
            "queries_per_set": spec.queries_per_set,
            "sets_per_query": spec.query_sharing,
            "pairs": spec.pairs,
            "equivalence_margin": spec.margins,
            "cells": [{"key": c.key, "labels": c.labels} for c in self.cells],
            "n_trials": self.n_trials,
        }


def _label(spec: ExperimentSpec, name: str, value: Any) -> Any:
    if name == "recipe":
        return spec.resolve_recipe(value)[0]
    return factor_label(name, value)


def _combinations(spec: ExperimentSpec) -> Iterator[dict[str, Any]]:
    base = {n: spec.base_value(n) for n in FACTORS}
    if spec.design == "grid" or not spec.factors:
        names = list(spec.factors)
        for values in itertools.product(*(spec.factors[n] for n in names)):
            yield {**base, **dict(zip(names, values, strict=True))}
    else:  # separate: one factor at a time, the others at their base values
        for name, values in spec.factors.items():
            for v in values:
                yield {**base, name: v}


def _cell(spec: ExperimentSpec, values: dict[str, Any], tasks: dict[Any, Task]) -> PlannedCell:
    """``tasks``: the plan's tasks by (name, template, instruction), each loaded once."""

    def load(name: str, template: str | None = None, instruction: bool = True) -> Task:
        key = (name, template, instruction)
        if key not in tasks:
            options = spec.task_loader_options() if name == spec.task else {}
            tasks[key] = resolve_task(name, template, instruction, options=options)
        return tasks[key]

    task = load(spec.task, values["template"], values["instruction"])
    demo_task = demo_template = None
    if values["demo_task"] is not None and values["demo_task"] != spec.task:
        demo_task = load(values["demo_task"])
        demo_template = demo_task.template
        if not values["instruction"]:
            demo_template = demo_template.replace(instruction=None)
    source = demo_task or task
    sampler = spec.sampler or default_sampler_name(source)
    recipe_label, recipe = spec.resolve_recipe(values["recipe"])
    similarity = values["similarity"]
    selection = {"most": "most-similar", "least": "least-similar"}.get(similarity, sampler)
    settings: dict[str, Any] = {
        "version": KEY_VERSION,
        "model": values["model"],
        "device": spec.device,
        "dtype": spec.dtype,
        "task": {"name": task.name, "kind": task.kind, "data": task_digest(task)},
        "template": asdict(task.template),
        "demos": None
        if demo_task is None or demo_template is None  # both None, or both set
        else {
            "task": demo_task.name,
            "kind": demo_task.kind,
            "data": task_digest(demo_task),
            "template": asdict(demo_template),
        },
        "k": int(values["k"]),
        "selection": selection,
        "embedding": None if similarity == "random" else _embedding_name(),
        "wrong_labels": float(values["wrong_labels"]),
        "recipe": recipe.to_dict(),
        "arms": list(spec.arms),
        "batch_size": spec.batch_size,
        "max_new_tokens": spec.max_new_tokens,
        "chunk_size": spec.chunk_size,
        "fast": spec.fast,
    }
    if spec.baselines:  # only when asked for, so the keys of runs without baselines stay as they were
        settings["baselines"] = sorted(spec.baselines)
    if spec.task_options is not None:  # likewise: how a data file became the task
        settings["task_options"] = spec.task_options.to_dict()
    if spec.queries_per_set > 1 or spec.query_sharing > 1:  # likewise: the crossed design
        settings["queries_per_set"] = spec.queries_per_set
        settings["sets_per_query"] = spec.query_sharing
        if spec.block_sets != "drawn":  # draw_sets: a block's later sets are its first with the labels changed
            settings["block_sets"] = spec.block_sets
        elif spec.query_sharing > 1 and get_sampler(selection).deterministic:  # draw_sets: a block's sets disjoint
            settings["block_sets"] = "disjoint"
    if spec.it_seeds > 1:
        settings["it_seeds"] = spec.it_seeds
    if spec.prompt_format != "raw":  # likewise: the prompts framed by the model's chat template
        settings["prompt_format"] = spec.prompt_format
    causal = spec.causal_settings()
    if causal is not None:  # likewise: the causal analyses, run with the model and stored per trial
        settings["analyses"] = {**causal, "version": CAUSAL_VERSION}
    labels = {n: _label(spec, n, values[n]) for n in FACTORS}
    labels["task"] = spec.task
    return PlannedCell(
        labels=labels,
        model=values["model"],
        task=task,
        demo_task=demo_task,
        demo_template=demo_template,
        k=int(values["k"]),
        similarity=similarity,
        wrong_labels=float(values["wrong_labels"]),
        sampler=sampler,
        recipe_label=recipe_label,
        recipe=recipe,
        settings=settings,
        key=_sha(settings),
        queries_per_set=spec.queries_per_set,
        sets_per_query=spec.query_sharing,
        block_sets=spec.block_sets,
    )


def _embedding_name() -> str:
    from iclit.tasks.embed import EMBEDDING_MODEL

    return EMBEDDING_MODEL


def make_plan(spec: ExperimentSpec) -> Plan:
    """Cells (duplicates merged: a cell shared by two factors of a ``separate`` design runs
    once) and their chunks, grouped by model so each model is needed in one stretch."""
    cells: list[PlannedCell] = []
    seen: set[str] = set()
    tasks: dict[Any, Task] = {}
    for values in _combinations(spec):
        cell = _cell(spec, values, tasks)
        if cell.key not in seen:
            seen.add(cell.key)
            cells.append(cell)
    models = list(dict.fromkeys(c.model for c in cells))
    chunks: list[Chunk] = []
    size, q = spec.chunk_size, spec.queries_per_set
    for model in models:
        for cell in (c for c in cells if c.model == model):
            for seed in spec.seeds:
                for number, start in enumerate(range(0, spec.resamples, size)):
                    idx = tuple(range(start * q, min(start + size, spec.resamples) * q))
                    keys = tuple(trial_key(cell.settings, seed, i) for i in idx)
                    chunks.append(Chunk(cell, seed, number, idx, keys))
    return Plan(spec, cells, chunks)
