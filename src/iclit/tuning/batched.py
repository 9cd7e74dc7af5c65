"""The batched multi-adapter LoRA path: N independent adapters stacked in every target linear
(:class:`MultiLoRALinear`, rows routed by :class:`AdapterRouter`), started as PEFT would
start them, and trained together in one forward/backward per micro-batch on the shared loop
(:func:`fit_many`, :func:`tuned_many`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import cast

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from iclit.core.batching import SharedPrefix, padded_groups
from iclit.models.arch import linear_shape, target_linears
from iclit.tuning.loop import train
from iclit.tuning.loss import (
    AnswerBatch,
    answer_states,
    encode_pairs,
    head_cross_entropy,
    shared_prefix_length,
    subset_batch,
)
from iclit.tuning.recipe import TuningRecipe, TuningResult


def default_train_tokens(device: torch.device) -> int:
    """Padded tokens per training micro-batch of the batched IT path: 768 on CPU (about 1.4 MB
    of saved activations per token on Gemma-3-270M in fp32, so a run stays near 3 GB), 32768
    on CUDA. Results do not depend on it beyond float rounding."""
    return 32768 if device.type == "cuda" else 768


def forward_cost_tokens(device: torch.device) -> int:
    """What one more forward of a micro-batch costs, in padded tokens, when a micro-batch is
    split into forwards of similar length (:func:`~iclit.core.batching.padded_groups`): 32 on
    CPU (measured on Gemma-3-270M with one thread: 8 and 96 were both slower; with two threads
    the split neither gains nor loses, ``benchmarks/tuning_split.py``); 4096 on CUDA, where a
    token costs little and a forward's kernel launches much (not measured: about the old one
    padded forward per micro-batch)."""
    return 32 if device.type == "cpu" else 4096


class AdapterRouter:
    """Which adapter each batch row uses: ``rows`` is a [b] long tensor set before a forward."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None

    def set(self, rows: Sequence[int] | torch.Tensor, device: torch.device | None = None) -> None:
        self.rows = torch.as_tensor(rows, dtype=torch.long, device=device)


