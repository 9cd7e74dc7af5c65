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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

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
    "draw_sets",
    "BLOCK_SETS",
    "BlockSets",
    "flipped",
    "set_queries",
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
    if n > len(task.examples):
        raise TaskDataError(
            f"task {task.name!r}: {n} resamples need {n} distinct queries, "
            f"but it has only {len(task.examples)} examples"
        )
    return draw_sets(task, k, n, 1, seed, sampler, demo_task=demo_task)


def set_queries(task: Task, n_blocks: int, per_block: int, seed: int) -> list[list[Example]]:
    """The queries of ``n_blocks`` query blocks of ``per_block`` distinct queries each.

    The queries come from ``default_rng(seed).permutation(len(task))`` in order (the order
    of :func:`draw_resamples`), one block after another; where the task has labels, a block
    takes at most ``ceil(per_block / n_labels)`` queries of one label (label-balanced), and a
    query skipped for that is the first one offered to the next block. When every example
    has been used, the permutation starts again (queries then repeat across blocks, never
    within one). With ``per_block = 1`` block ``b`` is query ``b`` of :func:`draw_resamples`.
    """
    examples = task.examples
    if per_block > len(examples):
        raise TaskDataError(
            f"task {task.name!r}: a set of {per_block} distinct queries needs {per_block} examples, "
            f"but it has only {len(examples)}"
        )
    order = [examples[int(i)] for i in np.random.default_rng(seed).permutation(len(examples))]
    labels = task.labels if task.kind == "classification" and task.labels else None
    cap = -(-per_block // len(labels)) if labels else per_block
    stream: Iterator[Example] = iter(())
    pending: list[Example] = []
    blocks: list[list[Example]] = []

    def fresh() -> Example:
        nonlocal stream
        for e in stream:
            return e
        stream = iter(order)
        return next(stream)

    for _ in range(n_blocks):
        block: list[Example] = []
        counts: dict[str, int] = {}
        tried: list[Example] = []
        offered = 0
        while len(block) < per_block:
            e = pending.pop(0) if pending else fresh()
            offered += 1
            if offered > 2 * len(examples) + per_block:
                raise TaskDataError(f"task {task.name!r}: cannot fill a label-balanced set of {per_block} queries")
            if any(b.id == e.id or b.input == e.input for b in block) or (labels and counts.get(e.output, 0) >= cap):
                tried.append(e)
                continue
            block.append(e)
            counts[e.output] = counts.get(e.output, 0) + 1
        pending = tried + pending
        blocks.append(block)
    return blocks


BlockSets = Literal["drawn", "flipped"]
BLOCK_SETS: tuple[BlockSets, ...] = ("drawn", "flipped")
"""How the later sets of a query block get their demonstrations (:func:`draw_sets`)."""


def flipped(demonstrations: Sequence[Example], labels: Sequence[str] | None, shift: int = 1) -> tuple[Example, ...]:
    """The demonstrations with every label changed: to the label ``shift`` places further in
    ``labels``, cyclically (with two labels and ``shift`` 1, the other one); the true label is
    kept in ``meta["true_output"]``. ``shift`` must not be a multiple of the number of labels.

    >>> from iclit.tasks import Example
    >>> [d.output for d in flipped([Example("a", "x", "positive"), Example("b", "y", "negative")],
    ...                             ["negative", "positive"])]
    ['negative', 'positive']
    """
    if not labels or len(labels) < 2:
        raise TaskDataError(f"flipping labels needs a classification task with two or more labels, not {labels!r}")
    order = list(labels)
    if shift % len(order) == 0:
        raise TaskDataError(f"a shift of {shift} over {len(order)} labels changes no label")
    out = []
    for d in demonstrations:
        if d.output not in order:
            raise TaskDataError(f"demonstration {d.id!r}: label {d.output!r} is not one of {order}")
        true = d.meta.get("true_output", d.output)
        wrong = order[(order.index(d.output) + shift) % len(order)]
        out.append(dataclasses.replace(d, output=wrong, meta={**d.meta, "true_output": true}))
    return tuple(out)


def draw_sets(
    task: Task,
    k: int,
    n_sets: int,
    queries_per_set: int,
    seed: int,
    sampler: str | Sampler | None = None,
    *,
    demo_task: Task | None = None,
    sets_per_query: int = 1,
    block_sets: BlockSets = "drawn",
) -> list[Resample]:
    """The crossed design: ``n_sets`` demonstration sets of ``k`` demonstrations, each read
    with ``queries_per_set`` queries; ``n_sets * queries_per_set`` resamples, set by set
    (resample ``index = set * queries_per_set + slot``).

    Consecutive groups of ``sets_per_query`` sets share their queries (a query block, from
    :func:`set_queries`), so every query is read under that many demonstration sets — the
    demo-swap null compares them. Set ``s`` draws its demonstrations with a generator seeded
    by ``SeedSequence(seed, spawn_key=(s,))``, never among its block's queries (by id or
    text). A deterministic sampler (``Sampler.deterministic``: by similarity) would give every
    set of a block the same demonstrations, leaving the demo-swap null nothing to swap; so
    there each set of a block chooses from the pool without the earlier sets' demonstrations
    (the first set: the k most similar to the block's queries; the second: the next k most
    similar; …). With one query per set and ``sets_per_query = 1`` this is exactly
    :func:`draw_resamples` (the same queries, demonstrations and indices).

    ``block_sets="flipped"`` (the positive control of the demo-swap test): the later sets of
    a block are its first set with every label changed (:func:`flipped`) — the same inputs,
    so two sets of a block differ only in what the labels teach.
    """
    if block_sets not in BLOCK_SETS:
        raise ValueError(f"block_sets must be one of {', '.join(BLOCK_SETS)}, not {block_sets!r}")
    if queries_per_set < 1 or sets_per_query < 1:
        raise ValueError(f"queries_per_set and sets_per_query must be >= 1, got {queries_per_set}, {sets_per_query}")
    if k < 0 or n_sets < 0:
        raise ValueError(f"k and n_sets must be >= 0, got k={k}, n_sets={n_sets}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    source = demo_task if demo_task is not None else task
    check_enough(source, k)
    chooser = get_sampler(sampler if sampler is not None else default_sampler_name(source))
    n_blocks = -(-n_sets // sets_per_query)
    blocks = set_queries(task, n_blocks, queries_per_set, seed)
    out: list[Resample] = []
    taken: set[str] = set()  # the demonstrations of the block's earlier sets (deterministic samplers)
    first: tuple[Example, ...] = ()  # the block's first set (block_sets="flipped")
    for s in range(n_sets):
        queries = blocks[s // sets_per_query]
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(s,)))
        if s % sets_per_query == 0:
            taken = set()
        pool = [e for e in source.examples if e.id not in taken] if chooser.deterministic else source.examples
        if block_sets == "flipped" and s % sets_per_query:
            demos = flipped(first, source.labels, shift=s % sets_per_query)
        else:
            demos = first = tuple(chooser.select(queries, pool, k, rng))
        taken |= {d.id for d in demos}
        out += [
            Resample(index=s * queries_per_set + j, query=q, demonstrations=demos, set_index=s, slot=j)
            for j, q in enumerate(queries)
        ]
    return out
