"""Where things live inside each architecture.

Analysis code never names module paths itself: it asks :func:`arch_for` for an
:class:`ArchSpec` and resolves paths through it (the TransformerLens habit). A new decoder-only
architecture is one row in ``ARCHITECTURES``; one that has no row is read from its module tree
(:func:`infer_arch`: the blocks, the final norm, the attention's query and value projections),
or, where a piece cannot be found, refused with the one row to add.

The LoRA targets of the IT arm come from the same table (:func:`lora_targets`,
:func:`resolve_targets`): by default the attention's query and value projections, the
paper's choice.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import cast

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class ArchSpec:
    """Module paths, relative to the decoder (``model.get_decoder()``), and LoRA target names.

    ``layers``: the ``nn.ModuleList`` of transformer blocks; ``final_norm``: the norm applied
    to the last block's output before the LM head; ``query``/``value``: the leaf names of the
    modules that compute the attention's queries and values (PEFT ``target_modules``; the
    same name twice where one fused module computes both, e.g. Phi-3's ``qkv_proj``);
    ``mlp``: the attribute of a block holding its position-wise feed-forward part (``""``:
    none known, so the last block is never trimmed, :func:`iclit.tuning.last_block_rows`).
    """

    layers: str = "layers"
    final_norm: str = "norm"
    query: str = "q_proj"
    value: str = "v_proj"
    mlp: str = "mlp"

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """The default LoRA targets: the query and value projections (one name if fused)."""
        return tuple(dict.fromkeys((self.query, self.value)))


_LLAMA_LIKE = ArchSpec()

# Fused attention projections: one Linear (Conv1D in GPT-2) computes queries, keys and values
# together, so there is no module that is the query or the value projection alone. The IT arm
# then adapts the whole fused module, as PEFT's own defaults do for ``c_attn`` and
# ``query_key_value``: it stays one standard LoRA on one existing module (PEFT trains, saves and
# merges it like any other, and the batched path can be checked against PEFT), at the price
# that the key projection is adapted too and the rank-r update (one A shared, B spanning the
# q, k and v rows) is shared by all three. Splitting out the q and v rows would be a custom
# adapter that no PEFT checkpoint knows.
_FUSED = {"phi3": "qkv_proj", "gpt2": "c_attn", "gpt_neox": "query_key_value"}

ARCHITECTURES: dict[str, ArchSpec] = {
    **{
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
            "olmo",
            "olmo2",
            "granite",
            "smollm3",
        )
    },
    "phi3": ArchSpec(query=_FUSED["phi3"], value=_FUSED["phi3"]),
    "gpt2": ArchSpec(layers="h", final_norm="ln_f", query=_FUSED["gpt2"], value=_FUSED["gpt2"]),
    "gpt_neox": ArchSpec(final_norm="final_layer_norm", query=_FUSED["gpt_neox"], value=_FUSED["gpt_neox"]),
}


def register_architecture(model_type: str, spec: ArchSpec) -> None:
    """Teach iclit a new ``config.model_type``."""
    ARCHITECTURES[model_type] = spec


_INFERRED: weakref.WeakKeyDictionary[nn.Module, ArchSpec] = weakref.WeakKeyDictionary()


def arch_for(model: nn.Module) -> ArchSpec:
    """The table's row for ``config.model_type``, else the one :func:`infer_arch` reads from
    the module tree (once per model object)."""
    hf = _hf(model)
    model_type = _model_type(hf)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if hf not in _INFERRED:
        _INFERRED[hf] = infer_arch(hf)
    return _INFERRED[hf]


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings + blocks + final norm, no LM head) of a causal LM,
    looking through a PEFT wrapper."""
    base = _hf(model)
    return base.get_decoder() if hasattr(base, "get_decoder") else base


def layers_of(model: nn.Module) -> nn.ModuleList:
    return _module_list(decoder_of(model), arch_for(model).layers)


def _module_list(root: nn.Module, path: str) -> nn.ModuleList:
    found = root.get_submodule(path)
    if not isinstance(found, nn.ModuleList):
        raise TypeError(f"{path} of {type(root).__name__} is a {type(found).__name__}, not a ModuleList")
    return found


def final_norm_of(model: nn.Module) -> nn.Module:
    return decoder_of(model).get_submodule(arch_for(model).final_norm)


def n_states(model: nn.Module) -> int:
    """Number of hidden states per token: embeddings + one per block (L + 1)."""
    return len(layers_of(model)) + 1


# --- LoRA targets ---------------------------------------------------------------------------

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "v_proj")
"""``TuningRecipe.targets``' default: read as "the architecture's query and value projections"."""
ALL_LINEAR = "all-linear"
"""PEFT's shorthand: every linear layer (``nn.Linear``, ``Conv1D``) except the output head."""