class MultiLoRALinear(nn.Module):
    """A frozen linear layer plus N stacked LoRA adapters; row i of the batch goes through
    adapter ``router.rows[i]``.

    y = base(x) + (alpha / r) · B[a] (A[a] dropout(x)),   A: [N, r, in], B: [N, out, r]

    ``base`` is an ``nn.Linear`` (y = x Wᵀ + b) or transformers' ``Conv1D`` (GPT-2: weight
    [in, out], y = x W + b); the adapter is the same on both, as PEFT's LoRA ``Linear`` (which
    takes ``Conv1D`` with ``fan_in_fan_out``, a flag that matters only when merging). Same
    parametrisation and scaling as PEFT (``lora_alpha / r``). ``routes_rows``: it needs whole
    batch rows (so :func:`iclit.tuning.last_block_rows` leaves a feed-forward part holding it
    alone).
    """

    routes_rows = True

    def __init__(self, base: nn.Module, n: int, rank: int, alpha: float, dropout: float, router: AdapterRouter) -> None:
        super().__init__()
        self.base = base
        self.router = router
        self.scaling = alpha / rank
        self.dropout = dropout
        self.in_features, self.out_features = linear_shape(base)
        dev = cast(torch.Tensor, base.weight).device
        self.lora_A = nn.Parameter(torch.zeros(n, rank, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(n, self.out_features, rank, device=dev))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [b, s, in] → [b, s, out]."""
        result = self.base(x)
        rows = self.router.rows
        h = x.to(self.lora_A.dtype)
        if self.dropout and self.training:
            h = nn.functional.dropout(h, self.dropout)
        a = self.lora_A[rows]  # [b, r, in]
        b = self.lora_B[rows]  # [b, out, r]
        delta = torch.matmul(torch.matmul(h, a.transpose(1, 2)), b.transpose(1, 2))
        return result + (delta * self.scaling).to(result.dtype)


def _target_linears(model: nn.Module, targets: Sequence[str] | str | None) -> list[tuple[str, nn.Module]]:
    """The linear layers (``nn.Linear`` or ``Conv1D``) a recipe's ``targets`` name, in module
    order (the order PEFT creates its adapters in): :func:`iclit.models.arch.target_linears`
    (the default means the architecture's query and value projections; ``"all-linear"``)."""
    return target_linears(model, targets)


def peft_like_init(shapes: Sequence[tuple[int, int]], rank: int, seed: int) -> list[torch.Tensor]:
    """The initial lora_A matrices that PEFT draws after ``torch.manual_seed(seed)``.

    PEFT builds, per target module in order, ``nn.Linear(in, r)`` and ``nn.Linear(r, out)``
    (each drawing its default init) and then re-draws lora_A with Kaiming-uniform (a=√5);
    lora_B starts at zero. Replaying those draws gives a batched adapter the same start as a
    PEFT adapter with the same seed (checked against PEFT in the tests).
    """
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for in_features, out_features in shapes:
            a = nn.Linear(in_features, rank, bias=False)
            nn.Linear(rank, out_features, bias=False)
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            out.append(a.weight.detach().clone())
    return out


@contextmanager
def multi_lora(
    model: nn.Module, recipe: TuningRecipe, seeds: Sequence[int]
) -> Iterator[tuple[AdapterRouter, list[MultiLoRALinear]]]:
    """Inject ``len(seeds)`` fresh LoRA adapters into every target linear of ``model``
    (``recipe.targets`` resolved for its architecture, :func:`_target_linears`).

    Adapter j starts where a PEFT adapter with ``torch.manual_seed(seeds[j])`` would. The
    original modules are put back on exit.
    """
    router = AdapterRouter()
    targets = _target_linears(model, recipe.targets)
    wrapped: list[MultiLoRALinear] = []
    for _, base in targets:
        wrapped.append(MultiLoRALinear(base, len(seeds), recipe.rank, recipe.alpha, recipe.dropout, router))
    shapes = [linear_shape(base) for _, base in targets]
    with torch.no_grad():
        for j, seed in enumerate(seeds):
            for module, a in zip(wrapped, peft_like_init(shapes, recipe.rank, seed), strict=True):
                module.lora_A[j].copy_(a)
    for (name, _), module in zip(targets, wrapped, strict=True):
        model.set_submodule(name, module)
    try:
        yield router, wrapped
    finally:
        for (name, base), _ in zip(targets, wrapped, strict=True):
            model.set_submodule(name, base)


def clip_per_adapter(modules: Sequence[MultiLoRALinear], max_norm: float) -> None:
    """Clip each adapter's gradient by its own norm (over its slices of every A and B), as
    ``clip_grad_norm_`` would for that adapter alone."""
    grads = [p.grad for m in modules for p in (m.lora_A, m.lora_B) if p.grad is not None]
    sq = torch.stack([g.flatten(1).pow(2).sum(dim=1) for g in grads]).sum(dim=0)  # [N]
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))


