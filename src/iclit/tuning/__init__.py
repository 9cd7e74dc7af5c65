"""Tuning: the IT recipe, the answer-only loss, the single-adapter (PEFT) and batched
multi-adapter paths. ``TuningRecipe`` imports no torch; everything else loads on first use."""

from __future__ import annotations

from typing import Any

from iclit.tuning.recipe import TuningRecipe, TuningResult

__all__ = ["TuningRecipe", "TuningResult"]


def __getattr__(name: str) -> Any:  # the torch-backed names, imported when first asked for
    import importlib

    core = importlib.import_module("iclit.tuning.core")
    try:
        return getattr(core, name)
    except AttributeError:
        raise AttributeError(f"module 'iclit.tuning' has no attribute {name!r}") from None
