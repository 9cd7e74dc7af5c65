"""FLOPs of a pass, counted from the model's shapes and the token counts (the MFU convention).

Per token, the forward pass multiplies by every weight matrix of the decoder once (2 FLOPs a
weight); attention adds QKᵀ and the weighted sum of V, 2·2·(heads·head_dim) FLOPs per layer
for every (query token, key) pair it attends; the LM head is counted only at the rows whose
logits are needed (the answer positions of a training pass; none for a capture, which reads
states and a handful of label rows). Backward: the input gradients cost what the forward cost
again, the weight gradients once more where the weights train (full fine-tuning: the usual
≈ 6·params per token); with frozen weights (LoRA) only the input gradients (≈ 4·params per
token; the adapters' own products are negligible). Attention has no weights: its backward is
twice its forward either way.

The counts are the *useful work* of the straightforward computation: iclit's fast paths skip
some of it (a shared prefix run once, the last block only at the answer rows), so an achieved
rate from these counts is an effective rate, comparable between two implementations of the
same work and with the machine's measured matmul peak.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["PassWork", "attended_pairs", "forward_flops", "matmul_params", "matmul_rate", "training_flops"]


def matmul_rate(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """This machine's matmul speed now, in FLOP/s: 20 products of two random n×n matrices after
    3 warm-up ones, at torch's current thread count (2048² on a CPU; the benchmarks use 8192² on
    a GPU). Printed beside every timing, since a shared machine's speed varies between runs.
    """
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    reps = 20
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def matmul_params(model: nn.Module) -> tuple[int, int]:
    """(body, head): the weights of the decoder's linear layers (every ``nn.Linear`` and GPT-2
    ``Conv1D`` except the output head) and of the output head (0 if none)."""
    get_head = getattr(model, "get_output_embeddings", None)  # transformers models have it
    head = get_head() if get_head is not None else None
    head_weight = getattr(head, "weight", None)
    body = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight is head_weight:
            continue
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            body += weight.numel()
    return body, (head_weight.numel() if head_weight is not None else 0)


def _attention_width(model: nn.Module) -> tuple[int, int]:
    """(layers, heads·head_dim of the queries) from the model's config."""
    cfg = getattr(model, "config", None)
    text = getattr(cfg, "text_config", None) or cfg
    layers = int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0))
    heads = int(getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 0))
    d = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0))
    head_dim = int(getattr(text, "head_dim", 0) or (d // heads if heads else 0))
    return layers, heads * head_dim


def attended_pairs(lengths: Iterable[int], prefix: int = 0) -> int:
    """(query token, key) pairs of causal attention over sequences of ``lengths`` new tokens,
    each after a cached ``prefix`` of keys: Σ (n·prefix + n(n+1)/2)."""
    return sum(n * prefix + n * (n + 1) // 2 for n in lengths)


@dataclass(frozen=True)
class PassWork:
    """What one pass computes: ``tokens`` through the decoder, ``attended`` (query, key)
    pairs (:func:`attended_pairs`), ``head_rows`` positions through the LM head."""

    tokens: int
    attended: int
    head_rows: int = 0


def _parts(model: nn.Module, work: PassWork) -> tuple[float, float]:
    """(linear FLOPs, attention FLOPs) of the forward pass."""
    body, head = matmul_params(model)
    layers, width = _attention_width(model)
    linear = 2.0 * body * work.tokens + 2.0 * head * work.head_rows
    attention = 4.0 * layers * width * work.attended
    return linear, attention


def forward_flops(model: nn.Module, work: PassWork) -> float:
    """FLOPs of the forward pass of ``work`` on ``model``."""
    linear, attention = _parts(model, work)
    return linear + attention


def training_flops(model: nn.Module, work: PassWork, *, frozen: bool = True) -> float:
    """FLOPs of forward + backward of ``work``: linear layers ×2 with frozen weights (LoRA: input
    gradients only), ×3 when the weights train (full fine-tuning); attention ×3 either way."""
    linear, attention = _parts(model, work)
    return linear * (2.0 if frozen else 3.0) + 3.0 * attention
