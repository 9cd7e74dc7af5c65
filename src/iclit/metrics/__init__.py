"""Metrics: hidden-state similarity, output metrics, statistics over resamples."""

from iclit.metrics.outputs import (
    accuracy,
    agreement,
    chrf,
    corpus_chrf,
    kl_divergence,
    label_probabilities,
)
from iclit.metrics.similarity import (
    BASELINE_PAIRS,
    BASELINES,
    PAIRS,
    baseline_cosines,
    centered_cosine_per_layer,
    cka_per_layer,
    cosine_per_layer,
    linear_cka,
    pairwise_cosines,
    shuffled_partner,
    update_cosine_per_layer,
)
from iclit.metrics.stats import (
    SUMMARY_COLUMNS,
    bootstrap_ci,
    cohens_d,
    paired_bootstrap_diff,
    permutation_test,
    summarize,
    summarize_layers,
)

__all__ = [
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
    "kl_divergence",
    "label_probabilities",
    "linear_cka",
    "paired_bootstrap_diff",
    "pairwise_cosines",
    "permutation_test",
    "summarize",
    "summarize_layers",
    "update_cosine_per_layer",
]
