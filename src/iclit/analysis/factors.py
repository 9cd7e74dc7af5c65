"""Per-factor numbers of a run: summaries per factor value, paired effects, CKA per cell, dose curves.

Pure pandas / numpy over what :func:`iclit.analysis.rundata.load_run` reads (no model, no
figure, no HTML): the report draws and prints these tables, ``iclit results --effects``
prints :func:`factor_effects`, and a notebook calls them directly.

Inputs: ``frame`` (one row per trial × layer × pair: factor columns, ``cell_key, seed,
resample, layer, pair, cosine, trial_key``), ``outputs`` (one row per trial: factor columns,
``score_<arm>``, ``demo_similarity``, ``n_wrong``, ``it_losses``, ``dose``…), ``cka`` (one row
per cell × seed × layer × pair: ``cell_key, seed, layer, pair, value``) and the run's
``plan`` (``factors``, ``base``, ``design``…).

Every summary is :func:`~iclit.analysis.stats.summarize`'s ``{mean, std, ci_low, ci_high,
n}`` (mean with a 95% bootstrap CI); a per-trial similarity is read at the last layer
(``last_layer``) and averaged over layers (``mean_over_layers``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from iclit.analysis.similarity import BASELINE_PAIRS, PAIRS
from iclit.analysis.stats import cohens_d, paired_bootstrap_diff, permutation_test, summarize, summarize_layers

__all__ = [
    "CKA_PAIRS",
    "EFFECT_PAIRS",
    "EXTRA_PAIRS",
    "WHATS",
    "cka_per_cell",
    "design_subset",
    "dose_factor",
    "dose_peaks",
    "dose_summary",
    "factor_effects",
    "factor_summary",
    "factor_values",
    "layer_summaries",
    "match_value",
    "per_trial",
    "peak_values",
    "reference_value",
    "score_label",
    "trial_table",
]

EXTRA_PAIRS: tuple[str, ...] = tuple(p for pairs in BASELINE_PAIRS.values() for p in pairs)
"""The per-trial baseline "pairs" (centred, shuffled, update, noise ceiling, query mean)."""
CKA_PAIRS: tuple[str, ...] = ("cka_icl_it", "cka_anchor_icl", "cka_anchor_it")
"""Linear CKA across all queries of a cell (``RunData.cka``), in display order."""
EFFECT_PAIRS: tuple[str, ...] = ("icl_it", "icl_it_centered", "update_cosine", "icl_it_qmean")
"""The similarities whose factor effects the report tests (those present in the run)."""
WHATS: tuple[str, str] = ("last_layer", "mean_over_layers")
"""The two per-trial reductions over layers."""

_STEP = re.compile(r"^(icl_it|anchor_it)_step(\d+)$")


# ------------------------------------------------------------------ design


def factor_values(plan: Mapping[str, Any], factor: str) -> list[Any]:
    """The values of ``factor`` in the plan, in the spec's order."""
    return list(plan["factors"][factor])


def match_value(series: pd.Series, value: Any) -> pd.Series:
    """Rows whose factor label is ``value`` (labels compared as text, as the store keeps them)."""
    return series.astype(str) == str(value)


def design_subset(df: pd.DataFrame, factor: str, plan: Mapping[str, Any]) -> pd.DataFrame:
    """The rows a factor's comparison reads: all of them in a grid design (the other
    factors pooled); with ``design: separate``, those where the other factors keep their base values."""
    if plan.get("design") != "separate" or df.empty:
        return df
    base = plan["base"]
    keep = np.ones(len(df), dtype=bool)
    for other in plan["factors"]:
        if other != factor and other in df.columns:
            keep &= (df[other].astype(str) == str(base[other])).to_numpy()
    return df[keep]


def reference_value(plan: Mapping[str, Any], factor: str) -> Any:
    """The level every other value is compared with: the base value if it is among the
    factor's values, else the first value."""
    values = factor_values(plan, factor)
    base = plan.get("base", {}).get(factor)
    return next((v for v in values if str(v) == str(base)), values[0])


