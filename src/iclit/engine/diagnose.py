"""The label-sensitivity diagnostic: does a model's ICL read the demonstrations' labels?

On the same demonstration sets and queries, ICL is read with the demonstrations' gold labels,
with every label flipped, and with labels drawn at random; the zero-shot query (the anchor)
is read beside them. A model whose ICL accuracy stays high with flipped labels answers from
the format and its prior, not from the label mapping (Gemma-3-270M does). Only the ICL and
anchor arms run (no tuning). Its summary statistics are :mod:`iclit.analysis.labels`'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from iclit.engine.arms import ArmContext, anchor_arm, icl_arm
from iclit.engine.evaluate import framed_task
from iclit.models import LoadedModel
from iclit.tasks import Example, Resample, Task, draw_sets
from iclit.tasks.scoring import score

__all__ = ["LABEL_CONDITIONS", "LabelSensitivity", "label_sensitivity", "relabel"]

LABEL_CONDITIONS: tuple[str, ...] = ("gold", "flipped", "random")
"""gold: the demonstrations as drawn; flipped: every demonstration's label replaced by another
label (the next one in the task's label order: the other label of a binary task); random: each
demonstration's label drawn uniformly from all labels (the gold one included)."""


def relabel(
    demos: Sequence[Example], labels: Sequence[str], condition: str, rng: np.random.Generator
) -> tuple[Example, ...]:
    """``demos`` with their labels as ``condition`` says (:data:`LABEL_CONDITIONS`); a changed
    demonstration keeps its true output in ``meta["true_output"]``."""
    if condition not in LABEL_CONDITIONS:
        raise ValueError(f"unknown label condition {condition!r} (known: {', '.join(LABEL_CONDITIONS)})")
    labels = list(labels)
    out = []
    for d in demos:
        if condition == "gold":
            new = d.output
        elif condition == "flipped":
            new = labels[(labels.index(d.output) + 1) % len(labels)]
        else:
            new = labels[int(rng.integers(len(labels)))]
        out.append(
            d if new == d.output else dataclasses.replace(d, output=new, meta={**d.meta, "true_output": d.output})
        )
    return tuple(out)


@dataclass
class LabelSensitivity:
    """Per-query correctness (0/1) of ICL under each label condition and of the zero-shot
    query, ``[sets, queries_per_set]`` each, on the same sets and queries."""

    model: str
    task: str
    k: int
    prompt_format: str
    seed: int
    correct: dict[str, np.ndarray]
    zero_shot: np.ndarray

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "task": self.task,
            "k": self.k,
            "prompt_format": self.prompt_format,
            "seed": self.seed,
            "correct": {c: v.tolist() for c, v in self.correct.items()},
            "zero_shot": self.zero_shot.tolist(),
        }


def label_sensitivity(
    lm: LoadedModel,
    task: Task,
    *,
    k: int = 4,
    sets: int = 16,
    queries_per_set: int = 8,
    seed: int = 0,
    prompt_format: str = "raw",
    batch_size: int = 16,
) -> LabelSensitivity:
    """ICL accuracy with gold, flipped and random labels on the same ``sets`` demonstration
    sets of ``k`` (the task's default sampler: label-balanced), each read with
    ``queries_per_set`` queries, plus the zero-shot accuracy of those queries.

    The random labels of set s are drawn from a generator seeded by (seed, s). Raises
    ValueError for a task without labels (generation).
    """
    if task.kind != "classification" or not task.labels:
        raise ValueError(f"the label-sensitivity diagnostic needs a classification task; {task.name!r} is {task.kind}")
    draws = draw_sets(task, k, sets, queries_per_set, seed)
    run_task, _ = framed_task(lm, task, None, prompt_format)
    golds = [r.query.output for r in draws]

    def correct(arm, rows: Sequence[Resample]) -> np.ndarray:
        ctx = ArmContext(lm, run_task, list(rows), seed=seed, batch_size=batch_size)
        out = arm(ctx)
        return np.asarray(score(task, out.predictions, golds), dtype=float).reshape(sets, queries_per_set)

    by_condition = {}
    for condition in LABEL_CONDITIONS:
        rows = []
        for r in draws:
            rng = np.random.default_rng([seed, r.set_id, 7])  # one draw per set, shared by its queries
            rows.append(dataclasses.replace(r, demonstrations=relabel(r.demonstrations, task.labels, condition, rng)))
        by_condition[condition] = correct(icl_arm, rows)
    return LabelSensitivity(lm.name, task.name, k, prompt_format, seed, by_condition, correct(anchor_arm, draws))
