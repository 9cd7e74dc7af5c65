"""Model access: names → (model, tokenizer), caching, and the per-architecture table.

Names load on first use: the name registry (``iclit.models.names``: ``EMBEDDED``,
``resolve``, …) imports no torch, so a spec checks its model names without loading torch."""

from __future__ import annotations

from iclit._lazy import lazy_exports

_EXPORTS = {
    "ArchSpec": "iclit.models.arch",
    "arch_for": "iclit.models.arch",
    "decoder_of": "iclit.models.arch",
    "layers_of": "iclit.models.arch",
    "lm_head_logits": "iclit.models.arch",
    "register_architecture": "iclit.models.arch",
    "DEFAULT_MODEL": "iclit.models.names",
    "EMBEDDED": "iclit.models.names",
    "EmbeddedModel": "iclit.models.names",
    "FACTORIES": "iclit.models.names",
    "ModelFactory": "iclit.models.names",
    "register_model_factory": "iclit.models.names",
    "ModelNotFoundError": "iclit.models.names",
    "list_models": "iclit.models.names",
    "register_embedded": "iclit.models.names",
    "LoadedModel": "iclit.models.loading",
    "cache_dir": "iclit.models.loading",
    "load_model": "iclit.models.loading",
    "prepare": "iclit.models.loading",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
