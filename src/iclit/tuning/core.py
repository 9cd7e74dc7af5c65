"""Instruction tuning on the demonstrations: LoRA (PEFT) or full fine-tuning.

The loss is the mean cross-entropy of the answer tokens only. It is computed from the
decoder's hidden states at the answer positions only — the full-vocabulary logits of the
prompt tokens are never built (Gemma-3 has a 262k vocabulary) — and the last block's
feed-forward part runs only at those positions (nothing after it mixes positions). With a
frozen LM head (LoRA), the answer positions' cross-entropy and its gradient come from one
sweep over the head's vocabulary in chunks (:func:`head_cross_entropy`), not a logits
tensor built, soft-maxed and multiplied back through the head.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Literal, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from iclit.engine.capture import answer_token_ids
from iclit.tuning.recipe import TuningRecipe, TuningResult
from iclit.models.arch import arch_for, decoder_of, layers_of, lm_head_logits, output_head


@dataclass
class AnswerBatch:
    """Prompt + answer token sequences, right-padded.

    input_ids, attention_mask: [b, s]; predict_at: [m] flat indices into b*s of the positions
    whose next token is an answer token; targets: [m] those answer tokens;
    example: [m] which sequence each target belongs to.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    predict_at: torch.Tensor
    targets: torch.Tensor
    example: torch.Tensor

    def to(self, device: torch.device) -> "AnswerBatch":
        return AnswerBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.predict_at, self.targets, self.example)))


def encode_pairs(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]]) -> AnswerBatch:
    """Tokenise (prompt, answer) pairs: prompt tokens exactly as at capture time, then the
    answer's tokens."""
    seqs, starts = [], []
    for prompt, answer in pairs:
        p = tokenizer(prompt)["input_ids"]
        a = answer_token_ids(tokenizer, prompt, answer)
        if not a:
            raise ValueError(f"answer {answer!r} tokenises to nothing")
        seqs.append(p + a)
        starts.append(len(p))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    predict_at, targets, example = [], [], []
    for row, (seq, start) in enumerate(zip(seqs, starts)):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        for t in range(start, len(seq)):
            predict_at.append(row * width + t - 1)
            targets.append(seq[t])
            example.append(row)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return AnswerBatch(ids, mask, as_long(predict_at), as_long(targets), as_long(example))


def head_chunk(device: torch.device) -> int:
    """Vocabulary rows per chunk of :func:`head_cross_entropy`: 1024 on CPU (the chunk of the
    head stays in cache between its two products), 32768 elsewhere (fewer kernel launches)."""
    return 1024 if device.type == "cpu" else 32768


class _ChunkedHeadCE(torch.autograd.Function):
    """Cross-entropy of ``x @ weight.T`` against ``targets`` and its gradient with respect to
    ``x``, in one pass over the vocabulary with an online softmax (running maximum and
    normaliser, the gradient's numerator rescaled as the maximum grows)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        m = x.shape[0]
        want_grad = ctx.needs_input_grad[0]
        run_max = torch.full((m, 1), -math.inf, device=x.device)
        norm = torch.zeros(m, 1, device=x.device)
        numer = torch.zeros(m, weight.shape[1], device=x.device) if want_grad else None
        for start in range(0, weight.shape[0], chunk):
            w = weight[start : start + chunk]
            logits = (x @ w.T).float()  # [m, c]
            new_max = torch.maximum(run_max, logits.amax(dim=1, keepdim=True))
            rescale = torch.exp(run_max - new_max)
            probs = torch.exp(logits - new_max)  # unnormalised
            norm = norm * rescale + probs.sum(dim=1, keepdim=True)
            if want_grad:
                numer.mul_(rescale)
                if w.dtype == torch.float32:
                    numer.addmm_(probs, w)
                else:  # bf16/fp16 head: the product in its dtype, as the library backward does
                    numer.add_((probs.to(w.dtype) @ w).float())
            run_max = new_max
        w_target = weight[targets].float()
        loss = (run_max + norm.log()).squeeze(1) - (x.float() * w_target).sum(dim=1)
        if want_grad:
            ctx.save_for_backward(numer / norm - w_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad_x,) = ctx.saved_tensors  # float32 [m, d]
        return grad_loss[:, None] * grad_x, None, None, None  # autograd casts to x's dtype


def head_cross_entropy(model: nn.Module, rows: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Cross-entropy of the next token ``targets`` [m] from final hidden states ``rows``
    [m, d]: [m] (float32).

    A frozen head without bias or soft-capping (or no gradient wanted) takes the chunked
    one-pass path (``chunk`` vocabulary rows at a time, :func:`head_chunk` by default; the
    [m, V] logits are never held); otherwise, e.g. full fine-tuning, whose head is trained,
    the library path (logits, then ``cross_entropy``). Both agree to float rounding (tested).
    """
    weight, bias, cap = output_head(model)
    if bias is None and not cap and not (torch.is_grad_enabled() and weight.requires_grad):
        x = rows.to(weight.dtype)
        return _ChunkedHeadCE.apply(x, weight, targets, chunk or head_chunk(x.device))
    return nn.functional.cross_entropy(lm_head_logits(model, rows).float(), targets, reduction="none")


