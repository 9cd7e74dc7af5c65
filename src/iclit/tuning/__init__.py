"""Tuning: the IT recipe, the answer-only loss, the single-adapter (PEFT) and batched
multi-adapter paths, and the one training loop they share. ``TuningRecipe`` imports no torch;
every other name loads its module (and torch) on first use.

| module | owns |
| --- | --- |
| ``recipe`` | ``TuningRecipe``, ``TuningResult`` (plain data) |
| ``loss`` | (prompt, answer) encoding, chunked head cross-entropy, last-block trimming, answer losses |
| ``loop`` | the training loop: epochs, data order, clipping hook, optimiser steps, capture steps, losses |
| ``peft_path`` | one PEFT LoRA adapter, or full fine-tuning of a copy (``fit``, ``tuned``) |
| ``embedding_rows`` | full fine-tuning's input-table gradient as the tokens' rows (same bits, no dense pass) |
| ``batched`` | N stacked LoRA adapters trained together (``fit_many``, ``tuned_many``) |

Padding, length bucketing and the shared prefix's key/value cache are
:mod:`iclit.core.batching`'s, used by capture too.
"""

from __future__ import annotations

from iclit._lazy import lazy_exports
from iclit.tuning.recipe import TuningRecipe, TuningResult

_LAZY = {
    "iclit.tuning.loss": (
        "AnswerBatch",
        "encode_pairs",
        "head_chunk",
        "head_cross_entropy",
        "last_block_rows",
        "answer_token_losses",
        "answer_loss",
        "reference_answer_loss",
        "shared_prefix_length",
        "shared_prefix_token_losses",
        "subset_batch",
    ),
    "iclit.tuning.loop": ("train", "check_capture_steps", "after_step", "epoch_order", "TuningDivergedError"),
    "iclit.tuning.peft_path": ("fit", "lora_config", "tuned"),
    "iclit.tuning.embedding_rows": ("embedding_rows_grad",),
    "iclit.tuning.batched": (
        "AdapterRouter",
        "MultiLoRALinear",
        "clip_per_adapter",
        "default_train_tokens",
        "fit_many",
        "multi_lora",
        "peft_like_init",
        "tuned_many",
    ),
    "iclit.core.batching": ("SharedPrefix", "micro_batches"),
}
_HOME = {name: module for module, names in _LAZY.items() for name in names}

__all__ = ["TuningRecipe", "TuningResult", *(n for n in _HOME if not n.startswith("_"))]


__getattr__, __dir__ = lazy_exports(__name__, _HOME)
