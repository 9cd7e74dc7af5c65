"""Print every number of docs/replication.md (Markdown) from the paper suite's run directories,
and write its figures to docs/figures/paper_*.png.

    python scripts/run_paper.py                                                  # runs/paper/<spec>/
    python scripts/replication_tables.py runs/paper > docs/replication_tables.md  # tables + figures
    python scripts/replication_tables.py runs/paper --timing                      # the suite's time only

Every number is a mean over trials with a 95% bootstrap CI (in brackets), last layer unless
said otherwise. Contrasts (between the pairs of a cell, between the values of a factor) and
their verdicts are the package's (iclit.analysis.contrasts): query blocks as units, a paired
t test on block differences (Welch on block means where the cells read other queries), the
CI from the same t, Holm over each printed table, TOST against the spec's margin.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import replication_nulls as nulls  # scripts/replication_nulls.py: the crossed design's tables

from iclit.analysis import load_run
from iclit.analysis.contrasts import ANCHOR_COMPARISONS, PAIR_LABELS, cell_contrasts, within_cell_contrasts
from iclit.analysis.factors import design_subset as _subset
from iclit.analysis.factors import dose_summary, factor_summary
from iclit.report.claims import claim_rows, claims_markdown, with_claims
from iclit.report.figures import dose_figure as _dose_figure
from iclit.report.figures import factor_figure as _factor_figure

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"
FACTOR_SPECS = {
    "label_control": "model",
    "cross_task": "demo_task",
    "similarity": "similarity",
    "n_demos": "k",
    "wrong_labels": "wrong_labels",
    "models": "model",
    "instruction": "instruction",
    "lora_vs_full": "recipe",
    "ladder": "model",
}
TASK_SPECS = ["tasks_antonyms", "tasks_translation_words", "tasks_addition", "tasks_reverse_words"]
SIMS = [("anchor_icl", "anchor–ICL"), ("anchor_it", "anchor–IT"), ("icl_it", "ICL–IT")]
BASELINES = [
    ("icl_it_centered", "ICL–IT centred"),
    ("icl_it_shuffled", "shuffled null"),
    ("it_it_seed", "IT–IT other seed"),
    ("icl_icl_order", "ICL–ICL reordered"),
    ("update_cosine", "update cos"),
    ("icl_it_qmean", "ICL–IT query-mean"),
]
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


def _diff(r: Any) -> str:
    return f"{r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"


def contrasts(run: Path, factor: str | None) -> None:
    """Per factor value (cell): ICL–IT against the anchor pairs over the cell's query blocks
    (:func:`iclit.analysis.contrasts.within_cell_contrasts`; Holm over the table)."""
    data = _RUNS[run]
    cells = nulls.cell_labels(data, factor)
    table = within_cell_contrasts(data, ANCHOR_COMPARISONS, cells=[k for _, k in cells])
    if table.empty:
        return
    names = [f"{PAIR_LABELS[a[0]]} − {PAIR_LABELS[b[0]]}" for a, b in ANCHOR_COMPARISONS]
    print()
    print(f"| {factor or 'task'} | " + " | ".join(f"{n} [95% CI], p Holm, verdict" for n in names) + " |")
    print("|" + " --- |" * (len(names) + 1))
    for label, key in cells:
        sub = table[table["cell_key"] == key]
        got = [sub[(sub["pair_b"] == b[0]) & (sub["quantity_b"] == b[1])] for _, b in ANCHOR_COMPARISONS]
        print(
            f"| {label} | "
            + " | ".join(
                f"{_diff(g.iloc[0])}, {g['p_holm'].iloc[0]:.3g}, {g['verdict'].iloc[0]}" if len(g) else "–" for g in got
            )
            + " |"
        )
    r0 = table.iloc[0]
    print(
        f"\n(last layer; per cell, the mean of each cosine over each query block's (query, set) pairs, a paired t "
        f"test over the {int(r0['n_blocks_a'])} blocks; Holm over the {len(table)} tests of this table.)"
    )


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


def effects_table(run: Path, factor: str) -> None:
    """Each value of the factor against the reference value, query blocks as units
    (:func:`iclit.analysis.contrasts.cell_contrasts`; Holm over the table)."""
    eff = cell_contrasts(_RUNS[run], factors=[factor])
    if eff.empty:
        return
    print()
    print(
        "| value vs reference | pair | quantity | blocks | mean | difference [95% CI] | p | p Holm | TOST p | verdict |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in eff.to_dict("records"):
        test = "paired" if r["paired"] else "Welch"
        print(
            f"| {r['level_a']} vs {r['level_b']} | {PAIR_LABELS[r['pair']]} | {r['quantity'].replace('_', '-')} "
            f"| {r['n_blocks_a']} / {r['n_blocks_b']} ({test}) | {r['mean_a']:.3f} vs {r['mean_b']:.3f} | {_diff(r)} "
            f"| {r['p']:.3g} | {r['p_holm']:.3g} | {r['p_tost']:.3g} | {r['verdict']} |"
        )
    print(
        f"\n(last layer; quantity cosine: the pair's cosine, demo-swap: its excess over the demo-swap null; one value "
        f"per (seed, query block), the mean over its (query, set) pairs; t tests over blocks; Holm over the {len(eff)} "
        f'tests of this table; {_tost_text(eff["margin"].iloc[0])}; "above null": the value above the '
        "reference.)"
    )


def _tost_text(margin: float) -> str:
    return (
        f"TOST against ±{margin:g}" if margin == margin else "no TOST (no margin declared for between-cell contrasts)"
    )


def single_cell(run: Path, title: str, fig_name: str) -> None:
    plan, frame, outputs, cka = load(run)
    task = str(frame["task"].iloc[0])
    single = dict(plan, factors={"task": [task]}, design="grid")
    summary = factor_summary(frame, outputs, single, "task", cka=cka)
    print(f"### {title}\n")
    cell_table(summary, "task", score_label(outputs))
    contrasts(run, None)
    losses = pd.to_numeric(outputs["it_final_loss"], errors="coerce")
    print(f"\nIT final training loss: mean {losses.mean():.1e}, max {losses.max():.1e} over {len(losses)} trials.")
    qm = [("anchor_icl_qmean", "anchor–ICL"), ("anchor_it_qmean", "anchor–IT"), ("icl_it_qmean", "ICL–IT")]
    if all(f"{p}:last_layer" in summary.columns for p, _ in qm):
        row = summary.iloc[0]
        print(
            "\nMean over the query's tokens instead of the last token (last layer): "
            + ", ".join(f"{n} {ci(row[f'{p}:last_layer'])}" for p, n in qm)
            + "."
        )
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

    per_pair = {
        pair: frame[frame["pair"] == pair].pivot_table(index="trial_key", columns="layer", values="cosine").to_numpy()
        for pair, _ in SIMS
    }
    tests = data.tests
    FIGURES.mkdir(parents=True, exist_ok=True)
    plot_layers(
        summarize_layers(per_pair),
        FIGURES / fig_name,
        title=f"{title}: pairs and their nulls",
        nulls=tests[tests["centring"] == "raw"],
        dpi=110,
    )
    return f"figures/{fig_name}"


def layer_panels(frame: pd.DataFrame, title: str, fig_name: str) -> str:
    """Per layer, mean and 95% CI over trials: the raw pairs with the null and the noise
    ceiling (left); the centred pairs, the update cosine and the query-mean pairs (right)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from iclit.analysis import summarize_layers
    from iclit.report.figures import pair_style

    present = set(frame["pair"])
    panels = [
        (
            "raw cosine, last prompt token",
            ("anchor_icl", "anchor_it", "icl_it", "icl_it_shuffled", "it_it_seed", "icl_icl_order"),
        ),
        (
            "baselines",
            ("anchor_icl_centered", "anchor_it_centered", "icl_it_centered", "update_cosine", "icl_it_qmean"),
        ),
    ]
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    for i, (heading, pairs) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for pair in (p for p in pairs if p in present):
            sub = frame[frame["pair"] == pair].pivot_table(index="trial_key", columns="layer", values="cosine")
            summ = summarize_layers({pair: sub.to_numpy()})
            label, colour, _ = pair_style(pair)
            style = (
                "--" if pair.endswith("_centered") else (":" if pair in ("icl_it_shuffled", "icl_it_qmean") else "-")
            )
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
    if "model" in frame.columns:  # the main cell of the first model (the main spec runs one per model)
        frame = frame[frame["model"].astype(str) == str(frame["model"].iloc[0])]
    f = frame[
        frame["pair"].isin(["anchor_icl", "anchor_it", "icl_it", "icl_it_centered", "update_cosine", "it_it_seed"])
    ]
    wide = f.groupby(["layer", "pair"])["cosine"].mean().unstack("pair")
    model = f" of {frame['model'].iloc[0]}" if "model" in frame.columns else ""
    print(f"### Layer by layer (main cell{model}, mean over {frame['trial_key'].nunique()} (query, set) pairs)\n")
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
    contrasts(run, factor)
    effects_table(run, factor)
    data = _RUNS[run]
    print("\n#### Against the nulls\n")
    nulls.tests_table(data, factor)
    nulls.geometry_table(data, factor)
    nulls.behaviour_table(data, factor)
    path = save_png(
        _factor_figure(summary, factor, f"{name}: similarity against {factor} (mean, 95% CI)"), f"paper_{name}.png"
    )
    print(f"\n![{name}]({path})\n")