class _SomeRows(nn.Module):
    """A position-wise module run on some positions only: output [b, s, d] with ``inner``'s
    output at the flat positions ``index`` (into b*s) and zeros elsewhere."""

    def __init__(self, inner: nn.Module, index: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = self.inner(flat[self.index].unsqueeze(0)).squeeze(0)
        return flat.new_zeros(flat.shape[0], out.shape[-1]).index_copy(0, self.index, out).view(*x.shape[:-1], -1)


@contextmanager
def last_block_rows(model: nn.Module, index: torch.Tensor) -> Iterator[None]:
    """Within the context, the last block's feed-forward part runs only at the flat positions
    ``index`` (into the b*s positions of the next forward): the ones whose final state is read.
    Every other position's last-block output is then wrong, and unused: nothing after the last
    block mixes positions, and every block's keys and values are computed as before. Skipped
    where that feed-forward part holds batched adapters (they route whole batch rows)."""
    layer = layers_of(model)[-1]
    name = arch_for(model).mlp
    inner = getattr(layer, name, None)
    if inner is None or any(isinstance(m, MultiLoRALinear) for m in inner.modules()):
        yield
        return
    setattr(layer, name, _SomeRows(inner, index))
    try:
        yield
    finally:
        setattr(layer, name, inner)


def answer_token_losses(model: nn.Module, batch: AnswerBatch) -> torch.Tensor:
    """Cross-entropy of each answer token: [m]. The last block's feed-forward part and the LM
    head run for the m answer positions only."""
    return _losses_at(model, batch.predict_at, batch.targets, input_ids=batch.input_ids,
                      attention_mask=batch.attention_mask, use_cache=False)


def _losses_at(model: nn.Module, at: torch.Tensor, targets: torch.Tensor, **inputs) -> torch.Tensor:
    """Run the decoder on ``inputs``; the cross-entropy of ``targets`` [m] from the final states
    at the flat positions ``at`` [m] (into its b*s outputs): [m]."""
    with last_block_rows(model, at):
        hidden = decoder_of(model)(**inputs).last_hidden_state  # [b, s, d]
    return head_cross_entropy(model, hidden.flatten(0, 1)[at], targets)


class SharedPrefix:
    """The key/value cache of a token prefix that every training sequence starts with (the
    template's instruction), computed once per adapter per optimiser step.

    The prefix runs as one batch [a, prefix] (row i through adapter ``adapters[i]``). Its
    key/value tensors are handed to the rest of each sequence as detached leaves, so any
    number of micro-batches can read them; their gradients accumulate on the leaves and
    :meth:`backward` sends them through the prefix computation once. A row's prefix states
    depend only on its adapter, so this is the same computation as running every sequence
    whole, with the prefix's gradient summed over the rows that share it.
    """

    def __init__(self, model: nn.Module, prefix_ids: torch.Tensor, adapters: torch.Tensor, router: "AdapterRouter", train: bool):
        self.length = prefix_ids.shape[1]
        self.slot = {int(a): i for i, a in enumerate(adapters.tolist())}
        ids = prefix_ids.expand(len(adapters), -1)
        router.set(adapters)
        self.cache = decoder_of(model)(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).past_key_values
        self.graph = [t for layer in self.cache.layers for t in (layer.keys, layer.values)]
        self.leaves = [t.detach().requires_grad_(train and t.requires_grad) for t in self.graph]

    def for_rows(self, row_adapter: torch.Tensor):
        """A cache for a micro-batch: row r gets the prefix of adapter ``row_adapter[r]``."""
        index = torch.tensor([self.slot[int(a)] for a in row_adapter.tolist()], device=row_adapter.device)
        fresh = copy.copy(self.cache)
        fresh.layers = [copy.copy(layer) for layer in self.cache.layers]
        for j, layer in enumerate(fresh.layers):
            layer.keys = self.leaves[2 * j][index]
            layer.values = self.leaves[2 * j + 1][index]
        return fresh

    def backward(self) -> None:
        pairs = [(t, leaf.grad) for t, leaf in zip(self.graph, self.leaves) if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], grad_tensors=[g for _, g in pairs])


