"""The tuned arms: ``it`` (the query alone on the model tuned on the resample's
demonstrations, one adapter or model copy per demonstration set and seed) and ``it_seed2``
(the same with another tuning seed: the noise ceiling). Registered in :mod:`iclit.engine.arms`.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from iclit.core.batching import filled
from iclit.engine.readout import ArmContext, ArmOutput, concat_outputs, pick_rows, read_out
from iclit.tuning import TuningResult, tuned, tuned_many

__all__ = ["it_arm", "it_seed2_arm"]


def it_arm(ctx: ArmContext) -> ArmOutput:
    """The query alone on the model tuned on the resample's demonstrations.

    One adapter (or model copy) per demonstration set and seed (:meth:`ArmContext.sets`,
    :attr:`ArmContext.it_seeds`); every query of the set is read through it. Fast path
    (LoRA): up to the memory plan's adapters per pass train together in one batched
    forward/backward, and the states are captured in batched passes with each row routed to
    its set's adapter. Otherwise (full fine-tuning, or ``fast=False``): one PEFT adapter or
    one model copy per set and seed, one after another.

    With ``recipe.capture_steps``, seed 0's tuned model is also read after each of those steps
    of the same training run (``ArmOutput.by_step``); k = 0 sets, which have nothing to tune
    on, read the base model there too.
    """
    prompts = ctx.query_prompts()
    queries = [r.query.input for r in ctx.resamples]
    n_seeds = max(1, ctx.it_seeds)
    outputs: list[ArmOutput | None] = [None] * len(ctx.resamples)
    todo: list[list[int]] = []
    for rows in ctx.sets():
        if ctx.resamples[rows[0]].demonstrations:
            todo.append(rows)
            continue
        base = read_out(
            ctx,
            ctx.lm.model,
            [prompts[i] for i in rows],
            queries=[queries[i] for i in rows],
            prefixes=ctx.query_prefixes(len(rows)),
        )
        if ctx.on_tuned is not None:
            ctx.on_tuned(ctx.lm.model, rows, None)
        steps = {s: base for s in ctx.recipe.capture_steps}
        out = replace(
            base,
            tuning=[TuningResult() for _ in rows],
            by_step=steps,
            seeds={j: replace(base, tuning=[TuningResult() for _ in rows]) for j in range(1, n_seeds)},
        )
        for j, i in enumerate(rows):  # k = 0: nothing to tune on, IT is the base model
            picked = pick_rows(out, [j])
            picked.tuning = [out.tuning[j]]
            for off in picked.seeds:
                picked.seeds[off].tuning = [TuningResult()]
            outputs[i] = picked
        ctx.advance(len(rows))

    def store(
        rows: list[int], by_seed: list[ArmOutput], results: list[list[TuningResult]], by_step: dict[int, ArmOutput]
    ) -> None:
        """by_seed[j]: the rows' outputs through seed j's adapters; results[j][row]."""
        out = replace(by_seed[0], by_step=by_step, seeds={j: by_seed[j] for j in range(1, n_seeds)})
        for pos, i in enumerate(rows):
            picked = pick_rows(out, [pos])
            picked.tuning = [results[0][pos]]
            for j in range(1, n_seeds):
                picked.seeds[j].tuning = [results[j][pos]]
            outputs[i] = picked

    if ctx.fast and ctx.recipe.method == "lora":
        device = ctx.lm.device
        per_pass = max(1, ctx.memory_plan().adapters_per_pass // n_seeds)
        for start in range(0, len(todo), per_pass):
            group = todo[start : start + per_pass]
            rows = [i for g in group for i in g]
            first = [ctx.resamples[g[0]] for g in group]
            pair_sets = [ctx.training_pairs(r) for r in first for _ in range(n_seeds)]
            seeds = [ctx.tuning_seed(r, j) for r in first for j in range(n_seeds)]
            set_pos = [p for p, g in enumerate(group) for _ in g]  # row → its set's place in the pass
            row_prompts, row_queries = [prompts[i] for i in rows], [queries[i] for i in rows]
            by_step: dict[int, ArmOutput] = {}

            def read(
                model: nn.Module,
                router,
                j: int = 0,
                set_pos: list[int] = set_pos,
                row_prompts: list = row_prompts,
                row_queries: list = row_queries,
            ) -> ArmOutput:
                adapter = [p * n_seeds + j for p in set_pos]  # each row's adapter (seed j of its set)
                return read_out(
                    ctx,
                    model,
                    row_prompts,
                    queries=row_queries,
                    prefixes=ctx.query_prefixes(len(row_prompts)),
                    variants=adapter,
                    before_batch=lambda b: router.set([adapter[x] for x in b], device),
                )

            def on_step(step: int, model: nn.Module, router, by_step: dict[int, ArmOutput] = by_step) -> None:
                by_step[step] = read(model, router)

            with tuned_many(
                ctx.lm.model,
                ctx.lm.tokenizer,
                pair_sets,
                ctx.recipe,
                seeds=seeds,
                max_tokens=ctx.train_tokens(),
                on_step=on_step,
            ) as (model, router, results):
                last = len(results[0].losses)  # the end of training, already read when captured
                by_seed = [
                    by_step[last] if j == 0 and last in by_step else read(model, router, j) for j in range(n_seeds)
                ]
                if ctx.on_tuned is not None:

                    def route_first_seed(batch: list[int], set_pos: list[int] = set_pos) -> None:
                        router.set([set_pos[x] * n_seeds for x in batch], device)

                    ctx.on_tuned(model, rows, route_first_seed)
            per_row = [[results[set_pos[x] * n_seeds + j] for x in range(len(rows))] for j in range(n_seeds)]
            store(rows, by_seed, per_row, by_step)
            ctx.advance(len(rows))
    else:
        for rows in todo:
            r = ctx.resamples[rows[0]]
            row_prompts, row_queries = [prompts[i] for i in rows], [queries[i] for i in rows]
            by_seed, results, by_step = [], [], {}
            for j in range(n_seeds):
                seed_steps: dict[int, ArmOutput] = {}

                def read_one(
                    model: nn.Module, row_prompts: list = row_prompts, row_queries: list = row_queries
                ) -> ArmOutput:
                    return read_out(
                        ctx, model, row_prompts, queries=row_queries, prefixes=ctx.query_prefixes(len(row_prompts))
                    )

                def on_seed_step(step: int, model: nn.Module, steps: dict[int, ArmOutput] = seed_steps) -> None:
                    steps[step] = read_one(model)

                recipe = ctx.recipe if j == 0 else replace(ctx.recipe, capture_steps=())
                with tuned(
                    ctx.lm.model,
                    ctx.lm.tokenizer,
                    ctx.training_pairs(r),
                    recipe,
                    seed=ctx.tuning_seed(r, j),
                    reference=not ctx.fast,
                    on_step=on_seed_step if j == 0 else None,
                ) as (model, result):
                    last = len(result.losses)  # the end of training, already read when captured
                    by_seed.append(seed_steps[last] if last in seed_steps else read_one(model))
                    if j == 0 and ctx.on_tuned is not None:
                        ctx.on_tuned(model, rows, None)
                results.append([result] * len(rows))
                if j == 0:
                    by_step = seed_steps
            store(rows, by_seed, results, by_step)
            ctx.advance(len(rows))
    return concat_outputs(filled(outputs))


def it_seed2_arm(ctx: ArmContext) -> ArmOutput:
    """The ``it`` arm with another tuning seed (LoRA initialisation, data order, dropout):
    ``it`` vs ``it_seed2`` is the noise ceiling of ICL–IT similarity."""
    return it_arm(
        replace(
            ctx,
            seed_offset=ctx.seed_offset + 1,
            it_seeds=1,
            recipe=replace(ctx.recipe, capture_steps=()),
            on_tuned=None,
        )
    )
