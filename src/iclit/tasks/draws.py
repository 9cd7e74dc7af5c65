"""The draws of an experiment: resamples (one query and its ``k`` demonstrations) and the
crossed design's demonstration sets with their query blocks.

Determinism: the queries are ``default_rng(seed).permutation(len(task))[:n]`` and the
demonstrations of resample ``i`` are drawn with a generator seeded by
``SeedSequence(seed, spawn_key=(i,))`` (the ``i``-th child of ``SeedSequence(seed)``).
So resample ``i`` is the same whatever ``n`` is: the first 10 resamples of ``n=30`` are
the resamples of ``n=10``. Queries are distinct across resamples and a query is never one
of its own demonstrations (examples are told apart by ``id``). Which demonstrations are
chosen is the sampler's (:mod:`iclit.tasks.samplers`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np

from .base import Example, Task
from .loaders import TaskDataError, check_enough
from .samplers import Resample, Sampler, default_sampler_name, get_sampler

__all__ = ["BLOCK_SETS", "BlockSets", "draw_resamples", "draw_sets", "flipped", "set_queries"]


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
