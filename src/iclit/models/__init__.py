"""Model access: names → (model, tokenizer), caching, and the per-architecture table."""

from iclit.models.arch import ArchSpec, arch_for, decoder_of, layers_of, lm_head_logits, register_architecture
from iclit.models.loading import (
    DEFAULT_MODEL,
    EMBEDDED,
    EmbeddedModel,
    FACTORIES,
    ModelFactory,
    register_model_factory,
    LoadedModel,
    ModelNotFoundError,
    cache_dir,
    list_models,
    load_model,
    prepare,
    register_embedded,
)

__all__ = [
    "ArchSpec",
    "DEFAULT_MODEL",
    "EMBEDDED",
    "EmbeddedModel",
    "FACTORIES",
    "ModelFactory",
    "register_model_factory",
    "LoadedModel",
    "ModelNotFoundError",
    "arch_for",
    "cache_dir",
    "decoder_of",
    "layers_of",
    "list_models",
    "lm_head_logits",
    "load_model",
    "prepare",
    "register_architecture",
    "register_embedded",
]
