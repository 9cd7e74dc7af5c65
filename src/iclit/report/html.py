"""One self-contained HTML page for a run directory: figures, tables, the spec, the versions.

For each factor of the spec:

* the paper-style figure: cosine similarity of the three arm pairs (anchor–ICL, anchor–IT,
  ICL–IT) against the factor's values, mean with a 95% bootstrap CI over trials, at the last
  layer and averaged over layers;
* the per-layer curves, one panel per factor value;
* a table per factor value: trials, per-arm task accuracy (or chrF) with CIs, the
  demonstration–query similarity and the number of wrong labels when recorded;
* when the spec asks for ``baselines``: the ICL–IT cosine beside its baselines (centred
  cosines, the shuffled-pair null, the noise ceiling, the update-direction cosine, linear CKA
  across the queries of a chunk), per layer and per factor value, with the accuracy per arm;
* effect sizes: each value of the factor against its base value, paired over (seed,
  resample) — and the other factors' values in a grid — on the ICL–IT cosine (last layer and
  mean over layers): mean difference with a paired bootstrap 95% CI, Cohen's d and a
  sign-flip permutation p-value; and the value where ICL–IT similarity peaks;
* when the recipe reads IT after several steps (``capture_steps``): the dose curves, ICL–IT
  and anchor–IT cosine, IT accuracy and training loss against the optimiser step, one line
  per factor value, with the step where ICL–IT peaks.

With ``design: grid`` a factor's figure pools the other factors' values; with ``separate``
it shows the cells where the other factors keep their base values. Figures are PNGs embedded
as base64 (no external file, no network). A small script marks ``<body data-render="ok">``
once every image has decoded, which the tests read back from a headless browser.

>>> write_report("runs/smoke")          # -> runs/smoke/report.html
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from iclit.analysis import BASELINE_PAIRS, cohens_d, paired_bootstrap_diff, permutation_test, summarize
from iclit.report.plots import PAIR_STYLE

__all__ = ["write_report", "render_report", "factor_summary", "factor_effects", "dose_summary", "EFFECT_PAIRS"]

_PAIRS = tuple(PAIR_STYLE)
_EXTRA_PAIRS = tuple(p for pairs in BASELINE_PAIRS.values() for p in pairs)
_EXTRA_STYLE: dict[str, tuple[str, str, str]] = {
    # pair -> (label, colour, line style)
    "icl_it_centered": ("ICL – IT, centred", "tab:green", "--"),
    "anchor_icl_centered": ("anchor – ICL, centred", "tab:blue", "--"),
    "anchor_it_centered": ("anchor – IT, centred", "tab:orange", "--"),
    "icl_it_shuffled": ("ICL – IT, shuffled pairs (null)", "tab:gray", ":"),
    "it_it_seed": ("IT – IT, other seed (noise ceiling)", "tab:red", "-."),
    "update_cosine": ("update direction cos(ICL−anchor, IT−anchor)", "tab:purple", "-"),
    "cka_icl_it": ("linear CKA ICL vs IT across a chunk's queries", "black", "-"),
    "icl_it_qmean": ("ICL – IT, mean over the query", "tab:olive", "-"),
    "anchor_icl_qmean": ("anchor – ICL, mean over the query", "tab:cyan", "-"),
    "anchor_it_qmean": ("anchor – IT, mean over the query", "tab:brown", "-"),
}
EFFECT_PAIRS: tuple[str, ...] = ("icl_it", "icl_it_centered", "update_cosine", "icl_it_qmean")
"""The similarities whose factor effects the report tests (those present in the run)."""


def _png(fig: Figure, dpi: int = 110) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _pair_style(pair: str) -> tuple[str, str]:
    if pair in _EXTRA_STYLE:
        return _EXTRA_STYLE[pair][:2]
    return PAIR_STYLE.get(pair, (pair.replace("_", " – "), "black"))


def _per_trial(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per trial × pair: cosine at the trial's last layer and mean over layers."""
    g = frame.groupby(["trial_key", "pair"], sort=False)
    last = frame.loc[g["layer"].idxmax()].set_index(["trial_key", "pair"])["cosine"].rename("last_layer")
    mean = g["cosine"].mean().rename("mean_over_layers")
    return pd.concat([last, mean], axis=1).reset_index()


