"""Print every number of docs/replication.md (Markdown) from the paper suite's run directories,
and write its figures to docs/figures/paper_*.png.

    python scripts/run_paper.py                                                  # runs/paper/<spec>/
    python scripts/replication_tables.py runs/paper > docs/replication_tables.md  # tables + figures

Every number is a mean over trials with a 95% bootstrap CI (in brackets), last layer unless
said otherwise; effects are paired over the same queries (mean difference, paired bootstrap
CI, sign-flip permutation p).
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from iclit.analysis import load_run
from iclit.analysis import paired_bootstrap_diff, permutation_test
from iclit.analysis.factors import design_subset as _subset, dose_summary, factor_effects, factor_summary
from iclit.analysis.inference import holm
from iclit.report.figures import dose_figure as _dose_figure, factor_figure as _factor_figure

import replication_nulls as nulls  # scripts/replication_nulls.py: the crossed design's tables

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"
FACTOR_SPECS = {"cross_task": "demo_task", "similarity": "similarity", "n_demos": "k", "wrong_labels": "wrong_labels",
                "models": "model", "instruction": "instruction", "lora_vs_full": "recipe"}
TASK_SPECS = ["tasks_antonyms", "tasks_translation_words", "tasks_addition", "tasks_reverse_words"]
SIMS = [("anchor_icl", "anchor–ICL"), ("anchor_it", "anchor–IT"), ("icl_it", "ICL–IT")]
BASELINES = [("icl_it_centered", "ICL–IT centred"), ("icl_it_shuffled", "shuffled null"),
             ("it_it_seed", "IT–IT other seed"), ("icl_icl_order", "ICL–ICL reordered"), ("update_cosine", "update cos"), ("icl_it_qmean", "ICL–IT query-mean")]
# (linear CKA is left out: one biased value per cell, n ≪ d; the debiased whole-cell CKA is in the nulls' tables)


def ci(s: Any, digits: int = 3) -> str:
    if not isinstance(s, Mapping) or not s.get("n"):
        return "–"
    return f"{s['mean']:.{digits}f} [{s['ci_low']:.{digits}f}, {s['ci_high']:.{digits}f}]"


def load(run: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """plan, similarity frame, per-trial outputs and per-cell CKA, computed from the run's stored states."""
    data = _RUNS[run] = _RUNS.get(run) or load_run(run)
    return data.plan, data.frame, data.outputs, data.cka


_RUNS: dict[Path, Any] = {}  # run directory → RunData, read once (its whole-cell tables are cached on it)


def save_png(b64: str, name: str) -> str:
    FIGURES.mkdir(parents=True, exist_ok=True)
    (FIGURES / name).write_bytes(base64.b64decode(b64))
    return f"figures/{name}"  # relative to docs/, where the tables go


def score_label(outputs: pd.DataFrame) -> str:
    return "chrF" if "score_name" in outputs and outputs["score_name"].eq("chrf").any() else "accuracy"


def last_layer(frame: pd.DataFrame) -> pd.DataFrame:
    """trial × pair cosines at the last layer (one column per pair)."""
    top = frame[frame["layer"] == frame.groupby("trial_key")["layer"].transform("max")]
    return top.pivot_table(index="trial_key", columns="pair", values="cosine")


def contrast(frame: pd.DataFrame, a: str, b: str) -> str:
    """Paired over trials, last layer: mean of (a − b) [bootstrap CI], sign-flip p."""
    wide = last_layer(frame)
    if a not in wide or b not in wide:
        return "–"
    d = paired_bootstrap_diff(wide[a].to_numpy(), wide[b].to_numpy())
    p = permutation_test(wide[a].to_numpy(), wide[b].to_numpy())
    return f"{d['mean_diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], p = {p:.4f}"


