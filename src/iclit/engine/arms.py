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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from iclit.core.batching import filled
from iclit.core.tokens import label_token_ids
from iclit.engine.capture import capture, greedy_continuations
from iclit.engine.memory import MemoryPlan, plan_memory
from iclit.models import LoadedModel
from iclit.tasks import Resample, Task, Template
from iclit.tuning import TuningRecipe, TuningResult, tuned, tuned_many


@dataclass
class ArmContext:
    """Everything an arm needs for a batch of resamples."""

    lm: LoadedModel
    task: Task
    resamples: Sequence[Resample]
    recipe: TuningRecipe = field(default_factory=TuningRecipe)
    seed: int = 0
    batch_size: int = 16
    max_new_tokens: int = 48
    advance: Callable[[int], None] = lambda n: None
    demo_template: Template | None = None
    """Template of the demonstrations when they come from another task (ICL and IT)."""
    fast: bool = True
    """Use the fast engine (prefix-cached ICL, batched multi-adapter LoRA, memoised anchor
    states); False runs the straightforward path, for checking."""
    adapters_per_pass: int | None = None
    """How many LoRA adapters the fast IT path trains together; None: planned from the free
    memory (:func:`iclit.engine.memory.plan_memory`, at most 64)."""
    max_train_tokens: int | None = None
    """Padded tokens per training micro-batch of the fast IT path (memory bound); None:
    planned (at most 768 on the CPU, 32768 on a GPU)."""
    memory_budget: int | str | None = None
    """Bytes the plan may use ("8GiB"); None: half the free memory."""

    seed_offset: int = 0
    """Added (times a large prime) to every tuning seed: 0 for ``it``, 1 for ``it_seed2``."""
    query_mean: bool = False
    """Also capture the states averaged over the query's tokens (``ArmOutput.pooled``)."""
    it_seeds: int = 1
    """Tuning seeds per demonstration set, trained in the same batched pass: the ``it`` arm's
    output is seed 0's, ``ArmOutput.seeds[j]`` seed j's (``it_seed{j+1}``)."""
    on_tuned: Callable[[nn.Module, list[int], Callable[[list[int]], None] | None], None] | None = None
    """Called by the ``it`` arm while each tuned model (seed 0's) exists, as
    ``on_tuned(model, rows, route)``: rows, the indices into :attr:`resamples` it was tuned
    for; ``route(b)`` (or None: no routing needed) points the rows of the next forward pass,
    positions ``b`` into ``rows``, at their sets' adapters. The causal analyses' reverse patch
    (:class:`iclit.engine.causal.ReversePatch`)."""

    def memory_plan(self) -> MemoryPlan:
        """How the batched IT path splits its work (memoised per model and settings)."""
        key = (
            "memory_plan",
            self.recipe.rank,
            tuple(self.recipe.targets),
            self.memory_budget,
            self.max_train_tokens,
            self.adapters_per_pass,
        )
        if key not in self.lm.memo:
            self.lm.memo[key] = plan_memory(
                self.lm.model,
                self.lm.device,
                rank=self.recipe.rank,
                targets=tuple(self.recipe.targets),
                budget=self.memory_budget,
                train_tokens=self.max_train_tokens,
                adapters_per_pass=self.adapters_per_pass,
            )
        return self.lm.memo[key]

    def train_tokens(self) -> int:
        return self.memory_plan().train_tokens

    @property
    def label_ids(self) -> torch.Tensor | None:
        if self.task.kind != "classification":
            return None
        return label_token_ids(self.lm.tokenizer, [self.task.template.answer(label) for label in self.task.label_words])

    def query_block(self, text: str) -> str:
        """The query as it ends every prompt (anchor, ICL and IT alike): no instruction."""
        return self.task.template.query_end(text)

    def query_prefixes(self, n: int) -> list[str]:
        """The text each of ``n`` query prompts starts with (the instruction, if any; the same
        for all): on the fast path the anchor's and IT's prompts share its key/value cache
        (IT's once per adapter)."""
        return [self.task.template.icl_prefix(())] * n

    def query_prompts(self) -> list[str]:
        return [self.task.template.query(r.query.input) for r in self.resamples]

    def icl_prompts(self) -> list[str]:
        return [self.task.template.icl_prompt(r.demonstrations, r.query, self.demo_template) for r in self.resamples]

    def training_pairs(self, resample: Resample) -> list[tuple[str, str]]:
        fmt = self.demo_template or self.task.template
        return [fmt.training_pair(d) for d in resample.demonstrations]

    def tuning_seed(self, resample: Resample, offset: int = 0) -> int:
        """The seed of the set's adapter (one query per set: the resample's index)."""
        return self.seed * 1_000_003 + resample.set_id + (self.seed_offset + offset) * 7_919_993

    def sets(self) -> list[list[int]]:
        """Rows of :attr:`resamples` grouped by demonstration set, in order of first appearance."""
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(self.resamples):
            groups.setdefault(r.set_id, []).append(i)
        return list(groups.values())