def _subset(df: pd.DataFrame, factor: str, plan: Mapping[str, Any]) -> pd.DataFrame:
    if plan.get("design") != "separate" or df.empty:
        return df
    base = plan["base"]
    keep = np.ones(len(df), dtype=bool)
    for other in plan["factors"]:
        if other != factor and other in df.columns:
            keep &= (df[other].astype(str) == str(base[other])).to_numpy()
    return df[keep]


def _values(plan: Mapping[str, Any], factor: str) -> list[Any]:
    return list(plan["factors"][factor])


def _match(series: pd.Series, value: Any) -> pd.Series:
    return series.astype(str) == str(value)


def factor_summary(frame: pd.DataFrame, outputs: pd.DataFrame, plan: Mapping[str, Any], factor: str) -> pd.DataFrame:
    """Per value of ``factor``: trials, per-pair cosine (last layer, mean over layers) and
    per-arm score, each as mean with a 95% bootstrap CI; demo similarity and wrong labels."""
    f = _subset(frame, factor, plan)
    o = _subset(outputs, factor, plan)
    trials = _per_trial(f) if not f.empty else pd.DataFrame(columns=["trial_key", "pair", "last_layer", "mean_over_layers"])
    if not f.empty:
        trials = trials.merge(f.drop_duplicates("trial_key")[["trial_key", factor]], on="trial_key")
    arms = [c[len("score_"):] for c in o.columns if c.startswith("score_") and c != "score_name"]
    rows = []
    for value in _values(plan, factor):
        row: dict[str, Any] = {factor: value}
        t = trials[_match(trials[factor], value)] if not trials.empty else trials
        ov = o[_match(o[factor], value)] if not o.empty else o
        row["trials"] = int(len(ov))
        present = set(t["pair"]) if not t.empty else set()
        for pair in _PAIRS + tuple(p for p in _EXTRA_PAIRS if p in present):
            for what in ("last_layer", "mean_over_layers"):
                s = summarize(t.loc[t["pair"] == pair, what].to_numpy() if not t.empty else [])
                row[f"{pair}:{what}"] = s
        for arm in arms:
            row[f"score:{arm}"] = summarize(pd.to_numeric(ov[f"score_{arm}"], errors="coerce").to_numpy() if len(ov) else [])
        if len(ov) and "chunk_cka_icl_it" in ov.columns:
            row.update(_chunk_cka(ov))
        if len(ov) and ov["demo_similarity"].notna().any():
            row["demo_similarity"] = summarize(pd.to_numeric(ov["demo_similarity"], errors="coerce").to_numpy())
        if len(ov) and "n_wrong" in ov:
            row["n_wrong"] = float(pd.to_numeric(ov["n_wrong"], errors="coerce").mean())
        rows.append(row)
    return pd.DataFrame(rows)


def _chunk_cka(outputs: pd.DataFrame) -> dict[str, Any]:
    """Linear CKA of the ICL vs IT states across the queries of each chunk (baseline ``cka``;
    every trial of a chunk carries it): last layer and mean over layers, summarised over chunks."""
    lasts, means, seen = [], [], set()
    for key, seed, cka in outputs[["cell_key", "seed", "chunk_cka_icl_it"]].itertuples(index=False):
        if not isinstance(cka, list) or not cka:
            continue
        ident = (key, seed, tuple(cka))
        if ident in seen:
            continue
        seen.add(ident)
        values = np.array([np.nan if v is None else v for v in cka], dtype=float)
        lasts.append(values[-1])
        means.append(np.nanmean(values) if np.isfinite(values).any() else np.nan)
    if not lasts:
        return {}
    return {"cka_icl_it:last_layer": summarize(lasts), "cka_icl_it:mean_over_layers": summarize(means)}


