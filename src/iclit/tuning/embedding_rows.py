"""The input embedding's gradient as the rows of the tokens seen (full fine-tuning).

Autograd's embedding backward writes a dense ``[V, d]`` gradient: a table of zeros, then the
rows of the batch's tokens. Where the output head shares that table (Gemma, SmolLM2), the
head's own dense gradient is then added to it, out of place. Those are two or three passes
over ``V × d`` floats per optimiser step for a few hundred rows that change: on Gemma-3's
262,144 × 640 table, about 0.85 s of a 3.1 s full fine-tuning step on one thread
(``benchmarks/full_ft_rows.py``).

Within :func:`embedding_rows_grad` the lookups of the model's input table record their
gradient as rows instead: per token, the rows of its positions summed in position order
from zero, as the dense backward sums them; the ``flush`` it yields then adds each token's
sum to ``weight.grad`` in place (to a zero table where the head added nothing). Each
element gets the same float additions in the same order, so the gradient, and the tuned
weights, are the same bits (``tests/unit/test_architectures.py``). ``flush`` belongs after
every backward, before anything reads the gradient.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["embedding_rows_grad"]

_SIGNATURE = inspect.signature(F.embedding)
Rows = list[tuple[torch.Tensor, torch.Tensor]]


class _Lookup(torch.autograd.Function):
    """``F.embedding(ids, weight, padding_idx)`` whose backward appends (tokens, summed rows)
    to ``sink`` and returns no gradient for ``weight``."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None, sink: Rows) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.sink = padding_idx, sink
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        ids = ids.reshape(-1)
        grad = grad.reshape(ids.numel(), -1)
        if ctx.padding_idx is not None:  # the padding row gets no gradient, as in the dense backward
            keep = ids != ctx.padding_idx
            ids, grad = ids[keep], grad[keep]
        tokens, where = torch.unique(ids, return_inverse=True)
        rows = grad.new_zeros(tokens.numel(), grad.shape[1]).index_add_(0, where, grad)
        ctx.sink.append((tokens, rows))
        return None, None, None, None


class _RowsMode(TorchFunctionMode):
    """Routes ``F.embedding`` of ``weight`` (plain options, gradient on) to :class:`_Lookup`."""

    def __init__(self, weight: torch.Tensor, sink: Rows) -> None:
        super().__init__()
        self.weight, self.sink = weight, sink

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding and torch.is_grad_enabled():
            call = _SIGNATURE.bind(*args, **kwargs)
            call.apply_defaults()
            a = call.arguments
            plain = a["max_norm"] is None and not a["scale_grad_by_freq"] and not a["sparse"]
            if a["weight"] is self.weight and plain and self.weight.requires_grad:
                pad = a["padding_idx"]
                if pad is not None and pad < 0:
                    pad += self.weight.shape[0]
                return _Lookup.apply(a["input"], self.weight, pad, self.sink)
        return func(*args, **kwargs)


@contextmanager
def embedding_rows_grad(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Within the context, the input embedding table of ``model`` (``get_input_embeddings``)
    takes its lookups' gradient as rows; yields ``flush``, which adds them to the table's
    ``.grad`` (call it after each backward). A model without an input table, or one whose
    table is frozen, is left as it is (``flush`` then does nothing)."""
    get = getattr(model, "get_input_embeddings", None)
    table = get() if get is not None else None
    weight = getattr(table, "weight", None)
    if not isinstance(weight, nn.Parameter) or not weight.requires_grad:
        yield lambda: None
        return
    sink: Rows = []

    def flush() -> None:
        for tokens, rows in sink:
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            weight.grad.index_add_(0, tokens, rows)
        sink.clear()

    with _RowsMode(weight, sink):
        yield flush
