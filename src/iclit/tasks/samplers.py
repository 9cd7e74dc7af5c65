"""Samplers: how a resample's ``k`` demonstrations are chosen (the draws that call them, with
their seeding, are :mod:`iclit.tasks.draws`).

Beyond the random and balanced samplers:

* :class:`SimilaritySampler` (registered as ``most-similar`` and ``least-similar``): the
  ``k`` demonstrations whose inputs are the most (least) similar to the query's by sentence
  embedding (``all-MiniLM-L6-v2``, see :mod:`iclit.tasks.embed`); deterministic;
* :class:`WrongLabelSampler` wraps any sampler and gives a fraction of the chosen
  demonstrations a wrong output (a wrong label, or another example's output for generation
  tasks); the true output stays in ``example.meta["true_output"]``;
* ``draw_resamples(..., demo_task=other)`` (:mod:`iclit.tasks.draws`) draws the
  demonstrations from another task than the queries (e.g. translation demonstrations before
  a sentiment query).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .base import Example, Task
from .loaders import TaskDataError

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
    "wrong_count",
    "default_sampler_name",
]


@dataclass(frozen=True)
class Resample:
    """One unit of the experiment: a query and the demonstrations shown (or tuned on) for it."""

    index: int
    query: Example
    demonstrations: tuple[Example, ...]
    set_index: int | None = None
    """The demonstration set (:func:`draw_sets`): resamples of one set share their
    demonstrations, one ICL prefix and one IT adapter. None: its own set (``index``)."""
    slot: int = 0
    """The query's place among its set's queries."""

    @property
    def set_id(self) -> int:
        """The demonstration set this resample belongs to."""
        return self.index if self.set_index is None else self.set_index


class Sampler:
    """Chooses ``k`` demonstrations for a query from a pool.

    Subclasses implement :meth:`choose`, which gets the pool without the query.
    """

    name: str = "base"

    @property
    def deterministic(self) -> bool:
        """True when the choice ignores the rng (the same queries and pool give the same
        demonstrations): the sets of one query block are then made disjoint (:func:`draw_sets`)."""
        return False

    def select(
        self, query: Example | Sequence[Example], pool: Sequence[Example], k: int, rng: np.random.Generator
    ) -> list[Example]:
        """``k`` demonstrations from ``pool``, in prompt order. ``query``: one query, or the
        queries of a crossed set (:func:`draw_sets`), none of which is ever chosen (told apart
        by ``id`` and by input text)."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        queries = [query] if isinstance(query, Example) else list(query)
        ids, texts = {q.id for q in queries}, {q.input for q in queries}
        candidates = [e for e in pool if e.id not in ids and e.input not in texts]
        if len(candidates) < k:
            names = ", ".join(repr(q.id) for q in queries[:5])
            raise TaskDataError(
                f"cannot draw {k} demonstrations for {'query' if len(queries) == 1 else 'queries'} {names}: "
                f"only {len(candidates)} other examples"
            )
        if k == 0:
            return []
        return self.choose(queries[0] if len(queries) == 1 else queries, candidates, k, rng)

    def choose(
        self, query: Example | list[Example], candidates: list[Example], k: int, rng: np.random.Generator
    ) -> list[Example]:
        """``query``: the query, or the list of a crossed set's queries."""
        raise NotImplementedError


class RandomSampler(Sampler):
    """Uniformly at random, without replacement."""

    name = "random"

    def choose(
        self, query: Example | list[Example], candidates: list[Example], k: int, rng: np.random.Generator
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
        self, query: Example | list[Example], candidates: list[Example], k: int, rng: np.random.Generator
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

    Similarity is the cosine of sentence embeddings of the inputs (``all-MiniLM-L6-v2``); for
    the several queries of a crossed set (:func:`draw_sets`) it is the mean cosine to the
    set's queries, so one set is the most (least) similar to its queries on average. Ties go to
    the earlier candidate. In the prompt the chosen demonstrations are ordered by increasing
    similarity, so the most similar of them stands next to the query. The ``rng`` is not used:
    the choice depends only on the query and the pool.
    """

    name = "similarity"
    deterministic = True

    def __init__(self, mode: Literal["most", "least"] = "most") -> None:
        if mode not in ("most", "least"):
            raise ValueError(f"similarity mode must be 'most' or 'least', not {mode!r}")
        self.mode = mode

    def choose(
        self, query: Example | list[Example], candidates: list[Example], k: int, rng: np.random.Generator
    ) -> list[Example]:
        from .embed import embed

        queries = [query] if isinstance(query, Example) else list(query)
        vectors = embed([*(q.input for q in queries), *(c.input for c in candidates)])
        sims = (vectors[len(queries) :] @ vectors[: len(queries)].T).mean(axis=1)
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

    @property
    def deterministic(self) -> bool:  # which examples are shown is the base sampler's choice
        return self.base.deterministic

    def choose(
        self, query: Example | list[Example], candidates: list[Example], k: int, rng: np.random.Generator
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
