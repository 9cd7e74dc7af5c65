"""Drawing resamples: one query and its ``k`` demonstrations.

Determinism: the queries are ``default_rng(seed).permutation(len(task))[:n]`` and the
demonstrations of resample ``i`` are drawn with a generator seeded by
``SeedSequence(seed, spawn_key=(i,))`` (the ``i``-th child of ``SeedSequence(seed)``).
So resample ``i`` is the same whatever ``n`` is: the first 10 resamples of ``n=30`` are
the resamples of ``n=10``. Queries are distinct across resamples and a query is never one
of its own demonstrations (examples are told apart by ``id``).

Beyond the random and balanced samplers:

* :class:`SimilaritySampler` (registered as ``most-similar`` and ``least-similar``): the
  ``k`` demonstrations whose inputs are the most (least) similar to the query's by sentence
  embedding (``all-MiniLM-L6-v2``, see :mod:`iclit.tasks.embed`); deterministic;
* :class:`WrongLabelSampler` wraps any sampler and gives a fraction of the chosen
  demonstrations a wrong output (a wrong label, or another example's output for generation
  tasks); the true output stays in ``example.meta["true_output"]``;
* ``draw_resamples(..., demo_task=other)`` draws the demonstrations from another task than
  the queries (e.g. translation demonstrations before a sentiment query).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from .base import Example, Task
from .loaders import TaskDataError, check_enough

__all__ = [
    "Resample",
    "Sampler",
    "RandomSampler",
    "BalancedSampler",
    "SimilaritySampler",
    "MostSimilarSampler",
    "LeastSimilarSampler",
    "WrongLabelSampler",
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


class SimilaritySampler(Sampler):
    """The ``k`` candidates most (``mode="most"``) or least (``"least"``) similar to the query.

    Similarity is the cosine of sentence embeddings of the inputs (``all-MiniLM-L6-v2``).
    Ties go to the earlier candidate. In the prompt the chosen demonstrations are ordered by
    increasing similarity, so the most similar of them stands next to the query. The ``rng``
    is not used: the choice depends only on the query and the pool.
    """

    name = "similarity"

    def __init__(self, mode: Literal["most", "least"] = "most") -> None:
        if mode not in ("most", "least"):
            raise ValueError(f"similarity mode must be 'most' or 'least', not {mode!r}")
        self.mode = mode

    def choose(
        self, query: Example, candidates: list[Example], k: int, rng: np.random.Generator
    ) -> list[Example]:
        from .embed import embed

        vectors = embed([query.input, *(c.input for c in candidates)])
        sims = vectors[1:] @ vectors[0]
        key = -sims if self.mode == "most" else sims
        chosen = np.argsort(key, kind="stable")[:k]
        ordered = sorted(chosen.tolist(), key=lambda i: (float(sims[i]), i))
        return [candidates[i] for i in ordered]


class MostSimilarSampler(SimilaritySampler):
    """:class:`SimilaritySampler` with ``mode="most"``."""

    name = "most-similar"

    def __init__(self) -> None:
        super().__init__("most")


class LeastSimilarSampler(SimilaritySampler):
    """:class:`SimilaritySampler` with ``mode="least"``."""

    name = "least-similar"

    def __init__(self) -> None:
        super().__init__("least")


def wrong_count(fraction: float, k: int) -> int:
    """How many of ``k`` demonstrations a fraction makes wrong: ``fraction * k`` rounded half up."""
    return int(np.floor(fraction * k + 0.5 + 1e-9))


class WrongLabelSampler(Sampler):
    """Demonstrations chosen by ``base``, then ``round(fraction * k)`` of them given a wrong output.

    Which ones and the wrong output are drawn from the resample's ``rng`` after ``base`` has
    chosen, so the demonstrations themselves are those ``base`` alone would choose.
    Classification (``labels`` given): a wrong label uniformly among the other labels.
    Generation (``labels=None``): the output of another candidate whose output differs.
    A changed demonstration keeps its true output in ``meta["true_output"]``.
    """

    name = "wrong-labels"

    def __init__(self, base: Sampler | str, fraction: float, labels: Sequence[str] | None = None) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"the wrong-label fraction must be in [0, 1], not {fraction}")
        self.base = get_sampler(base)
        self.fraction = float(fraction)
        self.labels = tuple(labels) if labels is not None else None

    def choose(
        self, query: Example, candidates: list[Example], k: int, rng: np.random.Generator
    ) -> list[Example]:
        demos = self.base.choose(query, candidates, k, rng)
        n_wrong = wrong_count(self.fraction, len(demos))
        if n_wrong == 0:
            return demos
        flip = sorted(int(i) for i in rng.choice(len(demos), size=n_wrong, replace=False))
        out = list(demos)
        for i in flip:
            d = demos[i]
            if self.labels is not None:
                others = [label for label in self.labels if label != d.output]
            else:
                others = sorted({c.output for c in candidates if c.output != d.output})
            if not others:
                raise TaskDataError(f"no wrong output to give demonstration {d.id!r}: every candidate has {d.output!r}")
            wrong = others[int(rng.integers(len(others)))]
            out[i] = dataclasses.replace(d, output=wrong, meta={**d.meta, "true_output": d.output})
        return out


SAMPLERS: dict[str, type[Sampler]] = {}


def register_sampler(name: str, cls: type[Sampler]) -> None:
    """Add (or replace) a sampler class under ``name``."""
    SAMPLERS[name] = cls


register_sampler("random", RandomSampler)
register_sampler("balanced", BalancedSampler)
register_sampler("most-similar", MostSimilarSampler)
register_sampler("least-similar", LeastSimilarSampler)


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
    task: Task,
    k: int,
    n: int,
    seed: int,
    sampler: str | Sampler | None = None,
    *,
    demo_task: Task | None = None,
) -> list[Resample]:
    """``n`` resamples of ``k`` demonstrations each, with distinct queries.

    ``sampler`` defaults to ``balanced`` for classification and ``random`` for generation
    (of the task the demonstrations come from). ``demo_task``: draw the demonstrations from
    this task's examples instead (the queries are the same as without it).
    Raises :class:`TaskDataError` if the task has fewer than ``k + 1`` examples or fewer
    than ``n`` (queries are not repeated).
    """
    if k < 0 or n < 0:
        raise ValueError(f"k and n must be >= 0, got k={k}, n={n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    source = demo_task if demo_task is not None else task
    check_enough(source, k)
    examples = task.examples
    if n > len(examples):
        raise TaskDataError(
            f"task {task.name!r}: {n} resamples need {n} distinct queries, but it has only {len(examples)} examples"
        )
    chooser = get_sampler(sampler if sampler is not None else default_sampler_name(source))
    order = np.random.default_rng(seed).permutation(len(examples))[:n]
    resamples = []
    for i, q in enumerate(order):
        query = examples[int(q)]
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))
        demos = chooser.select(query, source.examples, k, rng)
        resamples.append(Resample(index=i, query=query, demonstrations=tuple(demos)))
    return resamples
