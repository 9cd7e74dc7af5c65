"""Analysis: every number from a run directory's stored states and outputs, with no model.

Similarities per layer (:mod:`.similarity`), behaviour (:mod:`.outputs`), statistics
(:mod:`.stats`), the run read back (:func:`load_run`, :func:`load_states`), and the metric
registry (:func:`compute_metric`, :func:`register_metric`)."""

import importlib
from typing import Any

_LAZY = {  # public name -> the module that defines it, imported on first use (PEP 562), so that
    # `import iclit.analysis.power` (the CLI's --check) does not import torch through the similarities
    "accuracy": "iclit.analysis.outputs",
    "agreement": "iclit.analysis.outputs",
    "chrf": "iclit.analysis.outputs",
    "corpus_chrf": "iclit.analysis.outputs",
    "kl_divergence": "iclit.analysis.outputs",
    "label_probabilities": "iclit.analysis.outputs",
    "BASELINE_PAIRS": "iclit.analysis.similarity",
    "BASELINES": "iclit.analysis.similarity",
    "PAIRS": "iclit.analysis.similarity",
    "baseline_cosines": "iclit.analysis.similarity",
    "centered_cosine_per_layer": "iclit.analysis.similarity",
    "cka_per_layer": "iclit.analysis.similarity",
    "cosine_per_layer": "iclit.analysis.similarity",
    "dose_cosines": "iclit.analysis.similarity",
    "linear_cka": "iclit.analysis.similarity",
    "pairwise_cosines": "iclit.analysis.similarity",
    "shuffled_partner": "iclit.analysis.similarity",
    "step_pair": "iclit.analysis.similarity",
    "update_cosine_per_layer": "iclit.analysis.similarity",
    "SUMMARY_COLUMNS": "iclit.analysis.stats",
    "bootstrap_ci": "iclit.analysis.stats",
    "cohens_d": "iclit.analysis.stats",
    "paired_bootstrap_diff": "iclit.analysis.stats",
    "permutation_test": "iclit.analysis.stats",
    "summarize": "iclit.analysis.stats",
    "summarize_layers": "iclit.analysis.stats",
    "EFFECT_PAIRS": "iclit.analysis.factors",
    "design_subset": "iclit.analysis.factors",
    "dose_summary": "iclit.analysis.factors",
    "factor_effects": "iclit.analysis.factors",
    "factor_summary": "iclit.analysis.factors",
    "per_trial": "iclit.analysis.factors",
    "METRICS": "iclit.analysis.registry",
    "Metric": "iclit.analysis.registry",
    "compute_metric": "iclit.analysis.metrics",
    "get_metric": "iclit.analysis.metrics",
    "list_metrics": "iclit.analysis.metrics",
    "register_metric": "iclit.analysis.registry",
    "RunData": "iclit.analysis.rundata",
    "load_run": "iclit.analysis.rundata",
    "States": "iclit.analysis.states",
    "load_states": "iclit.analysis.states",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "METRICS",
    "Metric",
    "RunData",
    "States",
    "compute_metric",
    "get_metric",
    "list_metrics",
    "load_run",
    "load_states",
    "register_metric",
    "BASELINES",
    "BASELINE_PAIRS",
    "PAIRS",
    "baseline_cosines",
    "shuffled_partner",
    "SUMMARY_COLUMNS",
    "accuracy",
    "agreement",
    "bootstrap_ci",
    "centered_cosine_per_layer",
    "chrf",
    "cka_per_layer",
    "cohens_d",
    "corpus_chrf",
    "cosine_per_layer",
    "dose_cosines",
    "kl_divergence",
    "label_probabilities",
    "linear_cka",
    "paired_bootstrap_diff",
    "pairwise_cosines",
    "permutation_test",
    "summarize",
    "step_pair",
    "summarize_layers",
    "update_cosine_per_layer",
    "EFFECT_PAIRS",
    "design_subset",
    "dose_summary",
    "factor_effects",
    "factor_summary",
    "per_trial",
]