def is_linear(module: nn.Module) -> bool:
    """A layer LoRA can adapt: ``nn.Linear`` (y = x Wᵀ + b) or transformers' ``Conv1D``
    (GPT-2; y = x W + b, weight [in, out])."""
    return isinstance(module, (nn.Linear, Conv1D))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a :func:`is_linear` layer."""
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def lora_targets(model: nn.Module) -> tuple[str, ...]:
    """The architecture's query and value projections (leaf names): ``("q_proj", "v_proj")``
    on LLaMA-like models, the fused ``("qkv_proj",)`` / ``("c_attn",)`` /
    ``("query_key_value",)`` on Phi-3 / GPT-2 / GPT-NeoX (the whole fused module is adapted,
    see the table's comment)."""
    return arch_for(model).lora_targets


def resolve_targets(model: nn.Module, targets: Sequence[str] | str | None) -> tuple[str, ...]:
    """A recipe's ``targets`` as the module names to adapt (PEFT ``target_modules`` semantics:
    a name matches a module whose full name equals it or ends with ``"." + name``).

    ``None``, or the default ``("q_proj", "v_proj")`` on a model that lacks either, means
    :func:`lora_targets`; ``"all-linear"`` every linear layer but the output head (PEFT's
    meaning; full module names). Raises ValueError naming the targets and the model's linear
    layers when a target matches no linear layer, or names something that is not one.
    """
    hf = _hf(model)
    if isinstance(targets, str):
        targets = (targets,)
    if targets is not None and ALL_LINEAR in targets:
        if len(targets) > 1:
            raise ValueError(f"LoRA targets {list(targets)}: {ALL_LINEAR!r} stands alone")
        head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
        return tuple(n for n, m in hf.named_modules() if is_linear(m) and m is not head)
    if targets is None or (tuple(targets) == DEFAULT_TARGETS and not _all_match(hf, DEFAULT_TARGETS)):
        targets = lora_targets(hf)
    targets = tuple(targets)
    linear = {n for n, m in hf.named_modules() if is_linear(m)}
    problems = []
    for t in targets:
        hits = [n for n, _ in hf.named_modules() if _matches(n, t)]
        others = [n for n in hits if n not in linear]
        if not hits or others:
            what = (
                f"{others[0]} is a {type(hf.get_submodule(others[0])).__name__}, not a linear layer"
                if others
                else "matches no module"
            )
            problems.append(f"{t!r} ({what})")
    if problems:
        raise ValueError(
            f"LoRA targets {list(targets)} of this {_model_type(hf) or type(hf).__name__} model: "
            f"{', '.join(problems)}; its linear layers are named {candidate_names(hf)} "
            f"(or use {ALL_LINEAR!r})"
        )
    return targets


def target_linears(model: nn.Module, targets: Sequence[str] | str | None) -> list[tuple[str, nn.Module]]:
    """(full name, module) of the linear layers :func:`resolve_targets` picks, in module order
    (the order PEFT creates its adapters in)."""
    names = resolve_targets(model, targets)
    return [(n, m) for n, m in _hf(model).named_modules() if is_linear(m) and any(_matches(n, t) for t in names)]


def candidate_names(model: nn.Module) -> list[str]:
    """The distinct leaf names of the model's linear layers but the output head, in order."""
    hf = _hf(model)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in hf.named_modules() if is_linear(m) and m is not head))


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _all_match(model: nn.Module, targets: Sequence[str]) -> bool:
    names = [n for n, m in model.named_modules() if is_linear(m)]
    return all(any(_matches(n, t) for n in names) for t in targets)


# --- the structural fallback ----------------------------------------------------------------

_QUERY = ("q_proj", "query", "wq", "q", "q_lin", "query_proj", "to_q")
_VALUE = ("v_proj", "value", "wv", "v", "v_lin", "value_proj", "to_v")
_FUSED_NAMES = ("qkv_proj", "c_attn", "query_key_value", "wqkv", "qkv", "w_pack", "in_proj", "att_proj")
_MLP = ("mlp", "feed_forward", "ffn", "ff", "mlp_block", "feedforward", "block_sparse_moe", "moe")


def infer_arch(model: nn.Module) -> ArchSpec:
    """An :class:`ArchSpec` read from the module tree of a model the table does not know.

    * blocks: the longest ``nn.ModuleList`` of modules of one class (not nested in another
      such list, so an MoE layer's experts are not taken for the blocks);
    * final norm: the last norm module (``LayerNorm``, ``RMSNorm``, or a class named
      ``…Norm…``) registered after the blocks and outside them (else one registered before
      them whose name says it is the last: ``final_layer_norm``, ``ln_f``, ``norm_f``);
    * query/value: linear layers of the first block with a conventional leaf name
      (``q_proj``/``v_proj``, ``query``/``value``, ``wq``/``wv``, …), else a fused one
      (``qkv_proj``, ``c_attn``, ``query_key_value``, ``Wqkv``, …), else PEFT's own entry
      for the model type;
    * feed-forward part: the block's child named ``mlp``/``feed_forward``/``ffn``/… or of a
      class named ``…MLP``/``…FeedForward``/``…MoE`` (optional: without it the last block is
      not trimmed).

    Raises ValueError naming what is missing and the ``register_architecture(...)`` row to add.
    """
    hf = _hf(model)
    decoder = decoder_of(hf)
    found: dict[str, str] = {}
    layers = _find_blocks(decoder)
    if layers is not None:
        found["layers"] = layers
        blocks = _module_list(decoder, layers)
        norm = _find_final_norm(decoder, layers)
        if norm is not None:
            found["final_norm"] = norm
        qv = _find_query_value(blocks[0], _model_type(hf))
        if qv is not None:
            found["query"], found["value"] = qv
        found["mlp"] = _find_mlp(blocks[0])
    missing = [f.name for f in fields(ArchSpec) if f.name != "mlp" and f.name not in found]
    if missing:
        raise ValueError(_missing_message(hf, decoder, found, missing))
    return ArchSpec(**found)


