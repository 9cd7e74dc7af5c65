"""What an arm is given (:class:`ArmContext`) and returns (:class:`ArmOutput`), and the
read-out every arm ends with (:func:`read_out`: the states at the last prompt token and the
model's answer), for the arms of :mod:`iclit.engine.arms`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from iclit.core.batching import filled
from iclit.core.tokens import label_token_ids
from iclit.engine.capture import capture, greedy_continuations
from iclit.engine.memory import MemoryPlan, plan_memory
from iclit.models import LoadedModel
from iclit.tasks import Resample, Task, Template
from iclit.tuning import TuningRecipe, TuningResult

__all__ = ["ArmContext", "ArmOutput", "concat_outputs", "pick_rows", "read_out"]


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


def concat_outputs(outputs: list[ArmOutput]) -> ArmOutput:
    """The outputs of several batches of rows as one, in order (steps and seeds alike)."""
    probs = [o.label_probs for o in outputs]
    pooled = [o.pooled for o in outputs]
    steps = sorted({s for o in outputs for s in o.by_step})
    return ArmOutput(
        states=torch.cat([o.states for o in outputs]),
        predictions=[p for o in outputs for p in o.predictions],
        label_probs=torch.cat(filled(probs)) if probs[0] is not None else None,
        tuning=[t for o in outputs for t in o.tuning],
        pooled=torch.cat(filled(pooled)) if pooled[0] is not None else None,
        by_step={s: concat_outputs([o.by_step[s] for o in outputs]) for s in steps},
        seeds={j: concat_outputs([o.seeds[j] for o in outputs]) for j in sorted({j for o in outputs for j in o.seeds})},
    )


def pick_rows(out: ArmOutput, rows: Sequence[int]) -> ArmOutput:
    """The given rows of an output (steps and seeds alike)."""
    rows = list(rows)
    return ArmOutput(
        out.states[rows],
        [out.predictions[i] for i in rows],
        out.label_probs[rows] if out.label_probs is not None else None,
        pooled=out.pooled[rows] if out.pooled is not None else None,
        by_step={s: pick_rows(o, rows) for s, o in out.by_step.items()},
        seeds={j: pick_rows(o, rows) for j, o in out.seeds.items()},
    )
