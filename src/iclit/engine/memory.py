"""Memory planning for the batched IT path: adapters per pass and tokens per micro-batch,
chosen from the model's size and the free memory (RAM on the CPU, CUDA memory on a GPU).

The work is the same whatever the plan — the adapters are independent and gradients are
accumulated over micro-batches — so a plan changes speed and peak memory, not results
(beyond float rounding; tested). Explicit values override the planner.

Estimates (per token of a training micro-batch, saved for the backward pass): about
``(16·d + 4·d_ff)`` activations per block in the compute dtype, which gives 1.3 MB per token
on Gemma-3-270M in fp32 (measured ≈ 1.4 MB); per LoRA adapter: rank·(in + out) weights per
target module, held four times (weights, gradients, AdamW's two moments) in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from iclit.schema import parse_bytes

__all__ = ["MemoryPlan", "plan_memory", "available_memory", "parse_bytes", "CPU_TOKENS", "CUDA_TOKENS", "MAX_ADAPTERS"]

CPU_TOKENS = 768
"""Most tokens per micro-batch on the CPU: beyond it a pass is no faster per token here (2-core
reference machine), only larger."""
CUDA_TOKENS = 32768
"""Most tokens per micro-batch on a GPU."""
MAX_ADAPTERS = 64
"""Most adapters trained in one pass."""
MIN_TOKENS = 64


def available_memory(device: torch.device) -> tuple[int, str]:
    """(free bytes, where the number comes from) on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free CUDA memory on {device}"
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable (/proc/meminfo)"
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "available physical pages"


@dataclass(frozen=True)
class MemoryPlan:
    """train_tokens: padded tokens per training micro-batch; adapters_per_pass: LoRA adapters
    trained together; budget: the bytes the plan may use beyond the loaded model (and where
    that number came from); per_token / per_adapter: the estimates it used."""

    train_tokens: int
    adapters_per_pass: int
    budget: int
    source: str
    per_token: int
    per_adapter: int

    def planned_bytes(self) -> int:
        """The estimate of what the plan uses beyond the loaded model: its adapters and one
        micro-batch's saved activations."""
        return self.adapters_per_pass * self.per_adapter + self.train_tokens * self.per_token

    def describe(self) -> str:
        return (
            f"{self.adapters_per_pass} adapters per pass, {self.train_tokens}-token micro-batches "
            f"(budget {self.budget / 2**30:.2f} GiB from {self.source}; ≈ {self.per_token / 2**20:.2f} MiB a token, "
            f"{self.per_adapter / 2**20:.2f} MiB an adapter)"
        )


def _config(model: nn.Module) -> Any:
    return getattr(model, "config", None)


def activation_bytes_per_token(model: nn.Module, dtype: torch.dtype) -> int:
    cfg = _config(model)
    text = getattr(cfg, "text_config", None) or cfg
    d = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0) or 1024)
    ff = int(getattr(text, "intermediate_size", 0) or getattr(text, "n_inner", 0) or 4 * d)
    layers = int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0) or 1)
    return layers * (16 * d + 4 * ff) * torch.finfo(dtype).bits // 8


def adapter_bytes(model: nn.Module, rank: int, targets: tuple[str, ...] | None) -> int:
    """fp32 bytes of one LoRA adapter's weights, gradients and AdamW moments on ``targets``
    (resolved on this model as the tuning path resolves them: fused projections, all-linear)."""
    from iclit.models.arch import target_linears

    n = sum(rank * sum(cast(torch.Tensor, module.weight).shape) for _, module in target_linears(model, targets))
    return max(1, n) * 4 * 4


def plan_memory(
    model: nn.Module,
    device: torch.device,
    *,
    rank: int = 8,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    budget: int | str | None = None,
    fraction: float = 0.5,
    train_tokens: int | None = None,
    adapters_per_pass: int | None = None,
) -> MemoryPlan:
    """The plan for training LoRA adapters on ``model`` (already loaded on ``device``).

    budget: the bytes to plan for (``"8GiB"``…); default ``fraction`` of the free memory now.
    Adapters take at most a fifth of the budget, micro-batch activations the rest; both are
    capped (:data:`MAX_ADAPTERS`, :data:`CPU_TOKENS` / :data:`CUDA_TOKENS`) and floored at one
    adapter and :data:`MIN_TOKENS` tokens. ``train_tokens`` / ``adapters_per_pass`` override.
    """
    if budget is None:
        free, source = available_memory(device)
        total = int(free * fraction)
    else:
        total, source = parse_bytes(budget), "the given budget"
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    per_token = activation_bytes_per_token(model, dtype)
    per_adapter = adapter_bytes(model, rank, tuple(targets))
    adapters = adapters_per_pass or int(max(1, min(MAX_ADAPTERS, (total // 5) // per_adapter)))
    cap = CUDA_TOKENS if device.type == "cuda" else CPU_TOKENS
    left = max(0, total - adapters * per_adapter)
    tokens = train_tokens or int(max(MIN_TOKENS, min(cap, left // per_token)))
    return MemoryPlan(tokens, adapters, total, source, per_token, per_adapter)