def shared_prefix_token_losses(model: nn.Module, batch: AnswerBatch, prefix: SharedPrefix, row_adapter: torch.Tensor) -> torch.Tensor:
    """:func:`answer_token_losses` for sequences whose first ``prefix.length`` tokens are the
    shared prefix: only the rest of each sequence runs, on top of the prefix's cache (row r
    reads adapter ``row_adapter[r]``'s prefix; the caller routes the rows themselves)."""
    p = prefix.length
    width = batch.input_ids.shape[1]
    at = (batch.predict_at // width) * (width - p) + batch.predict_at % width - p  # into b*(s - p)
    return _losses_at(model, at, batch.targets, input_ids=batch.input_ids[:, p:], attention_mask=batch.attention_mask,
                      past_key_values=prefix.for_rows(row_adapter), use_cache=True)


def shared_prefix_length(batch: AnswerBatch) -> int:
    """Tokens that every sequence of ``batch`` starts with and that predict no answer token."""
    from iclit.engine.capture import common_prefix_length

    lengths = batch.attention_mask.sum(dim=1).tolist()
    seqs = [batch.input_ids[i, :n].tolist() for i, n in enumerate(lengths)]
    first_answer = int((batch.predict_at % batch.input_ids.shape[1]).min())
    return min(common_prefix_length(seqs), first_answer)


def answer_loss(model: nn.Module, batch: AnswerBatch) -> torch.Tensor:
    """Mean answer-token cross-entropy (a scalar)."""
    return answer_token_losses(model, batch).mean()


def reference_answer_loss(model: nn.Module, batch: AnswerBatch) -> torch.Tensor:
    """The same loss the straightforward way: transformers' own ``labels=`` loss, with -100
    on prompt and padding tokens (full-vocabulary logits at every position)."""
    labels = torch.full_like(batch.input_ids, -100)
    labels.view(-1)[batch.predict_at + 1] = batch.targets
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss


def _subset(batch: AnswerBatch, rows: Sequence[int]) -> AnswerBatch:
    """The sequences ``rows`` of a batch (in that order), cropped to their longest length."""
    rows = list(rows)
    dev = batch.example.device
    index = torch.tensor(rows, dtype=torch.long, device=dev)
    width = batch.input_ids.shape[1]
    new_width = int(batch.attention_mask[index].sum(dim=1).max())
    remap = torch.full((batch.input_ids.shape[0],), -1, dtype=torch.long, device=dev)
    remap[index] = torch.arange(len(rows), device=dev)
    keep = remap[batch.example] >= 0
    new_ex = remap[batch.example[keep]]
    pos = batch.predict_at[keep] % width
    return AnswerBatch(
        batch.input_ids[index, :new_width],
        batch.attention_mask[index, :new_width],
        new_ex * new_width + pos,
        batch.targets[keep],
        new_ex,
    )


def micro_batches(lengths: Sequence[int], max_tokens: int, sizes: Sequence[int] | None = None) -> list[list[int]]:
    """Split items into micro-batches of similar length whose padded size (rows × longest)
    stays within ``max_tokens`` (at least one item each): bounded memory, little padding.
    An item is one row, or ``sizes[i]`` rows of at most ``lengths[i]`` tokens."""
    sizes = sizes or [1] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    rows = 0
    for i in order:
        if batches and (rows + sizes[i]) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
            rows += sizes[i]
        else:
            batches.append([i])
            rows = sizes[i]
    return batches


def fit(
    model: nn.Module,
    params: list[nn.Parameter],
    batch: AnswerBatch,
    recipe: TuningRecipe,
    seed: int,
    *,
    reference: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> TuningResult:
    """Train ``params`` of ``model`` on ``batch`` with AdamW, constant learning rate.

    reference: compute the loss with :func:`reference_answer_loss` (for checking).
    on_step: called (model in eval mode) with the step number after each optimiser step in
    ``recipe.capture_steps``."""
    loss_fn = reference_answer_loss if reference else answer_loss
    start = time.perf_counter()
    # Full fine-tuning updates every weight: the fused AdamW kernel does that step several
    # times faster than the per-tensor loop (same algorithm; float rounding differs).
    fused = recipe.method == "full" and not reference
    opt = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay, fused=fused or None)
    n = batch.input_ids.shape[0]
    size = recipe.batch_size or n
    gen = torch.Generator().manual_seed(seed)
    result = TuningResult()
    _check_capture_steps(recipe, recipe.epochs * math.ceil(n / size))
    step = 0
    model.train()
    try:
        for _ in range(recipe.epochs):
            order = torch.randperm(n, generator=gen).tolist() if size < n else list(range(n))
            for i in range(0, n, size):
                mb = batch if size >= n else _subset(batch, order[i : i + size])
                loss = loss_fn(model, mb)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                result.losses.append(float(loss.detach()))
                step += 1
                _after_step(model, recipe, step, on_step)
    finally:
        model.eval()
    with torch.no_grad():
        result.final_loss = float(answer_loss(model, batch))
    result.seconds = time.perf_counter() - start
    return result


def _check_capture_steps(recipe: TuningRecipe, total: int) -> None:
    late = [x for x in recipe.capture_steps if x > total]
    if late:
        raise ValueError(f"tuning capture_steps {late} go past the last of the run's {total} optimiser steps")


def _after_step(model: nn.Module, recipe: TuningRecipe, step: int, on_step: Callable[[int], None] | None) -> None:
    """Call ``on_step(step)`` (model in eval mode) when ``step`` is one of the capture steps."""
    if on_step is not None and step in recipe.capture_steps:
        model.eval()
        try:
            on_step(step)
        finally:
            model.train()


def lora_config(recipe: TuningRecipe):
    from peft import LoraConfig

    return LoraConfig(
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        lora_dropout=recipe.dropout,
        target_modules=list(recipe.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


@contextmanager
def tuned(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    recipe: TuningRecipe,
    *,
    seed: int = 0,
    reference: bool = False,
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> Iterator[tuple[nn.Module, TuningResult]]:
    """Tune on ``pairs`` and yield (tuned model, result); the base model is restored after.

    reference: use transformers' own ``labels=`` loss (the straightforward path).
    on_step: called as ``on_step(step, model)`` after each step of ``recipe.capture_steps``.

    LoRA: a fresh PEFT adapter is injected into ``model`` and removed (unmerged) on exit, so
    the base weights are never changed. Full: a deep copy is tuned and dropped on exit.
    """
    device = next(model.parameters()).device
    batch = encode_pairs(tokenizer, pairs).to(device)
    torch.manual_seed(seed)
    if recipe.method == "lora":
        from peft import get_peft_model

        with warnings.catch_warnings():  # PEFT calls a transformers method deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, lora_config(recipe))
        try:
            params = [p for p in peft_model.parameters() if p.requires_grad]
            hook = (lambda s: on_step(s, peft_model)) if on_step else None
            result = fit(peft_model, params, batch, recipe, seed, reference=reference, on_step=hook)
            yield peft_model, result
        finally:
            peft_model.unload()
            vars(model).pop("peft_config", None)
            model.requires_grad_(False)
    else:
        clone = copy.deepcopy(model)
        clone.requires_grad_(True)
        try:
            hook = (lambda s: on_step(s, clone)) if on_step else None
            result = fit(clone, list(clone.parameters()), batch, recipe, seed, reference=reference, on_step=hook)
            clone.requires_grad_(False)
            yield clone, result
        finally:
            del clone


# --------------------------------------------------------------------------------------
# Batched multi-adapter LoRA: N independent adapters trained in one forward/backward.
# --------------------------------------------------------------------------------------


def default_train_tokens(device: torch.device) -> int:
    """Padded tokens per training micro-batch of the batched IT path: 768 on CPU (about 1.4 MB
    of saved activations per token on Gemma-3-270M in fp32, so a run stays near 3 GB), 32768
    on CUDA. Results do not depend on it beyond float rounding."""
    return 32768 if device.type == "cuda" else 768


class AdapterRouter:
    """Which adapter each batch row uses: ``rows`` is a [b] long tensor set before a forward."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None

    def set(self, rows: Sequence[int] | torch.Tensor, device: torch.device | None = None) -> None:
        self.rows = torch.as_tensor(rows, dtype=torch.long, device=device)


class MultiLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus N stacked LoRA adapters; row i of the batch goes through
    adapter ``router.rows[i]``.

    y = base(x) + (alpha / r) · B[a] (A[a] dropout(x)),   A: [N, r, in], B: [N, out, r]

    Same parametrisation and scaling as PEFT's LoRA ``Linear`` (``lora_alpha / r``).
    """

    def __init__(self, base: nn.Linear, n: int, rank: int, alpha: float, dropout: float, router: AdapterRouter) -> None:
        super().__init__()
        self.base = base
        self.router = router
        self.scaling = alpha / rank
        self.dropout = dropout
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(n, rank, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(n, base.out_features, rank, device=dev))

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


def _target_linears(model: nn.Module, targets: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules whose leaf name is in ``targets``, in module order (the
    order PEFT creates its adapters in)."""
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    if not found:
        raise ValueError(f"no nn.Linear named {list(targets)} in the model")
    return found


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
def multi_lora(model: nn.Module, recipe: TuningRecipe, seeds: Sequence[int]) -> Iterator[tuple[AdapterRouter, list[MultiLoRALinear]]]:
    """Inject ``len(seeds)`` fresh LoRA adapters into every target linear of ``model``.

    Adapter j starts where a PEFT adapter with ``torch.manual_seed(seeds[j])`` would. The
    original modules are put back on exit.
    """
    router = AdapterRouter()
    targets = _target_linears(model, recipe.targets)
    wrapped: list[MultiLoRALinear] = []
    for _, base in targets:
        wrapped.append(MultiLoRALinear(base, len(seeds), recipe.rank, recipe.alpha, recipe.dropout, router))
    shapes = [(base.in_features, base.out_features) for _, base in targets]
    with torch.no_grad():
        for j, seed in enumerate(seeds):
            for module, a in zip(wrapped, peft_like_init(shapes, recipe.rank, seed)):
                module.lora_A[j].copy_(a)
    for (name, _), module in zip(targets, wrapped):
        model.set_submodule(name, module)
    try:
        yield router, wrapped
    finally:
        for (name, base), _ in zip(targets, wrapped):
            model.set_submodule(name, base)


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
    accumulate (memory stays bounded however many adapters train, and little compute goes to
    padding). Gradient clipping is per adapter (the norm over that adapter's slices of every A
    and B, as ``clip_grad_norm_`` would compute for it alone). With ``share_prefix``, the
    token prefix common to all sequences (the instruction) is computed once per adapter per
    micro-batch, not once per sequence (:func:`shared_prefix_token_losses`). AdamW is element-wise, so one
    optimiser over the stacked tensors keeps independent per-adapter state. Minibatches
    (``recipe.batch_size``) are drawn per adapter from its own seeded generator, as
    :func:`fit` does. ``on_step`` is called as in :func:`fit`.
    """
    start = time.perf_counter()
    n = len(seeds)
    device = batch.input_ids.device
    adapter_of = adapter_of.to(device)
    params = [p for m in modules for p in (m.lora_A, m.lora_B)]
    opt = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    members = [torch.nonzero(adapter_of == j).flatten().tolist() for j in range(n)]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    results = [TuningResult() for _ in range(n)]
    sizes = [recipe.batch_size or len(m) for m in members]
    steps = max(math.ceil(len(m) / s) for m, s in zip(members, sizes))
    _check_capture_steps(recipe, recipe.epochs * steps)
    if recipe.capture_steps and len({math.ceil(len(m) / s) for m, s in zip(members, sizes)}) > 1:
        raise ValueError("capture_steps need every adapter to take the same number of steps per epoch "
                         "(the same number of demonstrations, or full batches)")
    lengths = batch.attention_mask.sum(dim=1).tolist()
    prefix = shared_prefix_length(batch) if share_prefix else 0
    if prefix < 8:  # too short to be worth a second pass
        prefix = 0

    def run_step(rows: list[int], train: bool) -> torch.Tensor:
        """Mean answer loss per adapter over ``rows`` ([n]); with ``train``, gradients too."""
        in_rows = torch.isin(batch.example, torch.tensor(rows, device=device))
        counts = torch.bincount(adapter_of[batch.example[in_rows]], minlength=n).clamp(min=1).to(torch.float32)
        total = torch.zeros(n, device=device)
        with torch.set_grad_enabled(train):
            shared = None
            if prefix:
                adapters = torch.unique(adapter_of[rows])
                shared = SharedPrefix(model, batch.input_ids[:1, :prefix], adapters, router, train)
            for part in micro_batches([lengths[r] - prefix for r in rows], max_tokens):
                mb_rows = [rows[i] for i in part]
                mb = _subset(batch, mb_rows)
                row_adapter = adapter_of[mb_rows]
                router.set(row_adapter, device)
                if shared is not None:
                    per_token = shared_prefix_token_losses(model, mb, shared, row_adapter)
                else:
                    per_token = answer_token_losses(model, mb)
                contrib = torch.zeros(n, device=device).index_add(0, row_adapter[mb.example], per_token) / counts
                if train:
                    contrib.sum().backward()
                total += contrib.detach()
            if train and shared is not None:
                shared.backward()
        return total

    done = 0
    model.train()
    try:
        for _ in range(recipe.epochs):
            orders = [
                [m[i] for i in torch.randperm(len(m), generator=g).tolist()] if size < len(m) else m
                for m, g, size in zip(members, gens, sizes)
            ]
            for step in range(steps):
                rows = [r for order, size in zip(orders, sizes) for r in order[step * size : (step + 1) * size]]
                per_adapter = run_step(rows, train=True)
                _clip_per_adapter(modules, recipe.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                present = set(adapter_of[rows].tolist())
                for j, loss in enumerate(per_adapter.tolist()):
                    if j in present:
                        results[j].losses.append(loss)
                done += 1
                _after_step(model, recipe, done, on_step)
    finally:
        model.eval()
    final = run_step(list(range(len(lengths))), train=False)
    seconds = time.perf_counter() - start
    for j, r in enumerate(results):
        r.final_loss = float(final[j])
        r.seconds = seconds / n
    return results


def _clip_per_adapter(modules: Sequence[MultiLoRALinear], max_norm: float) -> None:
    grads = [p.grad for m in modules for p in (m.lora_A, m.lora_B) if p.grad is not None]
    sq = torch.stack([g.flatten(1).pow(2).sum(dim=1) for g in grads]).sum(dim=0)  # [N]
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))


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
        results = fit_many(model, modules, router, batch, adapter_of, recipe, seeds, max_tokens=max_tokens, on_step=hook)
        yield model, router, results
