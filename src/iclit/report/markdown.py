"""The results of a one-cell comparison as Markdown tables (``iclit report RUN --markdown``):
the tables README and docs quote, from the run's exports (``metrics.json``, ``config.json``,
``summary.csv``), so every number there is one this function prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from iclit.analysis.nulls import PAIR_NAMES
from iclit.report.nulls import pair_text
from iclit.report.numbers import interval, num, pvalue

__all__ = ["comparison_markdown"]

_NAMES = {
    pair: "update (ICL−anchor, IT−anchor)" if pair == "update" else pair_text(pair, "positive control")
    for pair in PAIR_NAMES
}


_3, _S = "{:.3f}", "{:+.3f}"


def _ci(r: dict[str, Any], lo: str = "ci_low", hi: str = "ci_high") -> str:
    return interval(r["diff"], r[lo], r[hi], _S)


def _tests(m: dict[str, Any]) -> list[str]:
    out = [
        "| pair | cosine | query-swap excess [95% CI] | p Holm (floor) | verdict | demo-swap excess [95% CI] "
        "| p Holm (floor) | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for pair, label in _NAMES.items():
        got = {r["null"]: r for r in m["tests"] if r["pair"] == pair}
        if not got:
            continue
        cells = [label, f"{next(iter(got.values()))['observed']:.3f}"]
        for null in ("query_swap", "demo_swap"):
            r = got.get(null)
            cells += (
                [_ci(r), f"{pvalue(r['p_holm'])} ({pvalue(r.get('p_min'))})", r["verdict"]] if r else ["–", "–", "–"]
            )
        out.append("| " + " | ".join(cells) + " |")
    first = m["tests"][0]
    out.append(
        f"\n{first['n_units']} (query, set) pairs in {first['n_blocks']} query blocks; 95% t intervals over "
        "blocks; Holm over the last layer's tests of the cell (the positive controls are a family of their "
        "own); floor: the smallest p the design allows.\n"
    )
    for r in m["tests"]:
        if r.get("role", "test") == "test" and r.get("ceiling") and r["null"] == "demo_swap":
            frac = interval(r["fraction"], r["fraction_low"], r["fraction_high"], "{:+.2f}")
            margin = f"±{num(r['margin'], '{:.3g}')}" if num(r.get("margin")) != "–" else "none (no positive ceiling)"
            out.append(
                f"- {_NAMES[r['pair']]}, demo-swap: {frac} of the positive control's excess "
                f"({num(r['ceiling_diff'], _S)}); equivalence margin {margin} (TOST 90% CI "
                f"[{num(r['tost_low'], _S)}, {num(r['tost_high'], _S)}])."
            )
    return out + [""]


def comparison_markdown(run: str | Path) -> str:
    """The README's results tables of an ``iclit compare`` run directory, as Markdown."""
    run = Path(run)
    m = json.loads((run / "metrics.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    s = pd.read_csv(run / "summary.csv")
    lines = [
        f"`{' '.join(cfg['argv'][1:]) or 'compare'}` — {cfg['model']}, {cfg['task']}, k={cfg['k']}, "
        f"{cfg['resamples']} sets × {cfg.get('queries_per_set', 1)} queries, seed {cfg['seed']}, {cfg['device']} "
        f"{cfg['dtype']}, {cfg['seconds']:.0f} s\n",
        "| pair | last layer: mean ± std [95% CI] | mean over layers [95% CI] |",
        "| --- | --- | --- |",
    ]
    for pair in ("anchor_icl", "anchor_it", "icl_it"):
        a, b = m["last_layer"][pair], m["mean_over_layers"][pair]
        lines.append(
            f"| {pair.replace('_', '–')} | {num(a['mean'], _3)} ± {num(a['std'], _3)} [{num(a['ci_low'], _3)}, "
            f"{num(a['ci_high'], _3)}] | {num(b['mean'], _3)} [{num(b['ci_low'], _3)}, {num(b['ci_high'], _3)}] |"
        )
    score = "accuracy" if "accuracy" in m else ("exact_match" if "exact_match" in m else "chrf")
    lines += ["", f"| arm | {score} [95% CI] |", "| --- | --- |"]
    lines += [
        f"| {arm} | {num(v['mean'], _3)} [{num(v['ci_low'], _3)}, {num(v['ci_high'], _3)}] |"
        for arm, v in m[score].items()
    ]
    loss = m["it_final_loss"]
    lines.append(
        f"\nPrediction agreement: ICL–IT {m['icl_it_agreement']:.3f}, anchor–ICL {m['anchor_icl_agreement']:.3f}, "
        f"anchor–IT {m['anchor_it_agreement']:.3f}. IT final training loss: mean {loss['mean']:.1e}, max "
        f"{loss['max']:.1e}.\n"
    )
    if m.get("tests"):
        lines += _tests(m)
    for r in m.get("seeds", []):
        if r["pair"] == "icl_it":
            lines.append(
                f"IT seed noise at the last layer: ICL–IT {r['seed1']:.3f} with the first seed, "
                f"{r['seed2']:.3f} with the second; per-pair between-seed SD {r['unit_sd']:.3f}.\n"
            )
    if m.get("geometry"):
        lines += [
            "| pair | debiased CKA (p query-swap; p demo-swap) | RSA (p query-swap; p demo-swap) |",
            "| --- | --- | --- |",
        ]
        for pair in ("anchor_icl", "anchor_it", "icl_it"):
            g = {(r["measure"], r.get("null", "query_swap")): r for r in m["geometry"] if r["pair"] == pair}
            cells = []
            for k in ("cka", "rsa"):
                q, d = g.get((k, "query_swap")), g.get((k, "demo_swap"))
                cells.append(f"{num(q['value'], _3)} ({pvalue(q['p'])}; {pvalue(d['p']) if d else '–'})" if q else "–")
            lines.append(f"| {_NAMES[pair]} | " + " | ".join(cells) + " |")
        lines.append(
            f"\nacross all {m['geometry'][0]['n']} trials of the cell at the last layer; permutation p "
            "(one-sided), permuting only what the design makes exchangeable.\n"
        )
    if m.get("behaviour"):
        lines += [
            "| arms | measure | alone | query-swap diff [95% CI] | demo-swap diff [95% CI] |",
            "| --- | --- | --- | --- | --- |",
        ]
        for pair in ("anchor_icl", "anchor_it", "icl_it"):
            for measure in ("agreement", "kl"):
                got = {r["null"]: r for r in m["behaviour"] if r["pair"] == pair and r["measure"] == measure}
                if not got:
                    continue
                cell = [f"{_ci(r)} {r['verdict']}" if r else "–" for r in (got.get("query_swap"), got.get("demo_swap"))]
                lines.append(f"| {_NAMES[pair]} | {measure} | {got['none']['observed']:.3f} | {cell[0]} | {cell[1]} |")
        lines.append("")
    wide = s.pivot(index="layer", columns="pair", values="mean")
    lines += [
        "| layer | " + " | ".join(p.replace("_", "–") for p in wide.columns) + " |",
        "| --- " * (len(wide.columns) + 1) + "|",
    ]
    lines += [f"| {layer} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for layer, row in wide.iterrows()]
    return "\n".join(lines) + "\n"
