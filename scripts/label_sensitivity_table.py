"""Markdown rows of the label-sensitivity diagnostic from the JSON files that
``iclit models --diagnose NAME --json FILE`` writes (one per model):

    python scripts/label_sensitivity_table.py runs/diagnose/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from iclit.analysis.labels import label_sensitivity_summary


def main(paths: list[str]) -> None:
    print(
        "| model | prompts | ICL gold | ICL flipped | ICL random | zero-shot | gold − flipped (95% CI, p) | verdict |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for path in paths:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        s = label_sensitivity_summary(data["correct"], data["zero_shot"])
        acc, drop = s["accuracy"], s["contrasts"]["gold-flipped"]
        cells = [f"{acc[c]['mean']:.2f}" for c in ("gold", "flipped", "random", "zero_shot")]
        print(
            f"| `{data['model']}` | {data['prompt_format']}, k={data['k']}, {s['sets']}×{s['queries']} | "
            + " | ".join(cells)
            + f" | {drop['mean']:+.2f} [{drop['ci_low']:+.2f}, {drop['ci_high']:+.2f}], p={drop['p']:.2g}"
            + f" | {s['verdict']} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
