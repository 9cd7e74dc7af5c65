"""The built-in metrics (registered by name) and the tables of a one-cell comparison.

Every function reads a :class:`~iclit.analysis.rundata.RunData`; none loads a model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from iclit.analysis.frames import pair_order
from iclit.analysis.outputs import agreement
from iclit.analysis.registry import register_metric
from iclit.analysis.rundata import RunData
from iclit.analysis.stats import summarize, summarize_layers

__all__ = [
    "cell_cosines",
    "cell_cosine_tables",
    "query_blocks",
    "with_labels",
    "comparison_frame",
    "comparison_summary",
    "comparison_metrics",
    "arms_of",
    "factor_columns",
    "single_cell",
]

_TRIAL_COLUMNS = ("cell_key", "seed", "resample", "query_id", "demo_similarity", "n_wrong", "trial_key")


def factor_columns(df: pd.DataFrame) -> list[str]:
    """The factor-value columns of a run's tables (the cell's labels)."""
    from iclit.analysis.frames import FRAME_COLUMNS

    skip = {*FRAME_COLUMNS, *_TRIAL_COLUMNS}
    return [
        c
        for c in df.columns
        if c not in skip
        and not c.startswith(("prediction_", "score_"))
        and c
        not in (
            "query",
            "gold",
            "score_name",
            "it_final_loss",
            "it_fitted",
            "it_losses",
            "dose",
            "seconds",
            "label_probs",
            "set",
            "slot",
            "causal",
        )
    ]


def arms_of(outputs: pd.DataFrame) -> list[str]:
    """The arms of a run, in the order they ran (from the ``score_<arm>`` columns)."""
    return [c[len("score_") :] for c in outputs.columns if c.startswith("score_") and c != "score_name"]


def single_cell(run: RunData) -> tuple[str, int]:
    """(cell_key, seed) of a run with exactly one; ValueError otherwise."""
    groups = (
        sorted({(c, int(s)) for c, s in zip(run.outputs["cell_key"], run.outputs["seed"], strict=True)})
        if len(run.outputs)
        else []
    )
    if len(groups) != 1:
        raise ValueError(
            f"{run.path}: a comparison needs one cell and one seed, the run has {len(groups)} (cell, seed) groups"
        )
    return groups[0]


def cell_cosine_tables(run: RunData, cell_key: str, seed: int) -> dict[str, pd.DataFrame]:
    """pair → cosines of one (cell, seed): rows are resamples (sorted), columns layers;
    pairs in :func:`~iclit.analysis.frames.pair_order`. Trials without stored states are absent."""
    f = run.frame[(run.frame["cell_key"] == cell_key) & (run.frame["seed"] == seed)]
    return {
        pair: f[f["pair"] == pair].pivot(index="resample", columns="layer", values="cosine").sort_index()
        for pair in pair_order(f["pair"].unique())
    }


def cell_cosines(run: RunData, cell_key: str, seed: int) -> dict[str, np.ndarray]:
    """pair → ``[n, L+1]`` cosines of one (cell, seed), trials in resample order (see
    :func:`cell_cosine_tables`)."""
    return {pair: t.to_numpy(dtype=np.float64) for pair, t in cell_cosine_tables(run, cell_key, seed).items()}


def query_blocks(run: RunData, cell_key: str, resamples: Any) -> np.ndarray | None:
    """The query block of each resample of a cell (sets sharing their queries: the independent
    units of a crossed cell); None with one query per set and one set per query, where every
    trial is its own unit."""
    settings = run.settings.get(cell_key, {})
    q, m = int(settings.get("queries_per_set", 1)), int(settings.get("sets_per_query", 1))
    if q * m == 1:
        return None
    return np.asarray(resamples, dtype=np.int64) // (q * m)


def comparison_summary(run: RunData) -> pd.DataFrame:
    """Per pair × layer: mean, std, 95% CI (a t interval over query blocks in a crossed cell,
    else a bootstrap over trials seeded by the run's seed), n — summary.csv."""
    cell, seed = single_cell(run)
    tables = cell_cosine_tables(run, cell, seed)
    blocks = query_blocks(run, cell, next(iter(tables.values())).index) if tables else None
    return summarize_layers({p: t.to_numpy(dtype=np.float64) for p, t in tables.items()}, blocks, seed=seed)


def comparison_metrics(run: RunData) -> dict[str, Any]:
    """metrics.json of a one-cell run: per-arm accuracy (or exact_match, chrF) with CI, prediction agreement
    between arms, IT final-loss statistics, last-layer and mean-over-layers summaries."""
    cell, seed = single_cell(run)
    o = run.outputs[(run.outputs["cell_key"] == cell) & (run.outputs["seed"] == seed)].sort_values("resample")
    tables = cell_cosine_tables(run, cell, seed)
    cos = {p: t.to_numpy(dtype=np.float64) for p, t in tables.items()}
    cos_blocks = query_blocks(run, cell, next(iter(tables.values())).index) if tables else None
    blocks = query_blocks(run, cell, o["resample"].to_numpy())
    keys = {"correct": "accuracy", "exact_match": "exact_match"}  # outputs' score_name -> metrics.json key
    score_name = next((key for name, key in keys.items() if (o["score_name"] == name).all()), "chrf")
    losses = pd.to_numeric(o["it_final_loss"], errors="coerce").to_numpy(dtype=float)
    pred = {arm: o[f"prediction_{arm}"].tolist() for arm in arms_of(o)}
    score_range = (0.0, 100.0) if score_name == "chrf" else (0.0, 1.0)
    return {
        score_name: {
            arm: summarize(
                pd.to_numeric(o[f"score_{arm}"]).to_numpy(dtype=float), blocks, bounds=score_range, seed=seed
            )
            for arm in pred
        },
        "icl_it_agreement": agreement(pred["icl"], pred["it"]),
        "anchor_icl_agreement": agreement(pred["anchor"], pred["icl"]),
        "anchor_it_agreement": agreement(pred["anchor"], pred["it"]),
        "it_final_loss": summarize(losses, seed=seed)
        | {"max": float(np.nanmax(losses)) if losses.size and not np.all(np.isnan(losses)) else float("nan")},
        "last_layer": {pair: summarize(c[:, -1], cos_blocks, seed=seed) for pair, c in cos.items()},
        "mean_over_layers": {pair: summarize(c.mean(axis=1), cos_blocks, seed=seed) for pair, c in cos.items()},
    }


def comparison_frame(run: RunData) -> pd.DataFrame:
    """The tidy frame of a one-cell comparison: resample, query_id, layer, pair, cosine (the
    three pairs), by resample, pair (anchor–ICL, anchor–IT, ICL–IT), layer."""
    from iclit.analysis.similarity import PAIRS

    cell, seed = single_cell(run)
    f = run.frame[(run.frame["cell_key"] == cell) & (run.frame["seed"] == seed) & run.frame["pair"].isin(PAIRS)]
    f = f.assign(rank=f["pair"].map(PAIRS.index)).sort_values(["resample", "rank", "layer"], kind="stable")
    return f[["resample", "query_id", "layer", "pair", "cosine"]].reset_index(drop=True)


# --- registered metrics -----------------------------------------------------------------------


def with_labels(df: pd.DataFrame, run: RunData) -> pd.DataFrame:
    """Prefix a per-cell table with the cells' factor values."""
    if df.empty or run.outputs.empty:
        return df
    labels = run.outputs[[*factor_columns(run.outputs), "cell_key"]].drop_duplicates("cell_key")
    return labels.merge(df, on="cell_key", how="right")


@register_metric("cosines", "per trial × layer × pair: the cosine of the two arms' states (and every baseline pair)")
def cosines(run: RunData) -> pd.DataFrame:
    return run.frame


@register_metric(
    "layers", "per cell × pair × layer: mean, std, 95% CI (t over query blocks in a crossed cell) and n over trials"
)
def layers(run: RunData) -> pd.DataFrame:
    parts = []
    for (cell, seed), _ in run.frame.groupby(["cell_key", "seed"], sort=False):
        tables = cell_cosine_tables(run, cell, int(seed))
        blocks = query_blocks(run, cell, next(iter(tables.values())).index) if tables else None
        s = summarize_layers({p: t.to_numpy(dtype=np.float64) for p, t in tables.items()}, blocks, seed=int(seed))
        parts.append(s.assign(cell_key=cell, seed=int(seed)))
    if not parts:
        return pd.DataFrame()
    return with_labels(pd.concat(parts, ignore_index=True), run)


@register_metric("summary", "per cell × pair: the cosine at the last layer and averaged over layers (mean over trials)")
def summary(run: RunData) -> pd.DataFrame:
    df = run.frame
    if df.empty:
        return pd.DataFrame()
    keys = [*factor_columns(df), "cell_key"]
    per_trial = (
        df.groupby([*keys, "trial_key", "pair"], sort=False)
        .agg(last_layer=("cosine", "last"), mean_over_layers=("cosine", "mean"))
        .reset_index()
    )
    out = (
        per_trial.groupby([*keys, "pair"], sort=False)
        .agg(
            trials=("trial_key", "nunique"),
            last_layer=("last_layer", "mean"),
            mean_over_layers=("mean_over_layers", "mean"),
        )
        .reset_index()
    )
    return out.drop(columns="cell_key")


@register_metric("cka", "per cell × layer × pair: linear CKA across all queries of the cell", needs_cka=True)
def cka(run: RunData) -> pd.DataFrame:
    return with_labels(run.cka, run)


@register_metric("scores", "per cell × arm: task accuracy (or chrF), mean with 95% bootstrap CI")
def scores(run: RunData) -> pd.DataFrame:
    rows = []
    for (cell, seed), o in run.outputs.groupby(["cell_key", "seed"], sort=False):
        for arm in arms_of(o):
            s = summarize(pd.to_numeric(o[f"score_{arm}"], errors="coerce").to_numpy(dtype=float), seed=int(seed))
            rows.append({"cell_key": cell, "seed": int(seed), "arm": arm, "score": o["score_name"].iloc[0], **s})
    return with_labels(pd.DataFrame(rows), run)


@register_metric("agreement", "per cell × arm pair: the fraction of trials on which the two arms predict the same")
def agreements(run: RunData) -> pd.DataFrame:
    rows = []
    for (cell, seed), o in run.outputs.groupby(["cell_key", "seed"], sort=False):
        arms = arms_of(o)
        for i, a in enumerate(arms):
            for b in arms[i + 1 :]:
                rows.append(
                    {
                        "cell_key": cell,
                        "seed": int(seed),
                        "pair": f"{a}_{b}",
                        "agreement": agreement(o[f"prediction_{a}"].tolist(), o[f"prediction_{b}"].tolist()),
                        "n": len(o),
                    }
                )
    return with_labels(pd.DataFrame(rows), run)


@register_metric("it_loss", "per cell: the IT arm's final answer loss on its demonstrations (mean, CI, max)")
def it_loss(run: RunData) -> pd.DataFrame:
    rows = []
    for (cell, seed), o in run.outputs.groupby(["cell_key", "seed"], sort=False):
        losses = pd.to_numeric(o["it_final_loss"], errors="coerce").to_numpy(dtype=float)
        finite = losses[np.isfinite(losses)]
        rows.append(
            {
                "cell_key": cell,
                "seed": int(seed),
                **summarize(losses, seed=int(seed)),
                "max": float(finite.max()) if finite.size else float("nan"),
            }
        )
    return with_labels(pd.DataFrame(rows), run)


@register_metric(
    "effects",
    "per factor: each value vs the base value on the ICL–IT cosine and its baselines "
    "(paired bootstrap CI, Cohen's d, sign-flip permutation p)",
)
def effects(run: RunData) -> pd.DataFrame:
    from iclit.analysis.factors import factor_effects

    plan = run.latest["plan"] if run.latest else None
    if plan is None or run.frame.empty:
        return pd.DataFrame()
    found = [factor_effects(run.frame, plan, f) for f, vs in plan["factors"].items() if len(vs) > 1]
    return pd.concat(found, ignore_index=True) if found else pd.DataFrame()


@register_metric("dose", "per captured IT step (recipe capture_steps): ICL–IT and anchor–IT cosine, IT score, loss")
def dose(run: RunData) -> pd.DataFrame:
    from iclit.analysis.factors import dose_factor, dose_summary

    plan = run.latest["plan"] if run.latest else None
    if plan is None or run.frame.empty:
        return pd.DataFrame()
    return dose_summary(run.frame, run.outputs, plan, dose_factor(plan))


@register_metric(
    "tests",
    "per cell × pair × centring × layer × null: observed cosine, its query-swap / demo-swap "
    "null, diff with a t interval over query blocks, permutation p (exact or Monte Carlo, with the "
    "design's smallest p), step-down max-T p_adj over layers, Holm p and BH q over the cell's tests at "
    "that layer, TOST against the declared margin, the positive control (ceiling) and the fraction of "
    "it, verdict",
)
def tests(run: RunData) -> pd.DataFrame:
    return with_labels(run.tests, run)


@register_metric(
    "power",
    "per cell × test at the last layer, from this run as a pilot: the block SD, the effect "
    "detectable with 80% power after Bonferroni over the layer's family, and the blocks needed to "
    "detect the margin and the observed excess (`iclit power RUN --blocks N` plans another size)",
)
def power(run: RunData) -> pd.DataFrame:
    from iclit.analysis.power import power_table

    return with_labels(power_table(run.tests), run)


@register_metric(
    "geometry",
    "per cell × pair × layer: debiased linear CKA and RSA across all the cell's queries, "
    "with permutation nulls (p, max-T p_adj)",
)
def geometry(run: RunData) -> pd.DataFrame:
    return with_labels(run.geometry, run)


@register_metric(
    "behaviour",
    "per cell × arm pair: prediction agreement and label-distribution KL, alone and "
    "against the query-swap / demo-swap nulls (Holm, BH, TOST)",
)
def behaviour(run: RunData) -> pd.DataFrame:
    return with_labels(run.behaviour, run)


@register_metric(
    "dose_matched",
    "per cell with capture_steps: ICL–IT at the held-out behaviour-matched IT step "
    "(IT's label distribution closest to ICL's on the set's other queries), the cross-fitted peak "
    "(chosen on half the sets, read on the other) beside the naive one; CIs over sets then queries",
)
def dose_matched(run: RunData) -> pd.DataFrame:
    return with_labels(run.cells["dose"], run)


@register_metric(
    "dose_tests",
    "per cell with capture_steps: the query-swap / demo-swap tests of the IT arm stopped at its behaviour-matched step",
)
def dose_tests(run: RunData) -> pd.DataFrame:
    return with_labels(run.cells["dose_tests"], run)


@register_metric(
    "seeds",
    "per cell with a second IT seed (it_seeds: 2 or noise_ceiling): anchor–IT and ICL–IT "
    "with each seed, the per-pair between-seed SD and mean |diff| per layer (the IT seed noise)",
)
def seeds(run: RunData) -> pd.DataFrame:
    return with_labels(run.cells["seeds"], run)
