"""The experimental conditions ("arms"), registered by name.

* ``anchor``: the base model reads the query prompt alone;
* ``icl``: the base model reads the k demonstrations, then the query prompt;
* ``it``: the model tuned on exactly those k demonstrations (LoRA or full fine-tuning, see
  :class:`~iclit.tuning.TuningRecipe`) reads the query prompt alone.

An arm maps an :class:`ArmContext` (model, task, resamples, recipe) to an :class:`ArmOutput`
(states at the last prompt token and the model's answer). New conditions slot in with
:func:`register_arm`. A fourth arm serves as a baseline:

* ``it_seed2``: the ``it`` arm tuned with another seed (:attr:`ArmContext.seed_offset` = 1;
  it changes the LoRA initialisation, the data order and dropout, so under full
  fine-tuning with full-batch steps and no dropout it equals ``it``): ``it`` against
  ``it_seed2`` is the noise ceiling of the ICL–IT similarity. With
  :attr:`ArmContext.it_seeds` ≥ 2 the ``it`` arm trains those seeds in its own batched pass
  instead (``ArmOutput.seeds``), and ``it_seed2`` … come from there;
* ``icl_reordered``: the ``icl`` arm with the set's demonstrations in another order (rotated
  by one): ``icl`` against ``icl_reordered`` is the ICL arm's own ceiling.

Resamples of one demonstration set (:attr:`~iclit.tasks.Resample.set_id`, the crossed design)
share one ICL prefix and one IT adapter (per seed).

What an arm is given and returns, and the read-out every arm ends with, are in
:mod:`iclit.engine.readout`; the tuned arms in :mod:`iclit.engine.tuned_arm`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from iclit.engine.readout import ArmContext, ArmOutput, concat_outputs, pick_rows, read_out
from iclit.engine.tuned_arm import it_arm, it_seed2_arm

__all__ = [
    "ARMS",
    "ArmContext",
    "ArmOutput",
    "anchor_arm",
    "get_arm",
    "icl_arm",
    "icl_reordered_arm",
    "it_arm",
    "it_seed2_arm",
    "register_arm",
    "reordered",
]


def anchor_arm(ctx: ArmContext) -> ArmOutput:
    """The query alone on the base model. On the fast path, each distinct query prompt is run
    once per loaded model and memoised (``lm.memo``), so every condition that needs the same
    anchor reuses it."""
    prompts = ctx.query_prompts()
    queries = [r.query.input for r in ctx.resamples]
    if not ctx.fast:
        out = read_out(ctx, ctx.lm.model, prompts, queries=queries)
    else:
        key = ("anchor", ctx.task.kind, ctx.task.labels, ctx.max_new_tokens, ctx.query_mean)
        memo = ctx.lm.memo.setdefault(key, {})
        query_of = dict(zip(prompts, queries, strict=True))
        todo = sorted({p for p in prompts if p not in memo})
        if todo:
            fresh = read_out(
                ctx, ctx.lm.model, todo, queries=[query_of[p] for p in todo], prefixes=ctx.query_prefixes(len(todo))
            )
            for i, p in enumerate(todo):
                memo[p] = pick_rows(fresh, [i])
        out = concat_outputs([memo[p] for p in prompts])
    ctx.advance(len(ctx.resamples))
    return out


def icl_arm(ctx: ArmContext) -> ArmOutput:
    """Demonstrations + query on the base model; on the fast path the demonstrations' key/value
    cache is computed once per demonstration set and shared by its queries."""
    prefixes = [ctx.task.template.icl_prefix(r.demonstrations, ctx.demo_template) for r in ctx.resamples]
    out = read_out(
        ctx, ctx.lm.model, ctx.icl_prompts(), prefixes=prefixes, queries=[r.query.input for r in ctx.resamples]
    )
    ctx.advance(len(ctx.resamples))
    return out


def reordered(demonstrations: Sequence) -> tuple:
    """The demonstrations rotated by one (the first goes last): another order for k ≥ 2."""
    demos = tuple(demonstrations)
    return demos[1:] + demos[:1]


def icl_reordered_arm(ctx: ArmContext) -> ArmOutput:
    """The ``icl`` arm with each set's demonstrations rotated by one (:func:`reordered`):
    ``icl`` vs ``icl_reordered`` is the ICL arm's ceiling (for k ≤ 1 it equals ``icl``)."""
    return icl_arm(
        replace(ctx, resamples=[replace(r, demonstrations=reordered(r.demonstrations)) for r in ctx.resamples])
    )


ARMS: dict[str, Callable[[ArmContext], ArmOutput]] = {}


def register_arm(name: str, fn: Callable[[ArmContext], ArmOutput]) -> None:
    ARMS[name] = fn


def get_arm(name: str) -> Callable[[ArmContext], ArmOutput]:
    if name not in ARMS:
        raise ValueError(f"unknown arm {name!r}; registered: {sorted(ARMS)}")
    return ARMS[name]


register_arm("anchor", anchor_arm)
register_arm("icl", icl_arm)
register_arm("it", it_arm)
register_arm("it_seed2", it_seed2_arm)
register_arm("icl_reordered", icl_reordered_arm)
