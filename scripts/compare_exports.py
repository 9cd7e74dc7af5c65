"""How far apart are two `iclit compare` output directories? (e.g. before and after a refactor)

    python scripts/compare_exports.py OLD_DIR NEW_DIR

Reads each directory's trials.jsonl, summary.csv and metrics.json and prints, per pair, the
largest absolute difference of the per-trial per-layer cosines; the largest difference of
summary.csv's mean/std/CI columns; of metrics.json's numbers; and whether the predictions
and IT losses agree. Trials are matched on (resample, query_id).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def trials(run: Path) -> dict[tuple[int, str], dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "trials.jsonl").read_text(encoding="utf-8").splitlines() if line]
    return {(r["resample"], r["query_id"]): r for r in rows}


def numbers(value: Any, path: str = "") -> Iterator[tuple[str, float]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from numbers(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, float(value)


def main(old: Path, new: Path) -> None:
    a, b = trials(old), trials(new)
    print(f"trials: {len(a)} old, {len(b)} new, {len(a.keys() & b.keys())} matched")
    keys = sorted(a.keys() & b.keys())
    pairs = [
        p
        for p in a[keys[0]]
        if isinstance(a[keys[0]][p], list)
        and p in b[keys[0]]
        and a[keys[0]][p]
        and isinstance(a[keys[0]][p][0], float)
        and p != "it_losses"
    ]
    print("| pair | max abs diff over trials × layers | at the last layer |")
    print("| --- | --- | --- |")
    for pair in pairs:
        x = np.array([a[k][pair] for k in keys], dtype=float)
        y = np.array([b[k][pair] for k in keys], dtype=float)
        print(f"| {pair} | {np.nanmax(np.abs(x - y)):.2e} | {np.nanmax(np.abs(x[:, -1] - y[:, -1])):.2e} |")
    same_pred = all(a[k]["predictions"] == {arm: b[k]["predictions"][arm] for arm in a[k]["predictions"]} for k in keys)
    loss = max(abs(a[k]["it_final_loss"] - b[k]["it_final_loss"]) for k in keys)
    steps = max(float(np.max(np.abs(np.subtract(a[k]["it_losses"], b[k]["it_losses"])))) for k in keys)
    print(f"\npredictions identical: {same_pred}; IT final loss max abs diff {loss:.2e}; per-step losses {steps:.2e}")
    sa, sb = pd.read_csv(old / "summary.csv"), pd.read_csv(new / "summary.csv")
    m = sa.merge(sb, on=["pair", "layer"], suffixes=("_old", "_new"))
    worst = max(float((m[f"{c}_old"] - m[f"{c}_new"]).abs().max()) for c in ("mean", "std", "ci_low", "ci_high"))
    print(f"summary.csv: {len(m)} of {len(sa)} rows matched; max abs diff of mean/std/CI {worst:.2e}")
    ma = dict(numbers(json.loads((old / "metrics.json").read_text())))
    mb = dict(numbers(json.loads((new / "metrics.json").read_text())))
    common = ma.keys() & mb.keys()
    diff = max((abs(ma[k] - mb[k]), k) for k in common)
    print(f"metrics.json: {len(common)} numbers in both; max abs diff {diff[0]:.2e} ({diff[1]})")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