def dose(run: Path) -> None:
    plan, frame, outputs, _ = load(run)
    d = dose_summary(frame, outputs, plan, "recipe")
    score = score_label(outputs)
    print("### dose (factor `recipe`: learning rate; IT read after each step of one run)\n")
    values = list(dict.fromkeys(d["value"]))
    print(
        "| step | "
        + " | ".join(f"ICL–IT {v}" for v in values)
        + " | "
        + " | ".join(f"IT {score} {v}" for v in values)
        + " | "
        + " | ".join(f"loss {v}" for v in values)
        + " |"
    )
    print("|" + " --- |" * (1 + 3 * len(values)))
    for step in sorted(d["step"].unique()):
        rows = [d[(d["step"] == step) & (d["value"] == v)].iloc[0] for v in values]
        print(
            f"| {step} | "
            + " | ".join(ci(r["icl_it:last_layer"]) for r in rows)
            + " | "
            + " | ".join(ci(r["it_score"], 2) for r in rows)
            + " | "
            + " | ".join(f"{r['train_loss']['mean']:.1e}" for r in rows)
            + " |"
        )
    print()
    # does tuning move the query's state towards the ICL state? ICL–IT after step S against
    # anchor–ICL (step 0: IT = anchor), over each cell's query blocks; and how far IT is from the anchor
    data = _RUNS[run]
    cells = nulls.cell_labels(data, "recipe")
    steps = sorted(d["step"].unique())
    found = pd.concat(
        [
            within_cell_contrasts(
                data, [(("icl_it", "cosine"), ("anchor_icl", "cosine"))], it_state=f"it:step{step}"
            ).assign(step=step)
            for step in steps
        ],
        ignore_index=True,
    )
    print(
        "| step | "
        + " | ".join(f"anchor–IT {v}" for v in values)
        + " | "
        + " | ".join(f"ICL–IT − anchor–ICL {v}" for v in values)
        + " |"
    )
    print("|" + " --- |" * (1 + 2 * len(values)))
    for step in steps:
        rows = [d[(d["step"] == step) & (d["value"] == v)].iloc[0] for v in values]
        diffs = []
        for v in values:
            keys = [k for label, k in cells if label == str(v)]
            r = found[(found["step"] == step) & found["cell_key"].isin(keys)] if len(found) else found
            diffs.append(_diff(r.iloc[0]) if len(r) else "–")
        print(
            f"| {step} | " + " | ".join(ci(r["anchor_it:last_layer"]) for r in rows) + " | " + " | ".join(diffs) + " |"
        )
    print(
        "\n(ICL–IT − anchor–ICL: the mean over query blocks of the blocks' mean difference, 95% CI from the paired "
        "t over blocks.)"
    )
    print()
    for v in values:
        g = d[d["value"] == v].reset_index(drop=True)
        means = [s["mean"] for s in g["icl_it:last_layer"]]
        means_all = [s["mean"] for s in g["icl_it:mean_over_layers"]]
        i, k = int(np.nanargmax(means)), int(np.nanargmax(means_all))
        print(
            f"- {v}: ICL–IT peaks at step {g['step'][i]} (last layer, {ci(g['icl_it:last_layer'][i])}) "
            f"and step {g['step'][k]} (mean over layers, {ci(g['icl_it:mean_over_layers'][k])})"
        )
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
            factor_spec(root / "main", "main", "model")
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