def _factor_figure(summary: pd.DataFrame, factor: str, title: str) -> str:
    fig = Figure(figsize=(10.0, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    values = [str(v) for v in summary[factor]]
    x = np.arange(len(values))
    for col, (what, heading) in enumerate((("last_layer", "last layer"), ("mean_over_layers", "mean over layers"))):
        ax = fig.add_subplot(1, 2, col + 1)
        for j, pair in enumerate(_PAIRS):
            label, colour = _pair_style(pair)
            stats = summary[f"{pair}:{what}"].tolist()
            mean = np.array([s["mean"] for s in stats], dtype=float)
            lo = np.array([s["ci_low"] for s in stats], dtype=float)
            hi = np.array([s["ci_high"] for s in stats], dtype=float)
            offset = (j - 1) * 0.06
            yerr = np.vstack([np.nan_to_num(mean - lo), np.nan_to_num(hi - mean)])
            ax.errorbar(x + offset, mean, yerr=yerr, color=colour, marker="o", markersize=4, capsize=3,
                        linewidth=1.6, label=label)
        ax.set_xticks(x, values)
        ax.set_xlabel(factor)
        ax.set_ylabel("cosine similarity")
        ax.set_title(f"{heading}", fontsize="medium")
        ax.grid(True, alpha=0.3)
        if col == 0:
            ax.legend(fontsize="small", frameon=False, loc="best")
    fig.suptitle(title, fontsize="medium")
    return _png(fig)


def _layer_figure(frame: pd.DataFrame, factor: str | None, values: Sequence[Any], title: str,
                  pairs: Sequence[str] = _PAIRS) -> str:
    from iclit.analysis import summarize_layers

    n = max(1, len(values))
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(3.4 * cols + 0.6, 2.9 * rows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    for ax in axes[1:]:
        ax.sharey(axes[0])
    for ax, value in zip(axes, values if values else [None]):
        sub = frame if factor is None else frame[_match(frame[factor], value)]
        if not sub.empty:
            pivot = {pair: grp.pivot_table(index="trial_key", columns="layer", values="cosine").to_numpy()
                     for pair, grp in sub.groupby("pair", sort=False)}
            summ = summarize_layers(pivot)
            for pair in pairs:
                r = summ[summ["pair"] == pair].sort_values("layer")
                if len(r):
                    label, colour = _pair_style(pair)
                    style = _EXTRA_STYLE[pair][2] if pair in _EXTRA_STYLE else "-"
                    ax.plot(r["layer"], r["mean"], color=colour, marker="o", markersize=2.5, linewidth=1.5, label=label,
                            linestyle=style)
                    ax.fill_between(r["layer"], r["ci_low"], r["ci_high"], color=colour, alpha=0.2, linewidth=0)
        ax.set_title(f"{factor} = {value}" if factor else "all trials", fontsize="small")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer (0 = embeddings)", fontsize="small")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("cosine similarity")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize="x-small", frameon=False, loc="best")
    fig.suptitle(title, fontsize="medium")
    return _png(fig)


def _ci(s: Mapping[str, float] | float | None, digits: int = 3) -> str:
    if s is None or (isinstance(s, float) and np.isnan(s)):
        return "–"
    if not isinstance(s, Mapping):
        return f"{s:.{digits}f}"
    if not s.get("n"):
        return "–"
    return f"{s['mean']:.{digits}f} <span class=ci>[{s['ci_low']:.{digits}f}, {s['ci_high']:.{digits}f}]</span>"


def _table(summary: pd.DataFrame, factor: str, score_name: str) -> str:
    arms = [c.split(":", 1)[1] for c in summary.columns if c.startswith("score:")]
    has_sim = "demo_similarity" in summary.columns
    has_wrong = "n_wrong" in summary.columns
    head = [factor, "trials"] + [f"{score_name}: {a}" for a in arms]
    head += [f"{_pair_style(p)[0]} (last layer)" for p in _PAIRS]
    if has_sim:
        head.append("demo–query similarity")
    if has_wrong:
        head.append("wrong labels (mean)")
    out = ["<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for _, row in summary.iterrows():
        cells = [html.escape(str(row[factor])), str(row["trials"])]
        cells += [_ci(row[f"score:{a}"]) for a in arms]
        cells += [_ci(row[f"{p}:last_layer"]) for p in _PAIRS]
        if has_sim:
            cells.append(_ci(row.get("demo_similarity") if isinstance(row.get("demo_similarity"), Mapping) else None))
        if has_wrong:
            cells.append(_ci(row.get("n_wrong"), 2))
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _baseline_table(summary: pd.DataFrame, factor: str, score_name: str) -> str:
    """ICL–IT beside its baselines, last layer and mean over layers, with the accuracy per arm."""
    extras = [p for p in _EXTRA_PAIRS if f"{p}:last_layer" in summary.columns]
    if "cka_icl_it:last_layer" in summary.columns:
        extras.append("cka_icl_it")
    pairs = ["icl_it", *extras]
    arms = [c.split(":", 1)[1] for c in summary.columns if c.startswith("score:")]
    head = [factor, "trials"] + [f"{score_name}: {a}" for a in arms]
    head += [f"{_pair_style(p)[0]} ({w})" for p in pairs for w in ("last layer", "mean over layers")]
    out = ["<table class=baselines><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
           + "</tr></thead><tbody>"]
    for _, row in summary.iterrows():
        cells = [html.escape(str(row[factor])), str(row["trials"])]
        cells += [_ci(row[f"score:{a}"]) for a in arms]
        for p in pairs:
            for w in ("last_layer", "mean_over_layers"):
                v = row.get(f"{p}:{w}")
                cells.append(_ci(v if isinstance(v, Mapping) else None))
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _trial_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per trial: seed, resample, factor labels, and per pair its last-layer and
    mean-over-layers cosine as columns ``<pair>:last_layer`` / ``<pair>:mean_over_layers``."""
    per = _per_trial(frame)
    wide = per.pivot(index="trial_key", columns="pair", values=["last_layer", "mean_over_layers"])
    wide.columns = [f"{pair}:{what}" for what, pair in wide.columns]
    meta_cols = [c for c in frame.columns if c not in ("layer", "pair", "cosine")]
    meta = frame.drop_duplicates("trial_key")[meta_cols].set_index("trial_key")
    return meta.join(wide).reset_index()


def _reference_value(plan: Mapping[str, Any], factor: str) -> Any:
    """The level every other value is compared with: the base value if it is among the
    factor's values, else the first value."""
    values = _values(plan, factor)
    base = plan.get("base", {}).get(factor)
    return next((v for v in values if str(v) == str(base)), values[0])


def factor_effects(frame: pd.DataFrame, plan: Mapping[str, Any], factor: str, *,
                   pairs: Sequence[str] = EFFECT_PAIRS, n_boot: int = 2000, n_perm: int = 10000,
                   seed: int = 0) -> pd.DataFrame:
    """Each value of ``factor`` against the reference (base) value, paired trial by trial.

    Trials are paired on (seed, resample) — the same query — and, in a grid design, on the
    other factors' values. For each similarity in ``pairs`` present in the run and each of
    last layer / mean over layers: mean difference (value − reference) with a paired
    bootstrap 95% CI, Cohen's d of the differences and a two-sided sign-flip permutation
    p-value. One row per (value, pair, what).
    """
    columns = ["factor", "value", "reference", "pair", "what", "n", "mean_value", "mean_reference",
               "mean_diff", "ci_low", "ci_high", "cohens_d", "p_value"]
    f = _subset(frame, factor, plan)
    if f.empty or factor not in f.columns:
        return pd.DataFrame(columns=columns)
    t = _trial_table(f)
    ref = _reference_value(plan, factor)
    others = [o for o in plan["factors"] if o != factor and o in t.columns] if plan.get("design") != "separate" else []
    keys = ["seed", "resample", *others]
    t = t.assign(**{k: t[k].astype(str) for k in others})
    base_rows = t[_match(t[factor], ref)].set_index(keys)
    rows = []
    for value in _values(plan, factor):
        if str(value) == str(ref):
            continue
        cur = t[_match(t[factor], value)].set_index(keys)
        joined = cur.merge(base_rows, left_index=True, right_index=True, how="inner", suffixes=("", "@ref"))
        for pair in pairs:
            for what in ("last_layer", "mean_over_layers"):
                col = f"{pair}:{what}"
                if col not in t.columns:
                    continue
                a = pd.to_numeric(joined[col], errors="coerce").to_numpy(dtype=float)
                b = pd.to_numeric(joined[f"{col}@ref"], errors="coerce").to_numpy(dtype=float)
                d = paired_bootstrap_diff(a, b, n_boot=n_boot, seed=seed)
                rows.append({
                    "factor": factor, "value": value, "reference": ref, "pair": pair, "what": what, "n": d["n"],
                    "mean_value": float(np.nanmean(a)) if d["n"] else float("nan"),
                    "mean_reference": float(np.nanmean(b)) if d["n"] else float("nan"),
                    "mean_diff": d["mean_diff"], "ci_low": d["ci_low"], "ci_high": d["ci_high"],
                    "cohens_d": cohens_d(a, b) if d["n"] else float("nan"),
                    "p_value": permutation_test(a, b, n_perm=n_perm, seed=seed) if d["n"] else float("nan"),
                })
    return pd.DataFrame(rows, columns=columns)


def _effects_table(effects: pd.DataFrame) -> str:
    head = ["value", "vs", "similarity", "", "pairs", "mean (value)", "mean (vs)", "difference [95% CI]",
            "Cohen's d", "permutation p"]
    out = ["<table class=effects><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
           + "</tr></thead><tbody>"]
    for r in effects.itertuples(index=False):
        diff = (f"{r.mean_diff:+.4f} <span class=ci>[{r.ci_low:+.4f}, {r.ci_high:+.4f}]</span>"
                if r.n else "–")
        cells = [html.escape(str(r.value)), html.escape(str(r.reference)), html.escape(_pair_style(r.pair)[0]),
                 r.what.replace("_", " "), str(r.n), _ci(r.mean_value, 4), _ci(r.mean_reference, 4), diff,
                 _ci(r.cohens_d, 2), _ci(r.p_value, 4)]
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _peak(summary: pd.DataFrame, factor: str) -> str:
    """Where the ICL–IT cosine (last layer, and mean over layers) is highest over the factor's values."""
    parts = []
    for what, heading in (("last_layer", "last layer"), ("mean_over_layers", "mean over layers")):
        means = [s["mean"] if isinstance(s, Mapping) and s.get("n") else np.nan for s in summary[f"icl_it:{what}"]]
        if np.all(np.isnan(means)):
            continue
        i = int(np.nanargmax(means))
        parts.append(f"{heading}: {html.escape(str(summary[factor].iloc[i]))} ({means[i]:.4f})")
    return ("<p class=note>ICL–IT similarity peaks at " + "; ".join(parts) + "</p>") if parts else ""


_STEP = re.compile(r"^(icl_it|anchor_it)_step(\d+)$")


def dose_summary(frame: pd.DataFrame, outputs: pd.DataFrame, plan: Mapping[str, Any], factor: str | None) -> pd.DataFrame:
    """The dose curves: per factor value (or one group) and captured step, the ICL–IT and
    anchor–IT cosine (last layer, mean over layers), the IT score and the training loss of
    the model read at that step (after that many updates), each summarised over trials
    (mean with a 95% bootstrap CI)."""
    dose = frame[frame["pair"].str.match(_STEP.pattern)]
    if dose.empty:
        return pd.DataFrame()
    if factor is not None:
        dose, outputs = _subset(dose, factor, plan), _subset(outputs, factor, plan)
    per = _per_trial(dose)
    parsed = per["pair"].str.extract(_STEP.pattern)
    per = per.assign(base_pair=parsed[0], step=parsed[1].astype(int))
    if factor is not None:
        per = per.merge(dose.drop_duplicates("trial_key")[["trial_key", factor]], on="trial_key")
    values = _values(plan, factor) if factor is not None else [None]
    rows = []
    for value in values:
        p = per if value is None else per[_match(per[factor], value)]
        o = outputs if value is None else outputs[_match(outputs[factor], value)]
        for step in sorted(p["step"].unique()):
            row: dict[str, Any] = {"value": value, "step": int(step)}
            for pair in ("icl_it", "anchor_it"):
                q = p[(p["step"] == step) & (p["base_pair"] == pair)]
                for what in ("last_layer", "mean_over_layers"):
                    row[f"{pair}:{what}"] = summarize(q[what].to_numpy())
            scores, losses = [], []
            for _, trial in o.iterrows():
                d, l = trial.get("dose"), trial.get("it_losses")
                if isinstance(d, Mapping) and step in d.get("steps", []):
                    scores.append(d["score"][d["steps"].index(step)])
                # losses[j] is the loss of the forward pass before update j + 1, so the model
                # read after ``step`` updates has losses[step]; after the last, the final loss
                if isinstance(l, list) and step < len(l):
                    losses.append(l[step])
                elif isinstance(l, list) and step == len(l):
                    losses.append(trial.get("it_final_loss"))
            row["it_score"] = summarize(np.asarray(scores, dtype=float))
            row["train_loss"] = summarize(np.asarray(losses, dtype=float))
            rows.append(row)
    return pd.DataFrame(rows)


def _dose_figure(dose: pd.DataFrame, factor: str | None, score_name: str) -> str:
    fig = Figure(figsize=(13.0, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    panels = [("icl_it:last_layer", "ICL – IT cosine, last layer"), ("anchor_it:last_layer", "anchor – IT cosine, last layer"),
              ("it_score", f"IT {score_name}"), ("train_loss", "training loss at the step (log)")]
    colours = ["tab:blue", "tab:green", "tab:red", "tab:purple", "tab:orange", "tab:brown"]
    for col, (key, heading) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), col + 1)
        for j, (value, grp) in enumerate(dose.groupby("value", sort=False, dropna=False)):
            stats = grp[key].tolist()
            mean = np.array([s["mean"] for s in stats], dtype=float)
            lo = np.array([s["ci_low"] for s in stats], dtype=float)
            hi = np.array([s["ci_high"] for s in stats], dtype=float)
            label = f"{factor} = {value}" if factor else "all trials"
            ax.plot(grp["step"], mean, marker="o", markersize=3, color=colours[j % len(colours)], label=label)
            ax.fill_between(grp["step"], lo, hi, color=colours[j % len(colours)], alpha=0.15, linewidth=0)
        ax.set_xscale("log", base=2)
        if key == "train_loss":
            ax.set_yscale("log")
        ax.set_xlabel("optimiser step")
        ax.set_title(heading, fontsize="small")
        ax.grid(True, alpha=0.3)
        if col == 0:
            ax.legend(fontsize="x-small", frameon=False, loc="best")
    fig.suptitle("IT dose: the tuned model read after each captured step (mean, 95% CI over trials)", fontsize="medium")
    return _png(fig)


def _dose_table(dose: pd.DataFrame, factor: str | None, score_name: str) -> str:
    """Per factor value: the step where ICL–IT peaks (last layer; mean over layers), the value
    there, and the IT score and training loss at that step and at the last step."""
    head = [factor or "", "peak step (last layer)", "ICL–IT there", f"IT {score_name} there", "loss there",
            "peak step (mean over layers)", "ICL–IT there", "last step", "ICL–IT at last step", f"IT {score_name} at last step"]
    out = ["<table class=dose><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for value, grp in dose.groupby("value", sort=False, dropna=False):
        grp = grp.reset_index(drop=True)
        means = [s["mean"] for s in grp["icl_it:last_layer"]]
        means_all = [s["mean"] for s in grp["icl_it:mean_over_layers"]]
        i, k, last = int(np.nanargmax(means)), int(np.nanargmax(means_all)), len(grp) - 1
        cells = [html.escape(str(value if factor else "all")), str(grp["step"][i]), _ci(grp["icl_it:last_layer"][i]),
                 _ci(grp["it_score"][i]), _ci(grp["train_loss"][i], 4), str(grp["step"][k]),
                 _ci(grp["icl_it:mean_over_layers"][k]), str(grp["step"][last]), _ci(grp["icl_it:last_layer"][last]),
                 _ci(grp["it_score"][last])]
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _dose_section(frame: pd.DataFrame, outputs: pd.DataFrame, plan: Mapping[str, Any], score_name: str) -> list[str]:
    factors = list(plan["factors"])
    factor = "recipe" if "recipe" in factors else (factors[0] if len(factors) == 1 else None)
    dose = dose_summary(frame, outputs, plan, factor)
    if dose.empty:
        return []
    pooled = [f for f in factors if f != factor]
    note = f"; pooled over {', '.join(pooled)}" if pooled and plan.get("design") != "separate" else ""
    return [
        "<h2 id=dose>IT dose</h2>",
        "<p class=note>one training run per trial, read after each captured optimiser step "
        f"(recipe <code>capture_steps</code>); step 0 would be the anchor{html.escape(note)}</p>",
        f"<img alt='IT dose curves' src='data:image/png;base64,{_dose_figure(dose, factor, score_name)}'>",
        _dose_table(dose, factor, score_name),
    ]


_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2rem auto; max-width: 1150px;
       color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
.meta { color: #555; font-size: .92rem; }
img { max-width: 100%; display: block; margin: .8rem 0; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: .85rem; margin: .6rem 0 1.2rem; }
th, td { border: 1px solid #ddd; padding: .3rem .55rem; text-align: right; vertical-align: top; }
th { background: #f5f5f5; } td:first-child, th:first-child { text-align: left; }
.ci { color: #777; font-size: .8em; } pre { background: #f7f7f7; padding: .8rem; overflow-x: auto; font-size: .8rem; }
.note { color: #666; font-size: .85rem; }
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0 && i.naturalHeight > 0; });
  document.body.setAttribute('data-images', ok.length + '/' + imgs.length);
  document.body.setAttribute('data-render', imgs.length > 0 && ok.length === imgs.length ? 'ok' : 'broken');
});
"""


def render_report(run_dir: str | Path) -> str:
    """The report of a run directory as one HTML string."""
    from iclit.experiments.store import open_store

    run_dir = Path(run_dir)
    with open_store(run_dir) as store:
        run = store.latest_run()
        if run is None:
            raise FileNotFoundError(f"{run_dir}: the store holds no run")
        plan = run["plan"]
        frame = store.frame(plan)
        outputs = store.outputs(plan)
    spec_yaml = run["spec_yaml"]
    try:
        import yaml

        spec = yaml.safe_load(spec_yaml) or {}
    except Exception:  # noqa: BLE001 - the report still shows the text
        spec = {}
    name = spec.get("name", run_dir.name)
    score_name = "accuracy"
    if len(outputs) and "score_name" in outputs and outputs["score_name"].dropna().eq("chrf").any():
        score_name = "chrF"
    done = int(len(outputs))
    parts: list[str] = []
    parts.append(f"<h1>iclit · {html.escape(str(name))}</h1>")
    fixed = ", ".join(f"{k} = {html.escape(str(v))}" for k, v in plan["base"].items() if k not in plan["factors"])
    parts.append(
        f"<p class=meta>{done} of {plan['n_trials']} planned trials stored · design: {html.escape(plan['design'])} · "
        f"seeds {plan['seeds']} · {plan['resamples']} resamples per cell and seed · last run started "
        f"{html.escape(str(run['started']))}, finished {html.escape(str(run['finished'] or '(not finished)'))} "
        f"on backend {html.escape(str(run['backend']))}</p>"
    )
    parts.append(f"<p class=meta>fixed: {fixed}</p>")
    if spec.get("description"):
        parts.append(f"<p>{html.escape(str(spec['description']))}</p>")
    if frame.empty:
        parts.append("<p><b>No trials stored yet.</b></p>")
    factors = list(plan["factors"])
    pooled = plan["design"] != "separate" and len(factors) > 1
    for factor in factors:
        values = _values(plan, factor)
        parts.append(f"<h2 id='factor-{html.escape(factor)}'>Factor: {html.escape(factor)}</h2>")
        others = [f for f in factors if f != factor]
        if others:
            how = ("pooled over " if pooled else "with the others at their base values: ")
            detail = ", ".join(others) if pooled else ", ".join(f"{o} = {plan['base'][o]}" for o in others)
            parts.append(f"<p class=note>{how}{html.escape(detail)}</p>")
        if frame.empty:
            continue
        summary = factor_summary(frame, outputs, plan, factor)
        sub = _subset(frame, factor, plan)
        parts.append(f"<img alt='similarity against {html.escape(factor)}' src='data:image/png;base64,"
                     f"{_factor_figure(summary, factor, f'arm-pair similarity against {factor} (mean, 95% CI over trials)')}'>")
        parts.append(f"<img alt='per-layer similarity by {html.escape(factor)}' src='data:image/png;base64,"
                     f"{_layer_figure(sub, factor, values, f'per-layer similarity by {factor}')}'>")
        parts.append(_table(summary, factor, score_name))
        extras = [p for p in _EXTRA_PAIRS if f"{p}:last_layer" in summary.columns]
        if extras or "cka_icl_it:last_layer" in summary.columns:
            parts.append(f"<h3>Baselines by {html.escape(factor)}</h3>")
            if extras:
                parts.append(f"<img alt='baselines per layer by {html.escape(factor)}' src='data:image/png;base64,"
                             f"{_layer_figure(sub, factor, values, f'ICL–IT and its baselines per layer by {factor}', ('icl_it', *extras))}'>")
            parts.append(_baseline_table(summary, factor, score_name))
        if len(values) > 1:
            effects = factor_effects(frame, plan, factor)
            parts.append(f"<h3>Effect sizes: {html.escape(factor)}</h3>")
            parts.append("<p class=note>each value against the reference value, paired over (seed, resample)"
                         + (" and the other factors' values" if pooled else "")
                         + "; paired bootstrap 95% CI of the mean difference, Cohen's d of the differences, "
                         "two-sided sign-flip permutation test</p>")
            parts.append(_effects_table(effects))
            parts.append(_peak(summary, factor))
    if not factors and not frame.empty:  # a single cell: its per-layer curves and its table
        task_name = str(frame["task"].iloc[0])
        single = dict(plan, factors={"task": [task_name]}, design="grid")
        parts.append("<h2>All trials</h2>")
        parts.append(f"<img alt='per-layer similarity' src='data:image/png;base64,"
                     f"{_layer_figure(frame, None, [], 'per-layer similarity')}'>")
        one = factor_summary(frame, outputs, single, "task")
        parts.append(_table(one, "task", score_name))
        extras = [p for p in _EXTRA_PAIRS if f"{p}:last_layer" in one.columns]
        if extras or "cka_icl_it:last_layer" in one.columns:
            parts.append("<h3>Baselines</h3>")
            if extras:
                parts.append(f"<img alt='baselines per layer' src='data:image/png;base64,"
                             f"{_layer_figure(frame, None, [], 'ICL–IT and its baselines per layer', ('icl_it', *extras))}'>")
            parts.append(_baseline_table(one, "task", score_name))
    if not frame.empty:
        parts.extend(_dose_section(frame, outputs, plan, score_name))
    parts.append("<h2>Spec</h2>")
    parts.append(f"<pre>{html.escape(spec_yaml)}</pre>")
    parts.append("<h2>Versions</h2><table><tbody>")
    for k, v in run["versions"].items():
        parts.append(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>")
    parts.append("</tbody></table>")
    title = html.escape(f"iclit report · {name}")
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{title}</title>"
            f"<meta name=viewport content='width=device-width, initial-scale=1'>"
            f"<style>{_CSS}</style></head>\n<body data-render=pending>\n{body}\n<script>{_SCRIPT}</script>\n</body></html>\n")


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of ``run_dir`` (default ``run_dir/report.html``); returns its path."""
    import os
    import tempfile

    run_dir = Path(run_dir)
    target = Path(out) if out is not None else run_dir / "report.html"
    text = render_report(run_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".report-", suffix=".html")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
    return target
