"""Generic statistics: numpy / scipy in float64, with no knowledge of iclit's design.

The crossed design's nulls, contrasts and power (:mod:`iclit.analysis.nulls`,
:mod:`iclit.analysis.contrasts`, :mod:`iclit.analysis.power`) are built on these; each is
tested against scipy.stats or a direct computation.

=====================  ===============================================================
module                 what
=====================  ===============================================================
``arrays``             one float64 converter, unit columns, group codes, constants
``multiplicity``       Holm, Benjamini–Hochberg, permutation p with step-down max-T
``resampling``         bootstrap CIs, summaries, paired comparisons, the hierarchical
                       bootstrap (of units in groups, or of whole groups)
``intervals``          the mean of group means with its t interval, TOST, a ratio's
                       delta-method interval
``permutation``        the matched-pairing test (exact or Monte Carlo, with its floor),
                       permuted Gram inner products
``representation``     debiased linear CKA and RSA with permutation nulls
=====================  ===============================================================
"""

from iclit.analysis.stats.arrays import as_float64
from iclit.analysis.stats.intervals import ClusterMean, TostResult, cluster_mean, ratio_ci, tost
from iclit.analysis.stats.multiplicity import bh, holm, permutation_pvalues
from iclit.analysis.stats.permutation import (
    MAX_EXACT,
    PairingResult,
    count_patterns,
    pairing_test,
    permuted_inners,
    random_perms,
    smallest_p,
)
from iclit.analysis.stats.representation import (
    cka_permutation_test,
    debiased_cka,
    debiased_cka_per_layer,
    pair_tests,
    rsa,
    rsa_per_layer,
)
from iclit.analysis.stats.resampling import (
    SUMMARY_COLUMNS,
    bootstrap_ci,
    cohens_d,
    hierarchical_bootstrap,
    hierarchical_bootstrap_means,
    paired_bootstrap_diff,
    permutation_test,
    summarize,
    summarize_layers,
)

__all__ = [
    "MAX_EXACT", "SUMMARY_COLUMNS", "ClusterMean", "PairingResult", "TostResult", "as_float64", "bh", "bootstrap_ci",
    "cka_permutation_test", "cluster_mean", "cohens_d", "count_patterns", "debiased_cka", "debiased_cka_per_layer",
    "hierarchical_bootstrap", "hierarchical_bootstrap_means", "holm", "pair_tests", "paired_bootstrap_diff",
    "pairing_test", "permutation_pvalues", "permutation_test", "permuted_inners", "random_perms", "ratio_ci", "rsa",
    "rsa_per_layer", "smallest_p", "summarize", "summarize_layers", "tost",
]  # fmt: skip
