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
  ``it_seed2`` is the noise ceiling of the ICL–IT similarity.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
from torch import nn

from iclit.engine.capture import capture, greedy_continuations, label_token_ids
from iclit.models import LoadedModel
from iclit.tasks import Resample, Task, Template
from iclit.engine.memory import MemoryPlan, plan_memory
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

    def memory_plan(self) -> MemoryPlan:
        """How the batched IT path splits its work (memoised per model and settings)."""
        key = ("memory_plan", self.recipe.rank, tuple(self.recipe.targets), self.memory_budget,
               self.max_train_tokens, self.adapters_per_pass)
        if key not in self.lm.memo:
            self.lm.memo[key] = plan_memory(
                self.lm.model, self.lm.device, rank=self.recipe.rank, targets=tuple(self.recipe.targets),
                budget=self.memory_budget, train_tokens=self.max_train_tokens, adapters_per_pass=self.adapters_per_pass)
        return self.lm.memo[key]

    def train_tokens(self) -> int:
        return self.memory_plan().train_tokens

    @property
    def label_ids(self) -> torch.Tensor | None:
        if self.task.kind != "classification":
            return None
        return label_token_ids(self.lm.tokenizer, [self.task.template.answer(l) for l in self.task.labels])

    def query_block(self, text: str) -> str:
        """The query as it ends every prompt (anchor, ICL and IT alike): no instruction."""
        return self.task.template.query(text, with_instruction=False)

    def query_prompts(self) -> list[str]:
        return [self.task.template.query(r.query.input) for r in self.resamples]

    def icl_prompts(self) -> list[str]:
        return [self.task.template.icl_prompt(r.demonstrations, r.query, self.demo_template) for r in self.resamples]

    def training_pairs(self, resample: Resample) -> list[tuple[str, str]]:
        fmt = self.demo_template or self.task.template
        return [fmt.training_pair(d) for d in resample.demonstrations]

    def tuning_seed(self, resample: Resample) -> int:
        return self.seed * 1_000_003 + resample.index + self.seed_offset * 7_919_993


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
    by_step: dict[int, "ArmOutput"] = field(default_factory=dict)


def read_out(
    ctx: ArmContext,
    model: nn.Module,
    prompts: Sequence[str],
    *,
    prefixes: Sequence[str | None] | None = None,
    before_batch: Callable[[list[int]], None] | None = None,
    queries: Sequence[str] | None = None,
) -> ArmOutput:
    """States at the last prompt token, plus the model's answer at that position.

    queries: the query input each prompt ends with; with ``ctx.query_mean`` the states are
    also averaged over the query's tokens (from its input prefix to the last token)."""
    tok = ctx.lm.tokenizer
    label_ids = ctx.label_ids
    span_from = None
    if ctx.query_mean:
        if queries is None:
            raise ValueError("query_mean needs the query of each prompt")
        blocks = [ctx.query_block(q) for q in queries]
        bad = next((p for p, b in zip(prompts, blocks) if not p.endswith(b)), None)
        if bad is not None:
            raise ValueError(f"query_mean: the prompt does not end with its query block: {bad[-200:]!r}")
        span_from = [len(p) - len(b) for p, b in zip(prompts, blocks)]
    cap = capture(
        model, tok, prompts, label_ids=label_ids, batch_size=ctx.batch_size,
        prefixes=prefixes if ctx.fast else None, before_batch=before_batch, reference=not ctx.fast,
        span_from=span_from,
    )
    if label_ids is not None:
        probs = torch.softmax(cap.label_logits, dim=-1)
        preds = [ctx.task.labels[i] for i in probs.argmax(dim=-1).tolist()]
        return ArmOutput(cap.states, preds, probs, pooled=cap.pooled)
    stop = ctx.task.template.io_sep or "\n"
    preds = greedy_continuations(
        model, tok, prompts, max_new_tokens=ctx.max_new_tokens, stop=stop, batch_size=ctx.batch_size,
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
        label_probs=torch.cat(probs) if probs[0] is not None else None,
        tuning=[t for o in outputs for t in o.tuning],
        pooled=torch.cat(pooled) if pooled[0] is not None else None,
        by_step={s: _concat([o.by_step[s] for o in outputs]) for s in steps},
    )