def contrasts(frame: pd.DataFrame, plan: dict, factor: str | None) -> None:
    """Per factor value: ICL–IT against the anchor pairs (the paper's comparison), paired over
    the same (query, set) pairs; Holm over the table's tests."""
    tests = [("icl_it", "anchor_icl", "ICL–IT − anchor–ICL"), ("icl_it", "anchor_it", "ICL–IT − anchor–IT")]
    f = frame if factor is None else _subset(frame, factor, plan)
    values = [None] if factor is None else list(plan["factors"][factor])
    rows = []
    for v in values:
        sub = f if v is None else f[f[factor].astype(str) == str(v)]
        if sub.empty:  # a cell not computed yet (a suite stopped early)
            continue
        wide = last_layer(sub)
        for a, b, _ in tests:
            d = paired_bootstrap_diff(wide[a].to_numpy(), wide[b].to_numpy())
            rows.append((v, d, permutation_test(wide[a].to_numpy(), wide[b].to_numpy())))
    adjusted = holm([p for _, _, p in rows])
    print()
    print(f"| {factor or ''} | " + " | ".join(f"{t[2]} [95% CI], p Holm" for t in tests) + " |")
    print("|" + " --- |" * (len(tests) + 1))
    for i in range(0, len(rows), len(tests)):
        v = rows[i][0]
        print(f"| {'all' if v is None else v} | " + " | ".join(
            f"{d['mean_diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], {q:.3g}"
            for (_, d, _), q in zip(rows[i:i + len(tests)], adjusted[i:i + len(tests)])) + " |")
    print("\n(paired bootstrap over (query, set) pairs, sign-flip p; pairs of one query block are not independent, "
          "so these CIs are narrower than the hierarchical ones of the null tests.)")


