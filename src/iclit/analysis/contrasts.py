"""Contrasts with query blocks as units: between the cells of a factor (k = 1 vs 4, most vs
least similar demonstrations, wrong labels, instruction, model…) and between two quantities
of one cell (ICL–IT against anchor–ICL).

The (query, set) trials of one query block share their queries and demonstration sets, so
they are not independent, and pooling them as pairs overstates the evidence. Here each cell's
quantity is first reduced to one value per (seed, query block): the mean over the block's
trials of a per-trial quantity at one layer — the pair's cosine, or its excess over the
query-swap or demo-swap null (:mod:`iclit.analysis.units`).

Two sets of block values are then compared (:func:`compare_blocks`): a paired t test on the
block differences when both sides have the same blocks reading the same queries (checked from
the trials), else Welch's t test on the block means; the 95% CI comes from the same t (so CI
and p agree), and TOST tests equivalence within ± the spec's ``equivalence_margin`` (the
quantity's own scale, cosine). Holm adjusts over the family a function declares in its
docstring; the verdict is :func:`iclit.analysis.margins.verdict` on the Holm p.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from iclit.analysis.factors import design_subset, factor_values, match_value, reference_value
from iclit.analysis.margins import DEFAULT_MARGINS, verdict
from iclit.analysis.nulls import PAIR_NAMES, TEST_PAIRS
from iclit.analysis.registry import register_metric
from iclit.analysis.rundata import RunData
from iclit.analysis.stats import holm
from iclit.analysis.units import block_values, unit_values

__all__ = [
    "ANCHOR_COMPARISONS",
    "CONTRAST_COLUMNS",
    "DEFAULT_QUANTITIES",
    "PAIR_LABELS",
    "WITHIN_COLUMNS",
    "cell_contrasts",
    "compare_blocks",
    "contrast_margin",
    "within_cell_contrasts",
]

DEFAULT_QUANTITIES: tuple[tuple[str, str], ...] = (
    ("icl_it", "cosine"),
    ("icl_it", "demo_swap"),
    ("update", "demo_swap"),
)
"""(pair, quantity) compared between cells by default: the ICL–IT cosine, and the ICL–IT and
update pairs' demo-swap excess (is the match specific to the demonstrations?)."""
ANCHOR_COMPARISONS: tuple[tuple[tuple[str, str], tuple[str, str]], ...] = (
    (("icl_it", "cosine"), ("anchor_icl", "cosine")),
    (("icl_it", "cosine"), ("anchor_it", "cosine")),
)
"""Within a cell, the ICL–IT cosine against each anchor pair's (:func:`within_cell_contrasts`):
are ICL and IT closer to each other than either is to the query alone?"""
PAIR_LABELS: dict[str, str] = {pair: PAIR_NAMES[pair] for pair in TEST_PAIRS}
"""Display names of the tested pairs."""
CONTRAST_COLUMNS = (
    "factor",
    "level_a",
    "level_b",
    "pair",
    "quantity",
    "layer",
    "mean_a",
    "mean_b",
    "diff",
    "ci_low",
    "ci_high",
    "p",
    "p_holm",
    "margin",
    "tost_low",
    "tost_high",
    "p_tost",
    "verdict",
    "n_blocks_a",
    "n_blocks_b",
    "paired",
)
"""One row per factor × level × (pair, quantity): level_a against level_b (the reference);
layer: the layer read (-1: each cell's own last layer); mean_a / mean_b: the means of the
block values; diff: mean_a − mean_b (paired: the mean block difference); ci_low / ci_high:
its 95% CI from the t test; p: two-sided t test (paired t on block differences when
``paired``, else Welch); p_holm: Holm over the table (the family is every row); tost_low /
tost_high: the 90% CI of the TOST, p_tost: its p against ± margin (:func:`contrast_margin`); verdict:
:func:`iclit.analysis.margins.verdict` ("above null": level_a above level_b)."""
WITHIN_COLUMNS = (
    "cell_key",
    "pair_a",
    "quantity_a",
    "pair_b",
    "quantity_b",
    "layer",
    "mean_a",
    "mean_b",
    "diff",
    "ci_low",
    "ci_high",
    "p",
    "p_holm",
    "margin",
    "tost_low",
    "tost_high",
    "p_tost",
    "verdict",
    "n_blocks_a",
    "n_blocks_b",
    "paired",
)
"""As :data:`CONTRAST_COLUMNS`, for two quantities of one cell (:func:`within_cell_contrasts`)."""