def suite_timing(suite: Mapping[str, Any]) -> str:
    """The suite's time from its ``suite.json`` (scripts/run_paper.py): a line per invocation
    (its specs, minutes and matmul GFLOP/s before and after), then a row per spec (trials
    planned, computed and reused; seconds with the report, the report's, the matmul GFLOP/s
    before the spec) and the total. Fields an older ``suite.json`` lacks print as "–"."""

    def num(v: Any) -> str:
        return "–" if v is None else f"{v:,.0f}"

    invocations = suite.get("invocations") or list(
        (
            suite.get("last_invocation_by_suite")
            or ({"paper": suite["last_invocation"]} if suite.get("last_invocation") else {})
        ).values()
    )
    lines = []
    for inv in invocations:
        rates = inv.get("matmul_gflops")
        lines.append(
            f"`run_paper.py{' --suite ' + inv['suite'] if inv.get('suite', 'paper') != 'paper' else ''}`: "
            f"{len(inv['specs'])} specs ({', '.join(inv['specs'])}) in {inv['seconds'] / 60:.1f} min "
            f"({inv['machine']}"
            + (f"; {inv['backend']}" if inv.get("backend") else "")
            + (f"; matmul {rates[0]} GFLOP/s before, {rates[-1]} after" if rates else "")
            + f"; finished {inv['finished']}).\n"
        )
    specs = suite.get("specs") or {}
    if specs:
        lines.append(
            "| spec | trials planned | computed | reused | seconds | of which the report | matmul before it |\n"
            "| --- | --- | --- | --- | --- | --- | --- |"
        )
        for name, s in specs.items():
            lines.append(
                f"| {name} | {s['planned']} | {s['computed']} | {s['reused']} | {num(s['seconds'])} | "
                f"{num(s.get('report_seconds'))} | {num(s.get('matmul_gflops_before'))} |"
            )
        total = sum(s["seconds"] for s in specs.values())
        reports = [s.get("report_seconds") for s in specs.values()]
        rates = [s["matmul_gflops_before"] for s in specs.values() if s.get("matmul_gflops_before") is not None]
        report_total = num(sum(reports)) if None not in reports else "–"
        rate_range = f"{min(rates)}–{max(rates)}" if rates else "–"
        lines.append(
            f"| **all {len(specs)}** | | | | **{total:,.0f} ({total / 60:.1f} min)** | "
            f"{report_total} | {rate_range} |\n"
        )
    return "\n".join(lines)