def _pick(out: ArmOutput, rows: Sequence[int]) -> ArmOutput:
    rows = list(rows)
    return ArmOutput(
        out.states[rows],
        [out.predictions[i] for i in rows],
        out.label_probs[rows] if out.label_probs is not None else None,
        pooled=out.pooled[rows] if out.pooled is not None else None,
        by_step={s: _pick(o, rows) for s, o in out.by_step.items()},
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
        query_of = dict(zip(prompts, queries))
        todo = sorted({p for p in prompts if p not in memo})
        if todo:
            fresh = read_out(ctx, ctx.lm.model, todo, queries=[query_of[p] for p in todo])
            for i, p in enumerate(todo):
                memo[p] = _pick(fresh, [i])
        out = _concat([memo[p] for p in prompts])
    ctx.advance(len(ctx.resamples))
    return out


def icl_arm(ctx: ArmContext) -> ArmOutput:
    """Demonstrations + query on the base model; on the fast path the demonstrations' key/value
    cache is computed once per demonstration set and shared by its queries."""
    prefixes = [ctx.task.template.icl_prefix(r.demonstrations, ctx.demo_template) for r in ctx.resamples]
    out = read_out(ctx, ctx.lm.model, ctx.icl_prompts(), prefixes=prefixes,
                   queries=[r.query.input for r in ctx.resamples])
    ctx.advance(len(ctx.resamples))
    return out


def it_arm(ctx: ArmContext) -> ArmOutput:
    """The query alone on the model tuned on the resample's demonstrations.

    Fast path (LoRA): up to the memory plan's adapters per pass — one per resample — train together
    in one batched forward/backward, and their states are captured in batched passes with each
    row routed to its own adapter. Otherwise (full fine-tuning, or ``fast=False``): one PEFT
    adapter or one model copy per resample, one after another.

    With ``recipe.capture_steps``, the tuned model is also read after each of those steps of
    the same training run (``ArmOutput.by_step``); k = 0 resamples, which have nothing to
    tune on, read the base model there too.
    """
    prompts = ctx.query_prompts()
    queries = [r.query.input for r in ctx.resamples]
    outputs: list[ArmOutput | None] = [None] * len(ctx.resamples)
    todo = []
    for i, r in enumerate(ctx.resamples):
        if not r.demonstrations:  # k = 0: nothing to tune on, IT is the base model
            base = read_out(ctx, ctx.lm.model, [prompts[i]], queries=[queries[i]])
            outputs[i] = replace(base, tuning=[TuningResult()], by_step={s: base for s in ctx.recipe.capture_steps})
            ctx.advance(1)
        else:
            todo.append(i)
    if ctx.fast and ctx.recipe.method == "lora":
        device = ctx.lm.device
        per_pass = ctx.memory_plan().adapters_per_pass
        for start in range(0, len(todo), per_pass):
            chunk = todo[start : start + per_pass]
            pair_sets = [ctx.training_pairs(ctx.resamples[i]) for i in chunk]
            seeds = [ctx.tuning_seed(ctx.resamples[i]) for i in chunk]
            chunk_prompts, chunk_queries = [prompts[i] for i in chunk], [queries[i] for i in chunk]
            by_step: dict[int, ArmOutput] = {}

            def read(model: nn.Module, router) -> ArmOutput:
                return read_out(ctx, model, chunk_prompts, queries=chunk_queries,
                                before_batch=lambda rows: router.set(rows, device))

            def on_step(step: int, model: nn.Module, router) -> None:
                by_step[step] = read(model, router)

            with tuned_many(
                ctx.lm.model, ctx.lm.tokenizer, pair_sets, ctx.recipe, seeds=seeds, max_tokens=ctx.train_tokens(),
                on_step=on_step,
            ) as (model, router, results):
                last = len(results[0].losses)  # the end of training, already read when captured
                final = by_step[last] if last in by_step else read(model, router)
            out = replace(final, by_step=by_step)
            for j, i in enumerate(chunk):
                outputs[i] = _pick(out, [j])
                outputs[i].tuning = [results[j]]
            ctx.advance(len(chunk))
    else:
        for i in todo:
            r = ctx.resamples[i]
            by_step = {}

            def on_step(step: int, model: nn.Module, i: int = i, by_step: dict = by_step) -> None:
                by_step[step] = read_out(ctx, model, [prompts[i]], queries=[queries[i]])

            with tuned(
                ctx.lm.model, ctx.lm.tokenizer, ctx.training_pairs(r), ctx.recipe,
                seed=ctx.tuning_seed(r), reference=not ctx.fast, on_step=on_step,
            ) as (model, result):
                last = len(result.losses)  # the end of training, already read when captured
                final = by_step[last] if last in by_step else read_out(ctx, model, [prompts[i]], queries=[queries[i]])
            outputs[i] = replace(final, tuning=[result], by_step=by_step)
            ctx.advance(1)
    return _concat(outputs)


def it_seed2_arm(ctx: ArmContext) -> ArmOutput:
    """The ``it`` arm with another tuning seed (LoRA initialisation, data order, dropout):
    ``it`` vs ``it_seed2`` is the noise ceiling of ICL–IT similarity."""
    return it_arm(replace(ctx, seed_offset=ctx.seed_offset + 1, recipe=replace(ctx.recipe, capture_steps=())))


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
