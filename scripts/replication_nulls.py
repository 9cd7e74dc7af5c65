"""The crossed design's tables for docs/replication.md (imported by replication_tables.py):
each pair against its query-swap and demo-swap nulls, whole-cell geometry, behaviour, the IT
seed noise, the behaviour-matched dose, and the causal tests — all from a run's stored
states and outputs (iclit.analysis), last layer unless said otherwise.

Families: every table's Holm-adjusted p is over the tests that table shows (all its rows and
both nulls), adjusted by iclit.analysis.nulls.adjust_family from the raw permutation p, which
also gives the verdicts (that p and the TOST against the spec's equivalence margin). This
script declares no test, family or verdict rule of its own.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from iclit.analysis import RunData
from iclit.analysis.cells import last_layer_rows
from iclit.analysis.contrasts import PAIR_LABELS as PAIRS
from iclit.analysis.factors import design_subset
from iclit.analysis.nulls import NULLS, PAIR_NAMES, adjust_family

NULL_NAMES = {"query_swap": "query", "demo_swap": "demo", "uniform": "all items"}
"""How the geometry nulls are named in the tables."""


def table_family(df: pd.DataFrame) -> pd.DataFrame:
    """Holm p (``p_holm``) and verdicts over every row of one printed table (the package's rule)."""
    return adjust_family(df.assign(_table=0), by=("_table",)).drop(columns="_table") if len(df) else df


def cell_labels(run: RunData, factor: str | None) -> list[tuple[str, str]]:
    """(label, cell_key) per cell in plan order: the factor's value, or the task."""
    out = run.outputs
    if factor is None:
        return [(str(out["task"].iloc[0]), str(k)) for k in dict.fromkeys(out["cell_key"])]
    o = design_subset(out, factor, run.plan)
    rows = []
    for v in run.plan["factors"][factor]:
        for k in dict.fromkeys(o.loc[o[factor].astype(str) == str(v), "cell_key"]):
            rows.append((str(v), str(k)))
    return rows


def _margin_text(declared: Any) -> str:
    """The declared cosine margin in words: a number, or the ceiling rule (each row's ±m is in its verdict)."""
    raw = declared.get("raw") if isinstance(declared, dict) else declared
    if raw == "ceiling":
        fraction = declared.get("ceiling_fraction", 0.25)
        return f"±{fraction:g} × the cell's positive control's excess (the ceiling rule; each verdict states its ±m)"
    return f"±{raw}"


def _ci(r: Any, digits: int = 3) -> str:
    return f"{r['diff']:+.{digits}f} [{r['ci_low']:+.{digits}f}, {r['ci_high']:+.{digits}f}]"


def _ci_cell(r: dict[str, Any] | None) -> str:
    """A dose-table cell: the value and its 95% CI, or a dash when the pair is missing."""
    return f"{r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if r else "–"


def tests_table(run: RunData, factor: str | None, *, centrings: tuple[str, ...] = ("raw", "anchor")) -> None:
    """One row per cell × pair × centring: the last-layer cosine and its excess over each null."""
    tests = last_layer_rows(run.tests)
    if tests.empty:
        print("\n(no query-swap / demo-swap nulls: one query per set)\n")
        return
    cells = cell_labels(run, factor)
    t = table_family(tests[tests["centring"].isin(centrings) & tests["cell_key"].isin([k for _, k in cells])])
    print()
    print(
        f"| {factor or 'task'} | pair | centring | cosine | query-swap excess [95% CI] | p | p Holm | verdict "
        "| demo-swap excess [95% CI] | p | p Holm | TOST p | verdict | positive control − demo-swap (p) "
        "| the pair's excess as a fraction of it [95% CI] |"
    )
    print("|" + " --- |" * 15)
    for label, key in cells:
        for pair, name in PAIRS.items():
            for centring in centrings:
                got = {
                    r["null"]: r
                    for r in t[(t["cell_key"] == key) & (t["pair"] == pair) & (t["centring"] == centring)].to_dict(
                        "records"
                    )
                }
                if not got:
                    continue
                cells_ = [label, name, centring, f"{next(iter(got.values()))['observed']:.3f}"]
                for null in NULLS:
                    r = got.get(null)
                    if r is None:
                        cells_ += ["–"] * (5 if null == "demo_swap" else 4)
                        continue
                    cells_ += [_ci(r), f"{r['p']:.3g}", f"{r['p_holm']:.3g}"]
                    if null == "demo_swap":
                        cells_.append(f"{r['p_tost']:.3g}")
                    cells_.append(r["verdict"])
                cells_ += _control_cells(got.get("demo_swap"))
                print("| " + " | ".join(cells_) + " |")
    r0 = t.iloc[0]
    print(
        f"\nLast layer; {int(r0['n_units'])} (query, set) pairs per cell in {int(r0['n_blocks'])} query blocks; "
        f"p: permutation of the pairing within strata; p Holm over the {len(t)} tests of this table; "
        f"TOST against {_margin_text(run.margin)}. centring raw: the cosine; anchor: after subtracting the "
        "cell's mean anchor state. Positive control: the same demo-swap test on the cell's ceiling pair (IT–IT′, "
        "two IT seeds of one set, where the cell trains two; else ICL–ICL′, the set's demonstrations reordered), "
        "whose specificity to the set must exist; the fraction is the pair's demo-swap excess divided by the "
        "control's, with its 95% CI (iclit.analysis.nulls)."
    )
    # the layer curve: where is ICL–IT above its demo-swap null (max-T over layers)?
    full = run.tests
    for label, key in cells:
        d = full[(full["cell_key"] == key) & (full["pair"] == "icl_it") & (full["centring"] == "raw")]
        parts = []
        for null in NULLS:
            dn = d[d["null"] == null]
            if len(dn):
                above = [
                    int(layer)
                    for layer, p, lo in zip(dn["layer"], dn["p_adj"], dn["ci_low"], strict=True)
                    if p < 0.05 and lo > 0
                ]
                eq = [int(layer) for layer, p in zip(dn["layer"], dn["p_tost"], strict=True) if p < 0.05]
                parts.append(f"{null}: above at layers {_ranges(above)}; equivalent at {_ranges(eq)}")
        if parts:
            print(f"- {label}, ICL–IT over the {d['layer'].nunique()} states (max-T over layers): " + "; ".join(parts))


def _control_cells(r: dict[str, Any] | None) -> list[str]:
    """A demo-swap row's positive control (its ceiling pair's excess, p) and the row's fraction of it."""
    name = PAIR_NAMES.get(str(r.get("ceiling"))) if r is not None else None
    if r is None or name is None or not np.isfinite(r["ceiling_diff"]):
        return ["–", "–"]
    control = f"{name} {r['ceiling_diff']:+.3f} ({r['ceiling_p']:.2g})"
    if not np.isfinite(r["fraction"]):
        return [control, "–"]
    if not (np.isfinite(r["fraction_low"]) and np.isfinite(r["fraction_high"])):
        return [control, f"{r['fraction']:+.2f} (no finite CI: the control's own CI includes 0)"]
    return [control, f"{r['fraction']:+.2f} [{r['fraction_low']:+.2f}, {r['fraction_high']:+.2f}]"]


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    out, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}" if start == prev else f"{start}–{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(out)


def geometry_table(run: RunData, factor: str | None) -> None:
    g = last_layer_rows(run.geometry)
    if g.empty:
        return
    pairs = [p for p in PAIRS if p != "update"]
    print(
        f"\n| {factor or 'task'} | "
        + " | ".join(f"{m} {PAIRS[p]}" for m in ("debiased CKA", "RSA") for p in pairs)
        + " |"
    )
    print("|" + " --- |" * 7)
    for label, key in cell_labels(run, factor):
        sub = g[g["cell_key"] == key]
        cells = [label]
        for m in ("cka", "rsa"):
            for pair in pairs:
                r = sub[(sub["measure"] == m) & (sub["pair"] == pair)]
                ps = ", ".join(f"{NULL_NAMES.get(n, n)} {p:.2g}" for n, p in zip(r["null"], r["p"], strict=True))
                cells.append(f"{r['value'].iloc[0]:.3f} (p {ps})" if len(r) else "–")
        print("| " + " | ".join(cells) + " |")
    print(
        "\nAcross all (query, set) pairs of a cell, last layer; permutation p, one-sided, permuting only what the "
        "design makes exchangeable: query: a query block's queries within one gold label, the same permutation for "
        "all the block's sets; demo: a block's sets, the same permutation for all its queries (each arrangement once "
        "when they are fewer than 1000, else 1000 drawn; nan: none exists). Values compare only between cells of the "
        "same design (sets, queries per set)."
    )


def behaviour_table(run: RunData, factor: str | None) -> None:
    b = run.behaviour
    if b.empty:
        return
    print(
        f"\n| {factor or 'task'} | arms | agreement | − query-swap [95% CI] | − demo-swap [95% CI] | KL | "
        "− query-swap [95% CI] | − demo-swap [95% CI] |"
    )
    print("|" + " --- |" * 8)
    for label, key in cell_labels(run, factor):
        for pair in ("anchor_icl", "anchor_it", "icl_it"):
            cells = [label, PAIRS[pair]]
            for m in ("agreement", "kl"):
                got = {
                    r["null"]: r
                    for r in b[(b["cell_key"] == key) & (b["pair"] == pair) & (b["measure"] == m)].to_dict("records")
                }
                if "none" not in got:
                    cells += ["–"] * 3
                    continue
                cells.append(f"{got['none']['observed']:.3f}")
                cells += [f"{_ci(got[n])} {got[n]['verdict']}" if n in got else "–" for n in NULLS]
            print("| " + " | ".join(cells) + " |")
    print(
        "\nagreement: the share of (query, set) pairs where the two arms predict the same label; KL: the two arms' "
        "label distributions (first arm ‖ second); the differences are to the same statistic under each null."
    )


def seeds_line(run: RunData) -> None:
    s = last_layer_rows(run.cells["seeds"])
    for r in s[s["pair"] == "icl_it"].to_dict("records"):
        print(
            f"\nIT seed noise (last layer): ICL–IT {r['seed1']:.3f} with the first seed, {r['seed2']:.3f} with the "
            f"second (another init and data order); per-pair between-seed SD {r['unit_sd']:.3f} "
            f"over {r['n_units']} pairs."
        )


def dose_matched(run: RunData, factor: str) -> None:
    est = last_layer_rows(run.cells["dose"])
    if est.empty:
        return
    print("\n| learning rate | estimate | step | ICL–IT [95% CI] | anchor–IT [95% CI] |")
    print("| --- | --- | --- | --- | --- |")
    for label, key in cell_labels(run, factor):
        sub = est[est["cell_key"] == key]
        for name in ("peak_naive", "peak_crossfit", "matched"):
            e = sub[sub["estimate"] == name]
            if e.empty:
                continue
            vals = {r["pair"]: r for r in e.to_dict("records")}
            print(
                f"| {label} | {name} | {e['step'].iloc[0]:g} | {_ci_cell(vals.get('icl_it'))} "
                f"| {_ci_cell(vals.get('anchor_it'))} |"
            )
    print(
        "\npeak_naive: the step of the highest mean ICL–IT, chosen and read on all pairs (biased upwards); "
        "peak_crossfit: chosen on the query blocks of one parity, read on the other (whole blocks: the halves share "
        "no query); matched: each pair at the step whose IT "
        "label distribution is closest to ICL's in KL, chosen on the set's other queries (step: the median)."
    )
    t = last_layer_rows(run.cells["dose_tests"])
    t = t[(t["pair"] == "icl_it") & (t["centring"] == "raw")]
    if len(t):
        t = table_family(t)
        print("\n| learning rate | matched step (median) | null | ICL–IT excess [95% CI] | p Holm | TOST p | verdict |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for label, key in cell_labels(run, factor):
            for r in t[t["cell_key"] == key].to_dict("records"):
                print(
                    f"| {label} | {r['step']:g} | {r['null']} | {_ci(r)} | {r['p_holm']:.3g} | {r['p_tost']:.3g} "
                    f"| {r['verdict']} |"
                )


def causal_tables(run: RunData, figures: Path, stem: str) -> list[str]:
    """The patch and steer tables of the run's (one) cell and their figures; the figure paths."""
    from iclit.analysis.causal import patch_table, steer_table
    from iclit.report.causal import patch_figure, steer_figure

    paths = []
    patch = patch_table(run)
    if len(patch):
        layers = sorted({int(x) for x in patch["layer"].dropna()})
        print(
            "\n| patch | state index | KL to ICL [95% CI] | KL to IT [95% CI] | accuracy "
            "| frac ICL [95% CI] | frac IT [95% CI] |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for kind in ("icl_into_anchor", "it_into_anchor", "icl_into_it", "it_into_icl"):
            for layer in layers:
                sub = patch[(patch["kind"] == kind) & (patch["layer"] == layer)].set_index("measure")
                if sub.empty:
                    continue

                def f(m: str, sub: pd.DataFrame = sub) -> str:
                    if m in sub.index and np.isfinite(sub.loc[m, "value"]):
                        return f"{sub.loc[m, 'value']:.3f} [{sub.loc[m, 'ci_low']:.3f}, {sub.loc[m, 'ci_high']:.3f}]"
                    return "–"

                print(
                    f"| {kind} | {layer} | {f('kl_icl')} | {f('kl_it')} | {f('accuracy')} | {f('frac_icl')} "
                    f"| {f('frac_it')} |"
                )
        paths.append(
            _png(
                patch_figure(patch, "patching per state index (mean, 95% CI over query blocks)"),
                figures,
                f"{stem}_patch.png",
            )
        )
    steer = steer_table(run)
    if len(steer):
        print(
            "\n| vector − random | state index | scale | KL to ICL diff [95% CI] | p Holm | accuracy diff "
            "| KL to IT diff [95% CI] | p Holm |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        con = steer[steer["vector"].isin(["it-random_it", "icl-random_icl"])]
        for vec in ("it-random_it", "icl-random_icl"):
            for (layer, a), g in con[con["vector"] == vec].groupby(["layer", "scale"]):
                g = g.set_index("measure")

                def f(m: str, g: pd.DataFrame = g) -> str:
                    if m in g.index:
                        return f"{g.loc[m, 'value']:+.3f} [{g.loc[m, 'ci_low']:+.3f}, {g.loc[m, 'ci_high']:+.3f}]"
                    return "–"

                def p(m: str, g: pd.DataFrame = g) -> str:
                    return f"{g.loc[m, 'p_holm']:.3g}" if m in g.index else "–"

                print(
                    f"| {vec.replace('-', ' − ')} | {int(layer)} | {a:g} | {f('kl_icl')} | {p('kl_icl')} "
                    f"| {f('accuracy')} "
                    f"| {f('kl_it')} | {p('kl_it')} |"
                )
        runs = steer[steer["vector"].str.endswith("_run")]
        print(
            "\nUnsteered runs: "
            + "; ".join(
                f"{v.removesuffix('_run')} "
                + ", ".join(f"{m} {r['value']:.3f}" for m, r in g.set_index("measure").iterrows())
                for v, g in runs.groupby("vector", sort=False)
            )
            + "."
        )
        paths.append(
            _png(
                steer_figure(steer, "steering per state index (mean, 95% CI over query blocks)"),
                figures,
                f"{stem}_steer.png",
            )
        )
    return paths


def _png(b64: str, figures: Path, name: str) -> str:
    figures.mkdir(parents=True, exist_ok=True)
    (figures / name).write_bytes(base64.b64decode(b64))
    return f"figures/{name}"