@dataclass
class ArmOutput:
    """states: [n, L+1, d]; predictions: n answers (label words or generated text);
    label_probs: [n, n_labels] normalised over the labels (classification) or None;
    tuning: per-resample tuning results (IT arms) or empty; pooled: [n, L+1, d] states
    averaged over the query's tokens (:attr:`ArmContext.query_mean`) or None; by_step: for
    IT arms whose recipe has ``capture_steps``, the same outputs after each of those steps."""

    states: torch.Tensor
    predictions: list[str]
    label_probs: torch.Tensor | None = None
    tuning: list[TuningResult] = field(default_factory=list)
    pooled: torch.Tensor | None = None
    by_step: dict[int, ArmOutput] = field(default_factory=dict)
    seeds: dict[int, ArmOutput] = field(default_factory=dict)
    """IT arms with :attr:`ArmContext.it_seeds` ≥ 2: seed offset j (≥ 1) → the same outputs
    from the adapter tuned with that seed."""


def read_out(
    ctx: ArmContext,
    model: nn.Module,
    prompts: Sequence[str],
    *,
    prefixes: Sequence[str | None] | None = None,
    before_batch: Callable[[list[int]], None] | None = None,
    queries: Sequence[str] | None = None,
    variants: Sequence[int] | None = None,
) -> ArmOutput:
    """States at the last prompt token, plus the model's answer at that position.

    queries: the query input each prompt ends with; with ``ctx.query_mean`` the states are
    also averaged over the query's tokens (from its input prefix to the last token).
    prefixes, variants: shared text prefixes and the model variant (adapter) of each prompt,
    for :func:`~iclit.engine.capture.capture` (the fast path only)."""
    tok = ctx.lm.tokenizer
    label_ids = ctx.label_ids
    span_from = None
    if ctx.query_mean:
        if queries is None:
            raise ValueError("query_mean needs the query of each prompt")
        blocks = [ctx.query_block(q) for q in queries]
        bad = next((p for p, b in zip(prompts, blocks, strict=True) if not p.endswith(b)), None)
        if bad is not None:
            raise ValueError(f"query_mean: the prompt does not end with its query block: {bad[-200:]!r}")
        span_from = [len(p) - len(b) for p, b in zip(prompts, blocks, strict=True)]
    cap = capture(
        model,
        tok,
        prompts,
        label_ids=label_ids,
        batch_size=ctx.batch_size,
        prefixes=prefixes if ctx.fast else None,
        before_batch=before_batch,
        reference=not ctx.fast,
        span_from=span_from,
        variants=variants,
    )
    if label_ids is not None:
        if cap.label_logits is None:
            raise RuntimeError("the capture returned no label logits although label ids were given")
        probs = torch.softmax(cap.label_logits, dim=-1)
        preds = [ctx.task.label_words[i] for i in probs.argmax(dim=-1).tolist()]
        return ArmOutput(cap.states, preds, probs, pooled=cap.pooled)
    stop = ctx.task.template.io_sep or "\n"
    preds = greedy_continuations(
        model,
        tok,
        prompts,
        max_new_tokens=ctx.max_new_tokens,
        stop=stop,
        batch_size=ctx.batch_size,
        before_batch=before_batch,
    )
    return ArmOutput(cap.states, preds, pooled=cap.pooled)


def _concat(outputs: list[ArmOutput]) -> ArmOutput:
    probs = [o.label_probs for o in outputs]
    pooled = [o.pooled for o in outputs]
    steps = sorted({s for o in outputs for s in o.by_step})
    return ArmOutput(
        states=torch.cat([o.states for o in outputs]),
        predictions=[p for o in outputs for p in o.predictions],
        label_probs=torch.cat(filled(probs)) if probs[0] is not None else None,
        tuning=[t for o in outputs for t in o.tuning],
        pooled=torch.cat(filled(pooled)) if pooled[0] is not None else None,
        by_step={s: _concat([o.by_step[s] for o in outputs]) for s in steps},
        seeds={j: _concat([o.seeds[j] for o in outputs]) for j in sorted({j for o in outputs for j in o.seeds})},
    )


def _pick(out: ArmOutput, rows: Sequence[int]) -> ArmOutput:
    rows = list(rows)
    return ArmOutput(
        out.states[rows],
        [out.predictions[i] for i in rows],
        out.label_probs[rows] if out.label_probs is not None else None,
        pooled=out.pooled[rows] if out.pooled is not None else None,
        by_step={s: _pick(o, rows) for s, o in out.by_step.items()},
        seeds={j: _pick(o, rows) for j, o in out.seeds.items()},
    )


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
                memo[p] = _pick(fresh, [i])
        out = _concat([memo[p] for p in prompts])
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
            picked = _pick(out, [j])
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
            picked = _pick(out, [pos])
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
    return _concat(filled(outputs))


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