def contrast_margin(declared: Any, pair: str) -> float:
    """The equivalence margin of a contrast of ``pair``'s cosines (or their excess over a null).

    Parameters
    ----------
    declared
        The spec's ``equivalence_margin`` (``RunData.margin``): a number, or a mapping per
        quantity (``raw``, ``update``…), or None.
    pair
        The pair compared.

    Returns
    -------
    float
        A number: that number. A mapping: its ``between`` entry (the default
        :data:`~iclit.analysis.margins.DEFAULT_MARGINS` ``["between"]``, ±0.02, where a mapping
        stored before that key existed lacks it, unless its ``update`` (update pair) or ``raw``
        entry is a number, which then applies as before). None: NaN, no equivalence claimed.
    """
    if isinstance(declared, Mapping):
        own = declared.get("update" if pair == "update" else "raw")
        numeric = isinstance(own, (int, float, np.floating)) and not isinstance(own, bool)
        declared = declared.get("between", own if numeric else DEFAULT_MARGINS["between"])
    if isinstance(declared, (int, float, np.floating)) and not isinstance(declared, bool):
        return float(declared)
    return float("nan")


def _t_summary(diff: float, se: float, df: float, margin: float) -> dict[str, float]:
    """CI, two-sided p and TOST of a t statistic with standard error ``se`` and ``df``."""
    if not np.isfinite(se) or not np.isfinite(df) or df <= 0:
        return {k: np.nan for k in ("ci_low", "ci_high", "p", "tost_low", "tost_high", "p_tost")} | {"margin": margin}
    if se == 0:  # every block the same: the limits of the t test as se -> 0
        inside = abs(diff) < margin
        return {
            "ci_low": diff,
            "ci_high": diff,
            "p": 1.0 if diff == 0 else 0.0,
            "tost_low": diff,
            "tost_high": diff,
            "p_tost": (0.0 if inside else 1.0) if np.isfinite(margin) else np.nan,
            "margin": margin,
        }
    t975, t95 = sps.t.ppf(0.975, df), sps.t.ppf(0.95, df)
    p_low = sps.t.sf((diff + margin) / se, df)  # H0: diff <= -margin
    p_high = sps.t.cdf((diff - margin) / se, df)  # H0: diff >= +margin
    return {
        "ci_low": diff - t975 * se,
        "ci_high": diff + t975 * se,
        "p": float(2 * sps.t.sf(abs(diff) / se, df)),
        "margin": margin,
        "tost_low": diff - t95 * se,
        "tost_high": diff + t95 * se,
        "p_tost": float(max(p_low, p_high)) if np.isfinite(margin) else np.nan,
    }


def compare_blocks(a: pd.DataFrame, b: pd.DataFrame, *, margin: float) -> dict[str, Any]:
    """Compare two series of block values (:func:`~iclit.analysis.units.block_values` rows of one series each).

    Parameters
    ----------
    a, b
        Columns ``block_id`` (a hashable label of the block, equal on both sides for the same
        block), ``value`` and ``queries``.
    margin
        The equivalence margin (TOST against ± margin; NaN: no TOST).

    Returns
    -------
    dict
        ``mean_a, mean_b, diff, ci_low, ci_high, p, margin, tost_low, tost_high, p_tost,
        n_blocks_a, n_blocks_b, paired``. Paired (``scipy.stats.ttest_rel``) when a and b hold the same
        block ids, each reading the same queries on both sides; else Welch
        (``scipy.stats.ttest_ind(equal_var=False)``). NaN where a side has under two blocks.
    """
    va, vb = a["value"].to_numpy(dtype=float), b["value"].to_numpy(dtype=float)
    qa = dict(zip(a["block_id"], a["queries"], strict=True))
    qb = dict(zip(b["block_id"], b["queries"], strict=True))
    paired = len(qa) == len(a) and len(qb) == len(b) and qa == qb
    out: dict[str, Any] = {
        "mean_a": float(va.mean()) if len(va) else np.nan,
        "mean_b": float(vb.mean()) if len(vb) else np.nan,
        "n_blocks_a": len(va),
        "n_blocks_b": len(vb),
        "paired": bool(paired),
    }
    if paired:
        d = va - b.set_index("block_id").loc[list(a["block_id"]), "value"].to_numpy(dtype=float)
        n = len(d)
        diff = float(d.mean()) if n else np.nan
        se = float(d.std(ddof=1) / np.sqrt(n)) if n >= 2 else np.nan
        df = n - 1.0
    else:
        diff = out["mean_a"] - out["mean_b"]
        if len(va) >= 2 and len(vb) >= 2:
            sa, sb = va.var(ddof=1) / len(va), vb.var(ddof=1) / len(vb)
            se = float(np.sqrt(sa + sb))
            df = (
                float((sa + sb) ** 2 / (sa**2 / (len(va) - 1) + sb**2 / (len(vb) - 1)))
                if se > 0
                else len(va) + len(vb) - 2.0
            )
        else:
            se = df = np.nan
    return out | {"diff": diff} | _t_summary(diff, se, df, margin)