def cell_table(summary: pd.DataFrame, factor: str, score: str) -> None:
    arms = [c.split(":", 1)[1] for c in summary.columns if c.startswith("score:")]
    head = [factor, "n"] + [f"{score} {a}" for a in arms] + [name for _, name in SIMS] + ["ICL–IT (mean over layers)"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for _, row in summary.iterrows():
        cells = [str(row[factor]), str(row["trials"])] + [ci(row[f"score:{a}"], 2) for a in arms]
        cells += [ci(row[f"{p}:last_layer"]) for p, _ in SIMS] + [ci(row["icl_it:mean_over_layers"])]
        print("| " + " | ".join(cells) + " |")
    present = [(p, n) for p, n in BASELINES if f"{p}:last_layer" in summary.columns]
    if present:
        print()
        head = [factor] + [f"{n}" for _, n in present]
        print("| " + " | ".join(head) + " |")
        print("|" + " --- |" * len(head))
        for _, row in summary.iterrows():
            print("| " + " | ".join([str(row[factor])] + [ci(row.get(f"{p}:last_layer")) for p, _ in present]) + " |")


def effects_table(frame: pd.DataFrame, plan: dict, factor: str) -> None:
    eff = factor_effects(frame, plan, factor, pairs=("icl_it", "icl_it_centered", "update_cosine", "icl_it_qmean"))
    eff = eff[eff["what"] == "last_layer"]
    if eff.empty:
        return
    print()
    print("| value vs reference | similarity | n | difference [95% CI] | Cohen's d | permutation p |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in eff.itertuples(index=False):
        print(f"| {r.value} vs {r.reference} | {r.pair} | {r.n} | {r.mean_diff:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}] "
              f"| {r.cohens_d:+.2f} | {r.p_value:.4f} |")


def single_cell(run: Path, title: str, fig_name: str) -> None:
    plan, frame, outputs, cka = load(run)
    task = str(frame["task"].iloc[0])
    single = dict(plan, factors={"task": [task]}, design="grid")
    summary = factor_summary(frame, outputs, single, "task", cka=cka)
    print(f"### {title}\n")
    cell_table(summary, "task", score_label(outputs))
    contrasts(frame, plan, None)
    losses = pd.to_numeric(outputs["it_final_loss"], errors="coerce")
    print(f"\nIT final training loss: mean {losses.mean():.1e}, max {losses.max():.1e} over {len(losses)} trials.")
    qm = [("anchor_icl_qmean", "anchor–ICL"), ("anchor_it_qmean", "anchor–IT"), ("icl_it_qmean", "ICL–IT")]
    if all(f"{p}:last_layer" in summary.columns for p, _ in qm):
        row = summary.iloc[0]
        print("\nMean over the query's tokens instead of the last token (last layer): "
              + ", ".join(f"{n} {ci(row[f'{p}:last_layer'])}" for p, n in qm) + ".")
    data = _RUNS[run]
    print("\n#### Against the nulls\n")
    nulls.tests_table(data, None)
    nulls.seeds_line(data)
    nulls.geometry_table(data, None)
    nulls.behaviour_table(data, None)
    path = layer_panels(frame, title, fig_name)
    print(f"\n![{title}]({path})\n")
    path = nulls_figure(data, frame, title, fig_name.replace("_layers.png", "_nulls.png"))
    print(f"\n![{title}: each pair with its query-swap and demo-swap nulls]({path})\n")


def nulls_figure(data: Any, frame: pd.DataFrame, title: str, fig_name: str) -> str:
    """Per layer: the three raw pairs (mean, 95% CI) with each one's query-swap and demo-swap
    null as a band (the figure of `iclit run`'s layers.png, for one cell)."""
    from iclit.analysis import summarize_layers
    from iclit.report import plot_layers

    per_pair = {pair: frame[frame["pair"] == pair].pivot_table(index="trial_key", columns="layer", values="cosine")
                .to_numpy() for pair, _ in SIMS}
    tests = data.tests
    FIGURES.mkdir(parents=True, exist_ok=True)
    plot_layers(summarize_layers(per_pair), FIGURES / fig_name, title=f"{title}: pairs and their nulls",
                nulls=tests[tests["centring"] == "raw"], dpi=110)
    return f"figures/{fig_name}"


def layer_panels(frame: pd.DataFrame, title: str, fig_name: str) -> str:
    """Per layer, mean and 95% CI over trials: the raw pairs with the null and the noise
    ceiling (left); the centred pairs, the update cosine and the query-mean pairs (right)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from iclit.analysis import summarize_layers
    from iclit.report.figures import pair_style

    present = set(frame["pair"])
    panels = [("raw cosine, last prompt token", ("anchor_icl", "anchor_it", "icl_it", "icl_it_shuffled", "it_it_seed", "icl_icl_order")),
              ("baselines", ("anchor_icl_centered", "anchor_it_centered", "icl_it_centered", "update_cosine",
                             "icl_it_qmean"))]
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    for i, (heading, pairs) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for pair in (p for p in pairs if p in present):
            sub = frame[frame["pair"] == pair].pivot_table(index="trial_key", columns="layer", values="cosine")
            summ = summarize_layers({pair: sub.to_numpy()})
            label, colour, _ = pair_style(pair)
            style = "--" if pair.endswith("_centered") else (":" if pair in ("icl_it_shuffled", "icl_it_qmean") else "-")
            ax.plot(summ["layer"], summ["mean"], color=colour, linestyle=style, marker="o", markersize=2.5, label=label)
            ax.fill_between(summ["layer"], summ["ci_low"], summ["ci_high"], color=colour, alpha=0.15, linewidth=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer (0 = embeddings; last = after the final norm)")
        ax.set_ylabel("cosine similarity")
        ax.set_title(heading, fontsize="medium")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", frameon=False, loc="lower left")
    fig.suptitle(f"{title}: per layer, mean and 95% CI over trials", fontsize="medium")
    FIGURES.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURES / fig_name, dpi=110)
    return f"figures/{fig_name}"


def layers(run: Path) -> None:
    plan, frame, _, _ = load(run)
    f = frame[frame["pair"].isin(["anchor_icl", "anchor_it", "icl_it", "icl_it_centered", "update_cosine", "it_it_seed"])]
    wide = f.groupby(["layer", "pair"])["cosine"].mean().unstack("pair")
    print(f"### Layer by layer (main cell, mean over {frame['trial_key'].nunique()} (query, set) pairs)\n")
    print("| layer | " + " | ".join(wide.columns) + " |")
    print("|" + " --- |" * (len(wide.columns) + 1))
    for layer, row in wide.iterrows():
        print(f"| {layer} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    print()


def label_share(run: Path, outputs: pd.DataFrame, plan: dict, factor: str) -> None:
    """Classification: the mean share of demonstrations (as shown, wrong labels included)
    whose label is the query's gold label, per factor value."""
    import sqlite3

    if score_label(outputs) != "accuracy":
        return
    con = sqlite3.connect(f"file:{run / 'results.sqlite'}?mode=ro", uri=True)
    try:
        shares = {}
        for key, text in con.execute("SELECT trial_key, outputs_json FROM trials"):
            o = json.loads(text)
            demos = o.get("demonstration_outputs") or []
            if demos:
                shares[key] = sum(d == o["gold"] for d in demos) / len(demos)
    finally:
        con.close()
    o = _subset(outputs, factor, plan)
    parts = []
    for v in plan["factors"][factor]:
        keys = o[o[factor].astype(str) == str(v)]["trial_key"]
        vals = [shares[k] for k in keys if k in shares]
        if vals:
            parts.append(f"{v}: {np.mean(vals):.2f}")
    if parts:
        print("\nShare of demonstrations labelled like the query (gold): " + ", ".join(parts) + ".")


def factor_spec(run: Path, name: str, factor: str) -> None:
    plan, frame, outputs, cka = load(run)
    summary = factor_summary(frame, outputs, plan, factor, cka=cka)
    print(f"### {name} (factor `{factor}`)\n")
    cell_table(summary, factor, score_label(outputs))
    label_share(run, outputs, plan, factor)
    contrasts(frame, plan, factor)
    effects_table(frame, plan, factor)
    data = _RUNS[run]
    print("\n#### Against the nulls\n")
    nulls.tests_table(data, factor)
    nulls.geometry_table(data, factor)
    nulls.behaviour_table(data, factor)
    path = save_png(_factor_figure(summary, factor, f"{name}: similarity against {factor} (mean, 95% CI)"),
                    f"paper_{name}.png")
    print(f"\n![{name}]({path})\n")


def dose(run: Path) -> None:
    plan, frame, outputs, _ = load(run)
    d = dose_summary(frame, outputs, plan, "recipe")
    score = score_label(outputs)
    print("### dose (factor `recipe`: learning rate; IT read after each step of one run)\n")
    values = list(dict.fromkeys(d["value"]))
    print("| step | " + " | ".join(f"ICL–IT {v}" for v in values) + " | " + " | ".join(f"IT {score} {v}" for v in values)
          + " | " + " | ".join(f"loss {v}" for v in values) + " |")
    print("|" + " --- |" * (1 + 3 * len(values)))
    for step in sorted(d["step"].unique()):
        rows = [d[(d["step"] == step) & (d["value"] == v)].iloc[0] for v in values]
        print(f"| {step} | " + " | ".join(ci(r["icl_it:last_layer"]) for r in rows) + " | "
              + " | ".join(ci(r["it_score"], 2) for r in rows) + " | "
              + " | ".join(f"{r['train_loss']['mean']:.1e}" for r in rows) + " |")
    print()
    # does tuning move the query's state towards the ICL state? ICL–IT after step S against
    # anchor–ICL (step 0: IT = anchor), paired per trial; and how far IT is from the anchor
    wide = last_layer(frame).join(
        frame.drop_duplicates("trial_key").set_index("trial_key")["recipe"].astype(str).rename("recipe_label"))
    print("| step | " + " | ".join(f"anchor–IT {v}" for v in values) + " | "
          + " | ".join(f"ICL–IT − anchor–ICL {v}" for v in values) + " |")
    print("|" + " --- |" * (1 + 2 * len(values)))
    for step in sorted(d["step"].unique()):
        rows = [d[(d["step"] == step) & (d["value"] == v)].iloc[0] for v in values]
        diffs = []
        for v in values:
            w = wide[wide["recipe_label"] == str(v)]
            a, b = w[f"icl_it_step{step}"].to_numpy(), w["anchor_icl"].to_numpy()
            r = paired_bootstrap_diff(a, b)
            diffs.append(f"{r['mean_diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]")
        print(f"| {step} | " + " | ".join(ci(r["anchor_it:last_layer"]) for r in rows) + " | " + " | ".join(diffs) + " |")
    print()
    for v in values:
        g = d[d["value"] == v].reset_index(drop=True)
        means = [s["mean"] for s in g["icl_it:last_layer"]]
        means_all = [s["mean"] for s in g["icl_it:mean_over_layers"]]
        i, k = int(np.nanargmax(means)), int(np.nanargmax(means_all))
        print(f"- {v}: ICL–IT peaks at step {g['step'][i]} (last layer, {ci(g['icl_it:last_layer'][i])}) "
              f"and step {g['step'][k]} (mean over layers, {ci(g['icl_it:mean_over_layers'][k])})")
    print("\n#### Selection-aware and behaviour-matched steps\n")
    nulls.dose_matched(_RUNS[run], "recipe")
    path = save_png(_dose_figure(d, "recipe", score), "paper_dose.png")
    print(f"\n![dose]({path})\n")


def section(root: Path, name: str) -> str:
    """The Markdown of one spec's section (its figures written to docs/figures), as text."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        if name == "main":
            single_cell(root / "main", "main", "paper_main_layers.png")
            layers(root / "main")
        elif name in FACTOR_SPECS:
            factor_spec(root / name, name, FACTOR_SPECS[name])
        elif name == "dose":
            dose(root / "dose")
        elif name == "translation":
            single_cell(root / "translation", "translation", "paper_translation_layers.png")
        elif name == "causal":
            single_cell(root / "causal", "causal (the main cell's arms)", "paper_causal_layers.png")
            print("#### Patching and steering\n")
            for path in nulls.causal_tables(_RUNS[root / "causal"], FIGURES, "paper_causal"):
                print(f"\n![{Path(path).stem}]({path})\n")
        else:
            single_cell(root / name, name, f"paper_{name}_layers.png")
    return buf.getvalue()


SECTIONS = ["main", *FACTOR_SPECS, "dose", "translation", "causal", *TASK_SPECS]  # the order of the page


def main(root: Path) -> None:
    import os
    from concurrent.futures import ProcessPoolExecutor

    suite = json.loads((root / "suite.json").read_text()) if (root / "suite.json").exists() else {}
    invocations = suite.get("invocations") or list((suite.get("last_invocation_by_suite") or (
        {"paper": suite["last_invocation"]} if suite.get("last_invocation") else {})).values())
    for inv in invocations:
        print(f"`run_paper.py{' --suite ' + inv['suite'] if inv.get('suite', 'paper') != 'paper' else ''}`: "
              f"{len(inv['specs'])} specs ({', '.join(inv['specs'])}) in {inv['seconds'] / 60:.1f} min "
              f"({inv['machine']}, finished {inv['finished']}).\n")
    if suite.get("specs"):
        print("| spec | trials planned | computed | reused | seconds |\n| --- | --- | --- | --- | --- |")
        for name, s in suite["specs"].items():
            print(f"| {name} | {s['planned']} | {s['computed']} | {s['reused']} | {s['seconds']:.0f} |")
        print()
    present = [n for n in SECTIONS if (root / n).exists()]
    # one process per spec (the whole-cell permutation tests are most of the time), printed in page order
    with ProcessPoolExecutor(max_workers=max(1, min(len(present), os.cpu_count() or 1))) as pool:
        for text in pool.map(section, [root] * len(present), present):
            print(text, end="", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/paper"))
