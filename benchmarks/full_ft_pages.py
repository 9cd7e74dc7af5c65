"""Full fine-tuning with and without transparent huge pages for large CPU tensors.

    python benchmarks/full_ft_pages.py [--model gemma-3-270m] [--epochs 6] [--runs 2]

iclit sets ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's CPU allocator then asks for huge pages for
large tensors) when it is imported. PyTorch reads that setting once per process, so this
script runs the same full fine-tuning work (k = 4 sentiment demonstrations, ``--runs``
runs of ``--epochs`` full-batch steps, after one untimed warm-up run) in two child processes,
one with the setting off and one with it on, and prints the seconds of each, the ratio and
whether the two ended at the same loss:

    RATIO name=full_ft_huge_pages value=<seconds off / seconds on> agree=<true|false>
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, sys, time
from iclit.models import load_model
from iclit.tasks import get_task
from iclit.tuning import TuningRecipe, tuned
model, epochs, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lm = load_model(model)
task = get_task("sentiment")
pairs = [task.template.training_pair(e) for e in task.examples[:4]]
recipe = TuningRecipe(method="full", epochs=epochs)
with tuned(lm.model, lm.tokenizer, pairs, recipe, seed=0) as (_, result):
    pass
start = time.perf_counter()
for _ in range(runs):
    with tuned(lm.model, lm.tokenizer, pairs, recipe, seed=0) as (_, result):
        pass
print(json.dumps({"seconds": time.perf_counter() - start, "final_loss": result.final_loss}))
"""


def run(setting: str, model: str, epochs: int, runs: int) -> dict:
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": setting}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(epochs), str(runs)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"child with THP_MEM_ALLOC_ENABLE={setting} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    off = run("0", args.model, args.epochs, args.runs)
    on = run("1", args.model, args.epochs, args.runs)
    agree = abs(off["final_loss"] - on["final_loss"]) <= 1e-6 * max(1.0, abs(off["final_loss"]))
    print(
        f"full fine-tuning, {args.runs} runs x {args.epochs} steps: huge pages off {off['seconds']:.1f} s, "
        f"on {on['seconds']:.1f} s; final loss {off['final_loss']:.6g} / {on['final_loss']:.6g}"
    )
    print(f"RATIO name=full_ft_huge_pages value={off['seconds'] / on['seconds']:.2f} agree={str(agree).lower()}")


if __name__ == "__main__":
    main()