def main(root: Path, page: Path | None = None, timing_only: bool = False) -> None:
    import os
    from concurrent.futures import ProcessPoolExecutor

    suite = json.loads((root / "suite.json").read_text()) if (root / "suite.json").exists() else {}
    print(suite_timing(suite))
    if timing_only:
        return
    present = [n for n in SECTIONS if (root / n / "results.sqlite").exists()]
    # one process per spec (the whole-cell permutation tests are most of the time); the claims table
    # after them (torch's thread pool must not be started in this process before it forks), printed first
    with ProcessPoolExecutor(max_workers=max(1, min(len(present), os.cpu_count() or 1))) as pool:
        texts = list(pool.map(section, [root] * len(present), present))
    claims = claims_markdown(claim_rows(root))
    print("## The paper's claims\n")
    print(claims)
    if page is not None:  # the page's summary table, the same text
        page.write_text(with_claims(page.read_text(encoding="utf-8"), claims), encoding="utf-8")
    for text in texts:
        print(text, end="", flush=True)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, nargs="?", default=Path("runs/paper"), help="the suite's folder")
    ap.add_argument("--page", type=Path, help="also write the claims table into this page's claims block")
    ap.add_argument("--timing", action="store_true", help="print only the suite's time (suite.json), no tables")
    args = ap.parse_args()
    main(args.root, args.page, timing_only=args.timing)
