"""Analysis: every number from a run directory's stored states and outputs, with no model.

Similarities per layer (:mod:`.similarity`), behaviour (:mod:`.outputs`), statistics
(:mod:`.stats`), the run read back (:func:`load_run`, :func:`load_states`), and the metric
registry (:func:`compute_metric`, :func:`register_metric`)."""

from iclit.analysis.outputs import (
    accuracy,
    agreement,
    chrf,
    corpus_chrf,
    kl_divergence,
    label_probabilities,
)
from iclit.analysis.similarity import (
    BASELINE_PAIRS,
    BASELINES,
    PAIRS,
    baseline_cosines,
    centered_cosine_per_layer,
    cka_per_layer,
    cosine_per_layer,
    dose_cosines,
    linear_cka,
    pairwise_cosines,
    shuffled_partner,
    step_pair,
    update_cosine_per_layer,
)
from iclit.analysis.stats import (
    SUMMARY_COLUMNS,
    bootstrap_ci,
    cohens_d,
    paired_bootstrap_diff,
    permutation_test,
    summarize,
    summarize_layers,
)
from iclit.analysis.factors import (
    EFFECT_PAIRS,
    design_subset,
    dose_summary,
    factor_effects,
    factor_summary,
    per_trial,
)

from iclit.analysis.registry import METRICS, Metric, compute_metric, get_metric, list_metrics, register_metric
from iclit.analysis.rundata import RunData, load_run
from iclit.analysis.states import States, load_states

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
