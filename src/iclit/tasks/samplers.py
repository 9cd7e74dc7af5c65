"""Drawing resamples: one query and its ``k`` demonstrations.

Determinism: the queries are ``default_rng(seed).permutation(len(task))[:n]`` and the
demonstrations of resample ``i`` are drawn with a generator seeded by
``SeedSequence(seed, spawn_key=(i,))`` (the ``i``-th child of ``SeedSequence(seed)``).
So resample ``i`` is the same whatever ``n`` is: the first 10 resamples of ``n=30`` are
the resamples of ``n=10``. Queries are distinct across resamples and a query is never one
of its own demonstrations (examples are told apart by ``id``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .base import Example, Task
from .loaders import TaskDataError, check_enough

__all__ = [
    "Resample",
    "Sampler",
    "RandomSampler",
    "BalancedSampler",
    "SAMPLERS",
    "register_sampler",
    "get_sampler",
    "draw_resamples",
]


@dataclass(frozen=True)
class Resample:
    """One unit of the experiment: a query and the demonstrations shown (or tuned on) for it."""

    index: int
    query: Example
    demonstrations: tuple[Example, ...]


class Sampler:
    """Chooses ``k`` demonstrations for a query from a pool.

    Subclasses implement :meth:`choose`, which gets the pool without the query.
    """

    name: str = "base"

    def select(self, query: Example, pool: Sequence[Example], k: int, rng: np.random.Generator) -> list[Example]:
        """``k`` demonstrations from ``pool`` (the query itself is never chosen), in prompt order."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        candidates = [e for e in pool if e.id != query.id]
        if len(candidates) < k:
            raise TaskDataError(
                f"cannot draw {k} demonstrations for query {query.id!r}: only {len(candidates)} other examples"
            )
        if k == 0:
            return []
        return self.choose(query, candidates, k, rng)

    def choose(
        self, query: Example, candidates: list[Example], k: int, rng: np.random.Generator
    ) -> list[Example]:
        raise NotImplementedError


class RandomSampler(Sampler):
    """Uniformly at random, without replacement."""

    name = "random"

    def choose(
        self, query: Example, candidates: list[Example], k: int, rng: np.random.Generator
    ) -> list[Example]:
        idx = rng.choice(len(candidates), size=k, replace=False)
        return [candidates[int(i)] for i in idx]


class BalancedSampler(Sampler):
    """As equal as possible counts per output (label), then shuffled.

    With ``k=4`` and two labels: two of each. When ``k`` is not a multiple of the number of
    labels, the labels that get one more are picked at random. If a label has too few
    examples, the remaining places are filled uniformly from the rest of the pool.
    """

    name = "balanced"

    def choose(
        self, query: Example, candidates: list[Example], k: int, rng: np.random.Generator
    ) -> list[Example]:
        groups: dict[str, list[int]] = {}
        for i, e in enumerate(candidates):
            groups.setdefault(e.output, []).append(i)
        labels = sorted(groups)
        quota = {label: k // len(labels) for label in labels}
        for j in rng.permutation(len(labels))[: k % len(labels)]:
            quota[labels[int(j)]] += 1
        chosen: list[int] = []
        for label in labels:
            members = groups[label]
            take = min(quota[label], len(members))
            chosen.extend(int(members[int(j)]) for j in rng.choice(len(members), size=take, replace=False))
        if len(chosen) < k:  # some label ran short: fill from what is left
            taken = set(chosen)
            rest = [i for i in range(len(candidates)) if i not in taken]
            chosen.extend(rest[int(j)] for j in rng.choice(len(rest), size=k - len(chosen), replace=False))
        order = rng.permutation(len(chosen))
        return [candidates[chosen[int(j)]] for j in order]


SAMPLERS: dict[str, type[Sampler]] = {}


def register_sampler(name: str, cls: type[Sampler]) -> None:
    """Add (or replace) a sampler class under ``name``."""
    SAMPLERS[name] = cls


register_sampler("random", RandomSampler)
register_sampler("balanced", BalancedSampler)


def get_sampler(name: str | Sampler) -> Sampler:
    """A sampler instance by name (an instance is returned as is)."""
    if isinstance(name, Sampler):
        return name
    if name not in SAMPLERS:
        raise TaskDataError(f"unknown sampler {name!r} (samplers: {sorted(SAMPLERS)})")
    return SAMPLERS[name]()


def default_sampler_name(task: Task) -> str:
    """``balanced`` for classification, ``random`` for generation."""
    return "balanced" if task.kind == "classification" else "random"


def draw_resamples(
    task: Task, k: int, n: int, seed: int, sampler: str | Sampler | None = None
) -> list[Resample]:
    """``n`` resamples of ``k`` demonstrations each, with distinct queries.

    ``sampler`` defaults to ``balanced`` for classification and ``random`` for generation.
    Raises :class:`TaskDataError` if the task has fewer than ``k + 1`` examples or fewer
    than ``n`` (queries are not repeated).
    """
    if k < 0 or n < 0:
        raise ValueError(f"k and n must be >= 0, got k={k}, n={n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    check_enough(task, k)
    examples = task.examples
    if n > len(examples):
        raise TaskDataError(
            f"task {task.name!r}: {n} resamples need {n} distinct queries, but it has only {len(examples)} examples"
        )
    chooser = get_sampler(sampler if sampler is not None else default_sampler_name(task))
    order = np.random.default_rng(seed).permutation(len(examples))[:n]
    resamples = []
    for i, q in enumerate(order):
        query = examples[int(q)]
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))
        demos = chooser.select(query, examples, k, rng)
        resamples.append(Resample(index=i, query=query, demonstrations=tuple(demos)))
    return resamples