def _find_blocks(decoder: nn.Module) -> str | None:
    lists = [
        (name, m)
        for name, m in decoder.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1
    ]
    top = [(n, m) for n, m in lists if not any(n != o and n.startswith(o + ".") for o, _ in lists)]
    if not top:
        return None
    return max(top, key=lambda nm: len(nm[1]))[0]  # the first of the longest


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def _find_final_norm(decoder: nn.Module, layers: str) -> str | None:
    names = [n for n, m in decoder.named_modules() if n and not n.startswith(layers + ".") and _is_norm(m)]
    names = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]  # outermost
    order = [n for n, _ in decoder.named_modules()]
    after = [n for n in names if order.index(n) > order.index(layers)]
    if after:
        return after[-1]
    # registered before the blocks (OPT): only a name that says it is the last one
    before = [n for n in names if any(w in n.rsplit(".", 1)[-1].lower() for w in ("final", "ln_f", "norm_f", "out"))]
    return before[-1] if before else None


def _linear_names(module: nn.Module) -> list[str]:
    """Names of the linear layers under ``module``, an adapted one (PEFT's ``base_layer``,
    iclit's batched ``base``) under its own name, its insides left out."""
    names: list[str] = []
    for name, m in module.named_modules():
        if any(name.startswith(n + ".") for n in names):
            continue
        inner = getattr(m, "base_layer", None) or getattr(m, "base", None)
        if is_linear(m) or (isinstance(inner, nn.Module) and is_linear(inner)):
            names.append(name)
    return names


def _find_query_value(block: nn.Module, model_type: str | None) -> tuple[str, str] | None:
    leaves = [n.rsplit(".", 1)[-1] for n in _linear_names(block)]
    by_lower = {leaf.lower(): leaf for leaf in leaves}
    q = next((by_lower[n] for n in _QUERY if n in by_lower), None)
    v = next((by_lower[n] for n in _VALUE if n in by_lower), None)
    if q and v:
        return q, v
    fused = next((by_lower[n] for n in _FUSED_NAMES if n in by_lower), None)
    if fused:
        return fused, fused
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_targets
    except ImportError:  # pragma: no cover
        return None
    names = [n for n in peft_targets.get(model_type or "", ()) if n in leaves]
    if len(names) == 2:
        return names[0], names[1]
    if len(names) == 1:
        return names[0], names[0]
    return None


def _find_mlp(block: nn.Module) -> str:
    for name, child in block.named_children():
        kind = type(child).__name__.lower()
        if name.lower() in _MLP or any(w in kind for w in ("mlp", "feedforward", "moe")):
            return name
    return ""


def _missing_message(hf: nn.Module, decoder: nn.Module, found: dict[str, str], missing: list[str]) -> str:
    model_type = _model_type(hf)
    what = {
        "layers": "the blocks (an nn.ModuleList of identical blocks)",
        "final_norm": "the final norm (a norm module after the blocks)",
        "query": "the attention's query projection",
        "value": "the attention's value projection",
    }
    named = (
        f"architecture {model_type!r} ({type(hf).__name__})"
        if model_type
        else f"{type(hf).__name__} (no config.model_type)"
    )
    lines = [
        f"{named} is not in iclit's table and its module tree does not show {', '.join(what[m] for m in missing)}."
    ]
    if "layers" in found:
        block = _module_list(decoder, found["layers"])[0]
        lines.append(f"Linear layers of its first block: {_linear_names(block)}.")
    else:
        lines.append(f"Children of its decoder {type(decoder).__name__}: {[n for n, _ in decoder.named_children()]}.")
    row = {f.name: found.get(f.name, f"<{f.name}>") for f in fields(ArchSpec)}
    args = ", ".join(f"{k}={v!r}" for k, v in row.items())
    lines.append(
        f"Add its row (paths relative to model.get_decoder()): "
        f"iclit.models.register_architecture({model_type or '<model_type>'!r}, ArchSpec({args}))"
    )
    return " ".join(lines)


# --- the LM head ----------------------------------------------------------------------------


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


def _hf(model: nn.Module) -> PreTrainedModel:
    """The transformers model itself, looking through a PEFT wrapper."""
    get_base = getattr(model, "get_base_model", None)  # a PeftModel's
    return cast(PreTrainedModel, get_base() if callable(get_base) else model)


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)