def _adjust(df: pd.DataFrame) -> pd.DataFrame:
    """p_holm over every row (one family), then the verdicts."""
    df = df.copy()
    df["p_holm"] = holm(df["p"].to_numpy(dtype=float)) if len(df) else []
    df["verdict"] = [
        verdict(lo, hi, p, bool(pt < 0.05))
        for lo, hi, p, pt in zip(df["ci_low"], df["ci_high"], df["p_holm"], df["p_tost"].fillna(1.0), strict=True)
    ]
    return df


def _cell_labels(run: RunData) -> pd.DataFrame:
    """One row per cell_key with its factor values (from the outputs)."""
    return run.outputs.drop_duplicates("cell_key").reset_index(drop=True)


def _block_ids(blocks: pd.DataFrame) -> pd.Series:
    return pd.Series(
        [f"{s}/{b}" for s, b in zip(blocks["seed"], blocks["block"], strict=True)], index=blocks.index, dtype=object
    )


def cell_contrasts(
    run: RunData,
    quantities: Sequence[tuple[str, str]] = DEFAULT_QUANTITIES,
    *,
    layer: int = -1,
    factors: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Between-cell contrasts of each factor with query blocks as units.

    For each factor with two or more values, each value (level_a) is compared with the
    reference value (level_b: the base value, else the first): the cells of each level
    (``design: separate``: those where the other factors keep their base values; grid: all
    of them, the other factors averaged over) give one value per (seed, query block) of each
    (pair, quantity) at ``layer`` (:func:`~iclit.analysis.units.block_values`: the mean over the level's trials of
    that block), compared by :func:`compare_blocks` at the spec's ``equivalence_margin``. The
    cells of a run read the same queries in the same blocks when they share the seed and the
    task, so the blocks, not the cells × blocks, are the independent units.

    Parameters
    ----------
    run
        A run read by :func:`iclit.analysis.load_run` (needs stored states).
    quantities
        (pair, quantity) compared (:data:`DEFAULT_QUANTITIES`; see :func:`~iclit.analysis.units.unit_values`).
    layer
        State index read; -1: each cell's own last layer.
    factors
        Factors to contrast (default: every factor of the plan with two or more values).

    Returns
    -------
    pandas.DataFrame
        :data:`CONTRAST_COLUMNS`. The Holm family is every row of the table: all contrasts of
        the run (every factor asked × level × pair × quantity) at the declared layer (by
        default each cell's own last layer).
    """
    plan = run.plan or {}
    names = [f for f, vs in plan.get("factors", {}).items() if len(vs) > 1] if factors is None else list(factors)
    for f in names:
        if f not in plan.get("factors", {}):
            raise ValueError(
                f"{f!r} is not a factor of this run (factors: {', '.join(plan.get('factors', {})) or 'none'})"
            )
    if not names or run.trials.empty:
        return pd.DataFrame(columns=list(CONTRAST_COLUMNS))
    per_unit = unit_values(run, quantities, layer)
    labels = _cell_labels(run)
    rows = []
    for factor in names:
        cells = design_subset(labels, factor, plan)
        blocks = block_values(
            per_unit.merge(cells[["cell_key", factor]], on="cell_key"), by=("pair", "quantity", factor)
        )
        if blocks.empty:
            continue
        blocks["block_id"] = _block_ids(blocks)
        ref = reference_value(plan, factor)
        for value in factor_values(plan, factor):
            if str(value) == str(ref):
                continue
            for pair, quantity in quantities:
                q = blocks[(blocks["pair"] == pair) & (blocks["quantity"] == quantity)]
                a, b = q[match_value(q[factor], value)], q[match_value(q[factor], ref)]
                if a.empty or b.empty:
                    continue
                rows.append(
                    {
                        "factor": factor,
                        "level_a": str(value),
                        "level_b": str(ref),
                        "pair": pair,
                        "quantity": quantity,
                        "layer": layer,
                    }
                    | compare_blocks(a, b, margin=contrast_margin(run.margin, pair))
                )
    if not rows:
        return pd.DataFrame(columns=list(CONTRAST_COLUMNS))
    return _adjust(pd.DataFrame(rows))[list(CONTRAST_COLUMNS)]


def within_cell_contrasts(
    run: RunData,
    comparisons: Sequence[tuple[tuple[str, str], tuple[str, str]]],
    *,
    layer: int = -1,
    cells: Sequence[str] | None = None,
    it_state: str = "it",
) -> pd.DataFrame:
    """Two quantities of the same cell compared over its query blocks (a paired t test where
    both quantities have a value for the same trials of each block, else Welch).

    Parameters
    ----------
    run
        A run read by :func:`iclit.analysis.load_run` (needs stored states).
    comparisons
        ((pair_a, quantity_a), (pair_b, quantity_b)) each, e.g. ICL–IT cosine against
        anchor–ICL cosine: ``(("icl_it", "cosine"), ("anchor_icl", "cosine"))``.
    layer
        State index read; -1: each cell's own last layer.
    cells
        The cell keys compared (default: every cell with stored states).
    it_state
        The stored state that plays the IT arm (:func:`~iclit.analysis.units.unit_values`).

    Returns
    -------
    pandas.DataFrame
        :data:`WITHIN_COLUMNS`. The Holm family is every row: each comparison in each cell
        at the declared layer.
    """
    wanted = list(dict.fromkeys(q for c in comparisons for q in c))
    per_unit = unit_values(run, wanted, layer, it_state=it_state)
    if cells is not None:
        per_unit = per_unit[per_unit["cell_key"].isin(list(cells))]
    blocks = block_values(per_unit)
    if blocks.empty:
        return pd.DataFrame(columns=list(WITHIN_COLUMNS))
    blocks["block_id"] = _block_ids(blocks)
    rows = []
    for cell, sub in blocks.groupby("cell_key", sort=False):
        for (pa, qa), (pb, qb) in comparisons:
            a = sub[(sub["pair"] == pa) & (sub["quantity"] == qa)]
            b = sub[(sub["pair"] == pb) & (sub["quantity"] == qb)]
            common = set(a["block_id"]) & set(b["block_id"])  # blocks where both quantities have a value
            a, b = a[a["block_id"].isin(common)], b[b["block_id"].isin(common)]
            margin = contrast_margin(run.margin, pa if pa == pb else "raw")
            rows.append(
                {"cell_key": cell, "pair_a": pa, "quantity_a": qa, "pair_b": pb, "quantity_b": qb, "layer": layer}
                | compare_blocks(a, b, margin=margin)
            )
    return _adjust(pd.DataFrame(rows))[list(WITHIN_COLUMNS)] if rows else pd.DataFrame(columns=list(WITHIN_COLUMNS))


@register_metric(
    "contrasts",
    "per factor × value × pair × quantity: the value against the reference value with query "
    "blocks as units (paired t or Welch, 95% CI, Holm over the table, TOST, verdict), last layer",
)
def contrasts_metric(run: RunData) -> pd.DataFrame:
    """:func:`cell_contrasts` with its defaults (the metric ``contrasts``)."""
    return cell_contrasts(run)
