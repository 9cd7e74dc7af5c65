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
          f"{cfg['resamples']} resamples, seed {cfg['seed']}, {cfg['device']} {cfg['dtype']}, {cfg['seconds']:.0f} s\n")
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
    wide = s.pivot(index="layer", columns="pair", values="mean")
    print("| layer | " + " | ".join(p.replace("_", "–") for p in wide.columns) + " |")
    print("| --- " * (len(wide.columns) + 1) + "|")
    for layer, row in wide.iterrows():
        print(f"| {layer} | " + " | ".join(f"{v:.3f}" for v in row) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/main"))
