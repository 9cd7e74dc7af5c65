"""The answer-only loss: (prompt, answer) encoding, the chunked LM-head cross-entropy,
last-block trimming, and the answer losses with and without a shared prefix.

The loss is the mean cross-entropy of the answer tokens only. It is computed from the
decoder's hidden states at the answer positions only — the full-vocabulary logits of the
prompt tokens are never built (Gemma-3 has a 262k vocabulary) — and the last block's
feed-forward part runs only at those positions (nothing after it mixes positions). With a
frozen LM head (LoRA), the answer positions' cross-entropy and its gradient come from one
sweep over the head's vocabulary in chunks (:func:`head_cross_entropy`), not a logits
tensor built, soft-maxed and multiplied back through the head.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from iclit.core.batching import SharedPrefix, common_prefix_length, pad_right, run_decoder
from iclit.core.tokens import answer_token_ids
from iclit.models.arch import arch_for, layers_of, lm_head_logits, output_head


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

    def to(self, device: torch.device) -> AnswerBatch:
        return AnswerBatch(
            *(t.to(device) for t in (self.input_ids, self.attention_mask, self.predict_at, self.targets, self.example))
        )


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
    ids, mask = pad_right(seqs, tokenizer.pad_token_id)
    width = ids.shape[1]
    predict_at, targets, example = [], [], []
    for row, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        for t in range(start, len(seq)):
            predict_at.append(row * width + t - 1)
            targets.append(seq[t])
            example.append(row)
    predict_t, targets_t, example_t = (torch.tensor(xs, dtype=torch.long) for xs in (predict_at, targets, example))
    return AnswerBatch(ids, mask, predict_t, targets_t, example_t)


def subset_batch(batch: AnswerBatch, rows: Sequence[int]) -> AnswerBatch:
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


# --- the LM head's cross-entropy, in one chunked sweep ------------------------------------


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
            if numer is not None:  # want_grad
                numer.mul_(rescale)
                if w.dtype == torch.float32:
                    numer.addmm_(probs, w)
                else:  # bf16/fp16 head: the product in its dtype, as the library backward does
                    numer.add_((probs.to(w.dtype) @ w).float())
            run_max = new_max
        w_target = weight[targets].float()
        loss = (run_max + norm.log()).squeeze(1) - (x.float() * w_target).sum(dim=1)
        if numer is not None:  # want_grad
            ctx.save_for_backward(numer / norm - w_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad_x,) = ctx.saved_tensors  # float32 [m, d]
        return grad_loss[:, None] * grad_x, None, None, None  # autograd casts to x's dtype


def head_cross_entropy(
    model: nn.Module, rows: torch.Tensor, targets: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
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


# --- the last block at the read positions only -------------------------------------------


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
    where that feed-forward part holds a module that routes whole batch rows (``routes_rows``
    true, as batched adapters do)."""
    layer = layers_of(model)[-1]
    name = arch_for(model).mlp
    inner = getattr(layer, name, None)
    if inner is None or any(getattr(m, "routes_rows", False) for m in inner.modules()):
        yield
        return
    setattr(layer, name, _SomeRows(inner, index))
    try:
        yield
    finally:
        setattr(layer, name, inner)


# --- answer losses -----------------------------------------------------------------------


def _states_at(model: nn.Module, at: torch.Tensor, **inputs) -> torch.Tensor:
    """Run the decoder on ``inputs``; its final states at the flat positions ``at`` [m] (into
    its b*s outputs): [m, d]."""
    with last_block_rows(model, at):
        hidden = run_decoder(model, **inputs).last_hidden_state  # [b, s, d]
    return hidden.flatten(0, 1)[at]


def _losses_at(model: nn.Module, at: torch.Tensor, targets: torch.Tensor, **inputs) -> torch.Tensor:
    """The cross-entropy of ``targets`` [m] from the final states at ``at`` (:func:`_states_at`): [m]."""
    return head_cross_entropy(model, _states_at(model, at, **inputs), targets)


def answer_token_losses(model: nn.Module, batch: AnswerBatch) -> torch.Tensor:
    """Cross-entropy of each answer token: [m]. The last block's feed-forward part and the LM
    head run for the m answer positions only."""
    return head_cross_entropy(model, answer_states(model, batch), batch.targets)


def answer_states(
    model: nn.Module, batch: AnswerBatch, prefix: SharedPrefix | None = None, row_adapter: torch.Tensor | None = None
) -> torch.Tensor:
    """The final hidden states that predict the answer tokens: [m, d] (the LM head not applied,
    so that several forwards' rows can share one :func:`head_cross_entropy`). With ``prefix``:
    as :func:`shared_prefix_token_losses`, on top of the prefix's cache."""
    if prefix is None:
        return _states_at(
            model, batch.predict_at, input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        )
    if row_adapter is None:
        raise ValueError("a shared prefix needs each row's adapter (row_adapter)")
    p = prefix.length
    width = batch.input_ids.shape[1]
    at = (batch.predict_at // width) * (width - p) + batch.predict_at % width - p  # into b*(s - p)
    return _states_at(
        model,
        at,
        input_ids=batch.input_ids[:, p:],
        attention_mask=batch.attention_mask,
        cache=prefix.for_rows(row_adapter),
        use_cache=True,
    )


def answer_loss(model: nn.Module, batch: AnswerBatch) -> torch.Tensor:
    """Mean answer-token cross-entropy (a scalar)."""
    return answer_token_losses(model, batch).mean()


def reference_answer_loss(model: nn.Module, batch: AnswerBatch) -> torch.Tensor:
    """The same loss the straightforward way: transformers' own ``labels=`` loss, with -100
    on prompt and padding tokens (full-vocabulary logits at every position)."""
    labels = torch.full_like(batch.input_ids, -100)
    labels.view(-1)[batch.predict_at + 1] = batch.targets
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss


def shared_prefix_length(batch: AnswerBatch) -> int:
    """Tokens that every sequence of ``batch`` starts with and that predict no answer token."""
    lengths = batch.attention_mask.sum(dim=1).tolist()
    seqs = [batch.input_ids[i, :n].tolist() for i, n in enumerate(lengths)]
    first_answer = int((batch.predict_at % batch.input_ids.shape[1]).min())
    return min(common_prefix_length(seqs), first_answer)


def shared_prefix_token_losses(
    model: nn.Module, batch: AnswerBatch, prefix: SharedPrefix, row_adapter: torch.Tensor
) -> torch.Tensor:
    """:func:`answer_token_losses` for sequences whose first ``prefix.length`` tokens are the
    shared prefix: only the rest of each sequence runs, on top of the prefix's cache (row r
    reads adapter ``row_adapter[r]``'s prefix; the caller routes the rows themselves)."""
    return head_cross_entropy(model, answer_states(model, batch, prefix, row_adapter), batch.targets)
