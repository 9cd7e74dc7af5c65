"""Where things live inside each architecture.

Analysis code never names module paths itself: it asks :func:`arch_for` for an
:class:`ArchSpec` and resolves paths through it (the TransformerLens habit). A new decoder-only
architecture is one row in ``ARCHITECTURES``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Module paths, relative to the decoder (``model.get_decoder()``), and LoRA target names.

    ``layers``: the ``nn.ModuleList`` of transformer blocks; ``final_norm``: the norm applied
    to the last block's output before the LM head; ``query``/``value``: the leaf names of the
    attention query and value projections (PEFT ``target_modules``); ``mlp``: the attribute of
    a block holding its position-wise feed-forward part.
    """

    layers: str = "layers"
    final_norm: str = "norm"
    query: str = "q_proj"
    value: str = "v_proj"
    mlp: str = "mlp"


_LLAMA_LIKE = ArchSpec()

ARCHITECTURES: dict[str, ArchSpec] = {
    name: _LLAMA_LIKE
    for name in (
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3",
        "gemma3_text",
        "phi3",
        "olmo",
        "olmo2",
        "granite",
        "smollm3",
    )
}


def register_architecture(model_type: str, spec: ArchSpec) -> None:
    """Teach iclit a new ``config.model_type``."""
    ARCHITECTURES[model_type] = spec


def arch_for(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    raise ValueError(
        f"architecture {model_type!r} is not in iclit's table; supported: "
        f"{sorted(ARCHITECTURES)}. Add it with iclit.models.register_architecture()."
    )


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings + blocks + final norm, no LM head) of a causal LM,
    looking through a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def layers_of(model: nn.Module) -> nn.ModuleList:
    return decoder_of(model).get_submodule(arch_for(_hf(model)).layers)


def final_norm_of(model: nn.Module) -> nn.Module:
    return decoder_of(model).get_submodule(arch_for(_hf(model)).final_norm)


def n_states(model: nn.Module) -> int:
    """Number of hidden states per token: embeddings + one per block (L + 1)."""
    return _hf(model).config.num_hidden_layers + 1


def lm_head_logits(model: nn.Module, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits from final (post-norm) hidden states, for the given vocabulary rows only.

    hidden: [..., d]; token_ids: [V'] or None for the whole vocabulary → [..., V'].
    Applies the final-logit soft-capping of architectures that have it (Gemma-2).
    """
    weight, bias, cap = output_head(model)
    if token_ids is not None:
        weight = weight[token_ids]
        bias = bias[token_ids] if bias is not None else None
    logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """(weight [V, d], bias [V] or None, final-logit soft-cap or None) of the LM head."""
    hf = _hf(model)
    head = hf.get_output_embeddings()
    return head.weight, getattr(head, "bias", None), getattr(hf.config, "final_logit_softcapping", None) or None


def _hf(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model