def score_label(outputs: pd.DataFrame) -> str:
    """``"chrF"`` or ``"exact match"`` when the run scores generations that way, else ``"accuracy"``."""
    names = set(outputs["score_name"].dropna()) if len(outputs) and "score_name" in outputs else set()
    if "chrf" in names:
        return "chrF"
    if "exact_match" in names:
        return "exact match"
    return "accuracy"


# ------------------------------------------------------------------ per-trial reductions


def per_trial(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per trial × pair: ``trial_key, pair, last_layer, mean_over_layers``."""
    if frame.empty:
        return pd.DataFrame(columns=["trial_key", "pair", *WHATS])
    g = frame.groupby(["trial_key", "pair"], sort=False)
    last = frame.loc[g["layer"].idxmax()].set_index(["trial_key", "pair"])["cosine"].rename("last_layer")
    mean = g["cosine"].mean().rename("mean_over_layers")
    return pd.concat([last, mean], axis=1).reset_index()


def trial_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per trial: its labels (seed, resample, factor values…) and per pair the
    columns ``<pair>:last_layer`` / ``<pair>:mean_over_layers``."""
    per = per_trial(frame)
    wide = per.pivot(index="trial_key", columns="pair", values=list(WHATS))
    wide.columns = [f"{pair}:{what}" for what, pair in wide.columns]
    meta_cols = [c for c in frame.columns if c not in ("layer", "pair", "cosine")]
    meta = frame.drop_duplicates("trial_key")[meta_cols].set_index("trial_key")
    return meta.join(wide).reset_index()


def cka_per_cell(cka: pd.DataFrame) -> pd.DataFrame:
    """One row per cell × seed × pair of ``RunData.cka``: ``cell_key, seed, pair,
    last_layer, mean_over_layers`` (NaN layers skipped by the mean)."""
    cols = ["cell_key", "seed", "pair", *WHATS]
    if cka is None or cka.empty:
        return pd.DataFrame(columns=cols)
    c = cka.assign(value=pd.to_numeric(cka["value"], errors="coerce"))
    g = c.groupby(["cell_key", "seed", "pair"], sort=False)
    last = c.loc[g["layer"].idxmax()].set_index(["cell_key", "seed", "pair"])["value"].rename("last_layer")
    mean = g["value"].mean().rename("mean_over_layers")
    return pd.concat([last, mean], axis=1).reset_index()[cols]


def _cell_labels(plan: Mapping[str, Any], *frames: pd.DataFrame) -> pd.DataFrame:
    """cell_key → factor labels, from whichever of the frames carries them."""
    names = ["task", *plan.get("base", {}), *plan.get("factors", {})]
    parts = []
    for df in frames:
        if df is not None and not df.empty and "cell_key" in df.columns:
            cols = list(dict.fromkeys(c for c in names if c in df.columns))
            parts.append(df[["cell_key", *cols]].drop_duplicates("cell_key"))
    if not parts:
        return pd.DataFrame(columns=["cell_key"])
    return pd.concat(parts, ignore_index=True).drop_duplicates("cell_key")


# ------------------------------------------------------------------ per factor value


def factor_summary(
    frame: pd.DataFrame, outputs: pd.DataFrame, plan: Mapping[str, Any], factor: str, *, cka: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One row per value of ``factor``: ``trials``; per pair ``<pair>:last_layer`` and
    ``<pair>:mean_over_layers`` over trials (the three pairs always, baselines when stored);
    per arm ``score:<arm>`` over trials; ``demo_similarity`` and ``n_wrong`` (mean) when recorded.

    ``cka`` (``RunData.cka``): each pair present (``cka_icl_it``…) adds the same two columns,
    summarised over the cells × seeds of that value — a cell's factor values come from its
    ``cell_key`` in ``outputs`` / ``frame``; with ``design: separate`` only the cells where
    the other factors keep their base values count.
    """
    f = design_subset(frame, factor, plan)
    o = design_subset(outputs, factor, plan)
    trials = per_trial(f)
    if not f.empty:
        trials = trials.merge(f.drop_duplicates("trial_key")[["trial_key", factor]], on="trial_key")
    cells = cka_per_cell(cka)
    if not cells.empty:
        labels = _cell_labels(plan, outputs, frame)
        cells = design_subset(cells.merge(labels, on="cell_key", how="inner"), factor, plan)
    cka_pairs = [p for p in CKA_PAIRS if not cells.empty and p in set(cells["pair"])]
    cka_pairs += [p for p in pd.unique(cells["pair"]) if p not in cka_pairs] if not cells.empty else []
    arms = [c[len("score_") :] for c in o.columns if c.startswith("score_") and c != "score_name"]
    present = set(trials["pair"])
    rows = []
    for value in factor_values(plan, factor):
        row: dict[str, Any] = {factor: value}
        t = trials[match_value(trials[factor], value)] if not trials.empty else trials
        ov = o[match_value(o[factor], value)] if not o.empty else o
        row["trials"] = int(len(ov))
        for pair in PAIRS + tuple(p for p in EXTRA_PAIRS if p in present):
            for what in WHATS:
                row[f"{pair}:{what}"] = summarize(t.loc[t["pair"] == pair, what].to_numpy() if not t.empty else [])
        for arm in arms:
            row[f"score:{arm}"] = summarize(
                pd.to_numeric(ov[f"score_{arm}"], errors="coerce").to_numpy() if len(ov) else []
            )
        if cka_pairs:
            cv = cells[match_value(cells[factor], value)] if factor in cells.columns else cells.iloc[:0]
            for pair in cka_pairs:
                for what in WHATS:
                    row[f"{pair}:{what}"] = summarize(cv.loc[cv["pair"] == pair, what].to_numpy(dtype=float))
        if len(ov) and ov["demo_similarity"].notna().any():
            row["demo_similarity"] = summarize(pd.to_numeric(ov["demo_similarity"], errors="coerce").to_numpy())
        if len(ov) and "n_wrong" in ov:
            row["n_wrong"] = float(pd.to_numeric(ov["n_wrong"], errors="coerce").mean())
        if len(ov) and "it_fitted" in ov and ov["it_fitted"].notna().any():  # IT arms that did not learn their demos
            row["it_not_fitted"] = int((ov["it_fitted"] == False).sum())  # noqa: E712 - a column of True/False/None
        rows.append(row)
    return pd.DataFrame(rows)


def peak_values(summary: pd.DataFrame, factor: str, pair: str = "icl_it") -> dict[str, tuple[Any, float]]:
    """Where ``pair`` is highest over the factor's values: ``{what: (value, mean)}`` for each
    of last layer / mean over layers that has a value (a :func:`factor_summary` table)."""
    out: dict[str, tuple[Any, float]] = {}
    for what in WHATS:
        col = f"{pair}:{what}"
        if col not in summary.columns:
            continue
        means = np.array(
            [s["mean"] if isinstance(s, Mapping) and s.get("n") else np.nan for s in summary[col]], dtype=float
        )
        if means.size == 0 or np.all(np.isnan(means)):
            continue
        i = int(np.nanargmax(means))
        out[what] = (summary[factor].iloc[i], float(means[i]))
    return out


def layer_summaries(
    frame: pd.DataFrame, factor: str | None, values: Sequence[Any], pairs: Sequence[str] | None = None
) -> pd.DataFrame:
    """Per value of ``factor`` (``None``: all trials, value None) × pair × layer: the mean
    with a 95% bootstrap CI over trials (``value, pair, layer, mean, std, ci_low, ci_high, n``)."""
    parts = []
    for value in values if factor is not None else [None]:
        sub = frame if factor is None else frame[match_value(frame[factor], value)]
        if pairs is not None:
            sub = sub[sub["pair"].isin(pairs)]
        if sub.empty:
            continue
        pivot = {
            pair: grp.pivot_table(index="trial_key", columns="layer", values="cosine").to_numpy()
            for pair, grp in sub.groupby("pair", sort=False)
        }
        parts.append(summarize_layers(pivot).assign(value=value))
    cols = ["value", "pair", "layer", "mean", "std", "ci_low", "ci_high", "n"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def factor_effects(
    frame: pd.DataFrame,
    plan: Mapping[str, Any],
    factor: str,
    *,
    pairs: Sequence[str] = EFFECT_PAIRS,
    n_boot: int = 2000,
    n_perm: int = 10000,
    seed: int = 0,
) -> pd.DataFrame:
    """Each value of ``factor`` against the reference (base) value, paired trial by trial.

    Trials are paired on (seed, resample) — the same query — and, in a grid design, on the
    other factors' values. For each similarity in ``pairs`` present in the run and each of
    last layer / mean over layers: mean difference (value − reference) with a paired
    bootstrap 95% CI, Cohen's d of the differences and a two-sided sign-flip permutation
    p-value. One row per (value, pair, what).

    The trials of one query block share their queries and demonstrations, so these pooled
    CIs and p-values are descriptive only; the tests with query blocks as units are
    :func:`iclit.analysis.contrasts.cell_contrasts` (``iclit results RUN --contrasts``).
    """
    columns = [
        "factor",
        "value",
        "reference",
        "pair",
        "what",
        "n",
        "mean_value",
        "mean_reference",
        "mean_diff",
        "ci_low",
        "ci_high",
        "cohens_d",
        "p_value",
    ]
    f = design_subset(frame, factor, plan)
    if f.empty or factor not in f.columns:
        return pd.DataFrame(columns=columns)
    t = trial_table(f)
    ref = reference_value(plan, factor)
    others = [o for o in plan["factors"] if o != factor and o in t.columns] if plan.get("design") != "separate" else []
    keys = ["seed", "resample", *others]
    t = t.assign(**{k: t[k].astype(str) for k in others})
    base_rows = t[match_value(t[factor], ref)].set_index(keys)
    rows = []
    for value in factor_values(plan, factor):
        if str(value) == str(ref):
            continue
        cur = t[match_value(t[factor], value)].set_index(keys)
        joined = cur.merge(base_rows, left_index=True, right_index=True, how="inner", suffixes=("", "@ref"))
        for pair in pairs:
            for what in WHATS:
                col = f"{pair}:{what}"
                if col not in t.columns:
                    continue
                a = pd.to_numeric(joined[col], errors="coerce").to_numpy(dtype=float)
                b = pd.to_numeric(joined[f"{col}@ref"], errors="coerce").to_numpy(dtype=float)
                d = paired_bootstrap_diff(a, b, n_boot=n_boot, seed=seed)
                rows.append(
                    {
                        "factor": factor,
                        "value": value,
                        "reference": ref,
                        "pair": pair,
                        "what": what,
                        "n": d["n"],
                        "mean_value": float(np.nanmean(a)) if d["n"] else float("nan"),
                        "mean_reference": float(np.nanmean(b)) if d["n"] else float("nan"),
                        "mean_diff": d["mean_diff"],
                        "ci_low": d["ci_low"],
                        "ci_high": d["ci_high"],
                        "cohens_d": cohens_d(a, b) if d["n"] else float("nan"),
                        "p_value": permutation_test(a, b, n_perm=n_perm, seed=seed) if d["n"] else float("nan"),
                    }
                )
    return pd.DataFrame(rows, columns=columns)


# ------------------------------------------------------------------ dose


def dose_factor(plan: Mapping[str, Any]) -> str | None:
    """The factor the dose curves are split by: ``recipe`` when it varies, else the only
    factor, else None (one curve over all trials)."""
    factors = list(plan["factors"])
    return "recipe" if "recipe" in factors else (factors[0] if len(factors) == 1 else None)


def dose_summary(
    frame: pd.DataFrame, outputs: pd.DataFrame, plan: Mapping[str, Any], factor: str | None
) -> pd.DataFrame:
    """The dose curves: per factor value (or one group) and captured step, the ICL–IT and
    anchor–IT cosine (last layer, mean over layers), the IT score and the training loss of
    the model read at that step (after that many updates), each summarised over trials
    (mean with a 95% bootstrap CI). Empty when the run captured no steps."""
    dose = frame[frame["pair"].str.match(_STEP.pattern)] if not frame.empty else frame
    if dose.empty:
        return pd.DataFrame()
    if factor is not None:
        dose, outputs = design_subset(dose, factor, plan), design_subset(outputs, factor, plan)
    per = per_trial(dose)
    parsed = per["pair"].str.extract(_STEP.pattern)
    per = per.assign(base_pair=parsed[0], step=parsed[1].astype(int))
    if factor is not None:
        per = per.merge(dose.drop_duplicates("trial_key")[["trial_key", factor]], on="trial_key")
    values = factor_values(plan, factor) if factor is not None else [None]
    rows = []
    for value in values:
        p = per if value is None else per[match_value(per[factor], value)]
        o = outputs if value is None else outputs[match_value(outputs[factor], value)]
        for step in sorted(p["step"].unique()):
            row: dict[str, Any] = {"value": value, "step": int(step)}
            for pair in ("icl_it", "anchor_it"):
                q = p[(p["step"] == step) & (p["base_pair"] == pair)]
                for what in WHATS:
                    row[f"{pair}:{what}"] = summarize(q[what].to_numpy())
            scores, losses = [], []
            for _, trial in o.iterrows():
                d, trial_losses = trial.get("dose"), trial.get("it_losses")
                if isinstance(d, Mapping) and step in d.get("steps", []):
                    scores.append(d["score"][d["steps"].index(step)])
                # losses[j] is the loss of the forward pass before update j + 1, so the model
                # read after ``step`` updates has losses[step]; after the last, the final loss
                if isinstance(trial_losses, list) and step < len(trial_losses):
                    losses.append(trial_losses[step])
                elif isinstance(trial_losses, list) and step == len(trial_losses):
                    losses.append(trial.get("it_final_loss"))
            row["it_score"] = summarize(np.asarray(scores, dtype=float))
            row["train_loss"] = summarize(np.asarray(losses, dtype=float))
            rows.append(row)
    return pd.DataFrame(rows)


def dose_peaks(dose: pd.DataFrame) -> list[dict[str, Any]]:
    """Per value of a :func:`dose_summary` table: the step where ICL–IT peaks at the last
    layer (``peak_step``, with the ICL–IT, IT score and training-loss summaries there), where
    it peaks averaged over layers (``peak_step_mean``, ``icl_it_mean_at_peak``), and the last
    step (``last_step``, ``icl_it_at_last``, ``it_score_at_last``)."""
    out = []
    for value, grp in dose.groupby("value", sort=False, dropna=False):
        grp = grp.reset_index(drop=True)
        means = np.array([s["mean"] for s in grp["icl_it:last_layer"]], dtype=float)
        means_all = np.array([s["mean"] for s in grp["icl_it:mean_over_layers"]], dtype=float)
        i = int(np.nanargmax(means)) if np.isfinite(means).any() else 0
        k = int(np.nanargmax(means_all)) if np.isfinite(means_all).any() else 0
        last = len(grp) - 1
        out.append(
            {
                "value": value,
                "peak_step": int(grp["step"][i]),
                "icl_it_at_peak": grp["icl_it:last_layer"][i],
                "it_score_at_peak": grp["it_score"][i],
                "train_loss_at_peak": grp["train_loss"][i],
                "peak_step_mean": int(grp["step"][k]),
                "icl_it_mean_at_peak": grp["icl_it:mean_over_layers"][k],
                "last_step": int(grp["step"][last]),
                "icl_it_at_last": grp["icl_it:last_layer"][last],
                "it_score_at_last": grp["it_score"][last],
            }
        )
    return out