def fit_many(
    model: nn.Module,
    modules: Sequence[MultiLoRALinear],
    router: AdapterRouter,
    batch: AnswerBatch,
    adapter_of: torch.Tensor,
    recipe: TuningRecipe,
    seeds: Sequence[int],
    *,
    max_tokens: int = 2048,
    share_prefix: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> list[TuningResult]:
    """Train N adapters at once; adapter j sees only the sequences with ``adapter_of == j``.

    The objective is the sum over adapters of each adapter's mean answer-token loss, so each
    adapter gets exactly the gradient it would get alone. Each optimiser step's sequences are
    run in length-sorted micro-batches of at most ``max_tokens`` padded tokens whose gradients
    accumulate (memory stays bounded however many adapters train); a micro-batch runs as
    forwards of sequences of similar length (little compute goes to padding) whose answer rows
    share one LM-head sweep (:func:`~iclit.core.batching.padded_groups`). Gradient clipping
    is per adapter (:func:`clip_per_adapter`). With ``share_prefix``, the token prefix common
    to all sequences (the instruction) is computed once per adapter per step, not once per
    sequence (:class:`~iclit.core.batching.SharedPrefix`).
    AdamW is element-wise, so one optimiser over the stacked tensors keeps independent
    per-adapter state. The loop is :func:`iclit.tuning.loop.train` with one group of rows per
    adapter: minibatches (``recipe.batch_size``) are drawn per adapter from its own seeded
    generator, as :func:`~iclit.tuning.fit` does. ``on_step`` is called as in ``fit``.
    """
    n = len(seeds)
    device = batch.input_ids.device
    adapter_of = adapter_of.to(device)
    params = [p for m in modules for p in (m.lora_A, m.lora_B)]
    members = [torch.nonzero(adapter_of == j).flatten().tolist() for j in range(n)]
    lengths = batch.attention_mask.sum(dim=1).tolist()
    split_cost = forward_cost_tokens(device)
    prefix = shared_prefix_length(batch) if share_prefix else 0
    if prefix < 8:  # too short to be worth a second pass
        prefix = 0

    def run_step(rows: list[int], grad: bool) -> torch.Tensor:
        """Mean answer loss per adapter over ``rows`` ([n]); with ``grad``, gradients too."""
        in_rows = torch.isin(batch.example, torch.tensor(rows, device=device))
        counts = torch.bincount(adapter_of[batch.example[in_rows]], minlength=n).clamp(min=1).to(torch.float32)
        total = torch.zeros(n, device=device)
        with torch.set_grad_enabled(grad):
            shared = None
            if prefix:
                adapters = torch.unique(adapter_of[rows])
                shared = SharedPrefix(model, batch.input_ids[:1, :prefix], adapters, grad, route=router.set)
            for group in padded_groups([lengths[r] - prefix for r in rows], max_tokens, split_cost):
                states, targets, owner = [], [], []
                for part in group:  # sub-batches of similar length: little padding
                    mb_rows = [rows[i] for i in part]
                    mb = subset_batch(batch, mb_rows)
                    row_adapter = adapter_of[mb_rows]
                    router.set(row_adapter, device)
                    states.append(answer_states(model, mb, shared, row_adapter))
                    targets.append(mb.targets)
                    owner.append(row_adapter[mb.example])
                per_token = head_cross_entropy(model, torch.cat(states), torch.cat(targets))  # one head sweep
                contrib = torch.zeros(n, device=device).index_add(0, torch.cat(owner), per_token) / counts
                if grad:
                    contrib.sum().backward()
                total += contrib.detach()
            if grad and shared is not None:
                shared.backward()
        return total

    return train(
        model,
        recipe,
        params,
        members,
        seeds,
        step_loss=lambda rows: run_step(rows, grad=True),
        clip=lambda max_norm: clip_per_adapter(modules, max_norm),
        final_loss=lambda: run_step(list(range(len(lengths))), grad=False),
        on_step=on_step,
    )


@contextmanager
def tuned_many(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pair_sets: Sequence[Sequence[tuple[str, str]]],
    recipe: TuningRecipe,
    *,
    seeds: Sequence[int],
    max_tokens: int = 2048,
    on_step: Callable[[int, nn.Module, AdapterRouter], None] | None = None,
) -> Iterator[tuple[nn.Module, AdapterRouter, list[TuningResult]]]:
    """Tune one LoRA adapter per pair set, all together; yield (model, router, results).

    Inside the context, ``router.set(rows)`` picks, for each row of the next batch, the
    adapter (index into ``pair_sets``) it runs through. The base model is restored on exit.
    ``max_tokens`` bounds the padded tokens of one micro-batch (memory), see :func:`fit_many`.
    ``on_step(step, model, router)`` is called after each step of ``recipe.capture_steps``.
    """
    if recipe.method != "lora":
        raise ValueError("batched multi-adapter tuning is for LoRA; full fine-tuning runs one at a time")
    device = next(model.parameters()).device
    flat = [pair for pairs in pair_sets for pair in pairs]
    adapter_of = torch.tensor([j for j, pairs in enumerate(pair_sets) for _ in pairs], dtype=torch.long)
    batch = encode_pairs(tokenizer, flat).to(device)
    with multi_lora(model, recipe, seeds) as (router, modules):
        hook = (lambda s: on_step(s, model, router)) if on_step else None
        results = fit_many(
            model, modules, router, batch, adapter_of, recipe, seeds, max_tokens=max_tokens, on_step=hook
        )
        yield model, router, results
