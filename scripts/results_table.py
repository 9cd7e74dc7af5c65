"""Print the README's results tables (Markdown) from an `iclit compare` output directory.

    python scripts/results_table.py runs/main
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd


def main(run: Path) -> None:
    m = json.loads((run / "metrics.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    s = pd.read_csv(run / "summary.csv")
    print(f"`{' '.join(cfg['argv'][1:]) or 'compare'}` — {cfg['model']}, {cfg['task']}, k={cfg['k']}, "
          f"{cfg['resamples']} sets × {cfg.get('queries_per_set', 1)} queries, seed {cfg['seed']}, {cfg['device']} "
          f"{cfg['dtype']}, {cfg['seconds']:.0f} s\n")
    print("| pair | last layer: mean ± std [95% CI] | mean over layers [95% CI] |")
    print("| --- | --- | --- |")
    for pair in ("anchor_icl", "anchor_it", "icl_it"):
        a, b = m["last_layer"][pair], m["mean_over_layers"][pair]
        print(f"| {pair.replace('_', '–')} | {a['mean']:.3f} ± {a['std']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}] "
              f"| {b['mean']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}] |")
    score = "accuracy" if "accuracy" in m else "chrf"
    print(f"\n| arm | {score} [95% CI] |\n| --- | --- |")
    for arm, v in m[score].items():
        print(f"| {arm} | {v['mean']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}] |")
    loss = m["it_final_loss"]
    print(f"\nPrediction agreement: ICL–IT {m['icl_it_agreement']:.3f}, anchor–ICL {m['anchor_icl_agreement']:.3f}, "
          f"anchor–IT {m['anchor_it_agreement']:.3f}. IT final training loss: mean {loss['mean']:.1e}, max {loss['max']:.1e}.\n")
    names = {"anchor_icl": "anchor–ICL", "anchor_it": "anchor–IT", "icl_it": "ICL–IT", "update": "update (ICL−anchor, IT−anchor)"}
    if m.get("tests"):
        print("| pair | cosine | query-swap excess [95% CI] | p Holm | verdict | demo-swap excess [95% CI] | p Holm | verdict |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for pair, label in names.items():
            got = {r["null"]: r for r in m["tests"] if r["pair"] == pair}
            if not got:
                continue
            cells = [label, f"{next(iter(got.values()))['observed']:.3f}"]
            for null in ("query_swap", "demo_swap"):
                r = got.get(null)
                cells += ([f"{r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]", f"{r['p_holm']:.2g}", r["verdict"]]
                          if r else ["–", "–", "–"])
            print("| " + " | ".join(cells) + " |")
        first = m["tests"][0]
        print(f"\n{first['n_units']} (query, set) pairs in {first['n_blocks']} query blocks; Holm over the last layer's "
              f"tests of the cell; equivalence margin ±{cfg.get('equivalence_margin')}.\n")
    for r in m.get("seeds", []):
        if r["pair"] == "icl_it":
            print(f"IT seed noise at the last layer: ICL–IT {r['seed1']:.3f} with the first seed, {r['seed2']:.3f} with the "
                  f"second; per-pair between-seed SD {r['unit_sd']:.3f}.\n")
    if m.get("geometry"):
        print("| pair | debiased CKA (p) | RSA (p) |\n| --- | --- | --- |")
        for pair in ("anchor_icl", "anchor_it", "icl_it"):
            g = {r["measure"]: r for r in m["geometry"] if r["pair"] == pair and r.get("null") in (None, "query_swap")}
            print(f"| {names[pair]} | " + " | ".join(f"{g[k]['value']:.3f} ({g[k]['p']:.2g})" if k in g else "–"
                                                   for k in ("cka", "rsa")) + " |")
        print(f"\nacross all {m['geometry'][0]['n']} trials of the cell at the last layer; permutation p (one-sided), permuting a "
              "query block's queries within one gold label (the same permutation for all the block's sets).\n")
    if m.get("behaviour"):
        print("| arms | measure | alone | query-swap diff [95% CI] | demo-swap diff [95% CI] |\n| --- | --- | --- | --- | --- |")
        for pair in ("anchor_icl", "anchor_it", "icl_it"):
            for measure in ("agreement", "kl"):
                got = {r["null"]: r for r in m["behaviour"] if r["pair"] == pair and r["measure"] == measure}
                if not got:
                    continue
                cell = lambda r: f"{r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] {r['verdict']}" if r else "–"  # noqa: E731
                print(f"| {names[pair]} | {measure} | {got['none']['observed']:.3f} | {cell(got.get('query_swap'))} | "
                      f"{cell(got.get('demo_swap'))} |")
        print()
    wide = s.pivot(index="layer", columns="pair", values="mean")
    print("| layer | " + " | ".join(p.replace("_", "–") for p in wide.columns) + " |")
    print("| --- " * (len(wide.columns) + 1) + "|")
    for layer, row in wide.iterrows():
        print(f"| {layer} | " + " | ".join(f"{v:.3f}" for v in row) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/main"))
