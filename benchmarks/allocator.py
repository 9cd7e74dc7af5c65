"""Tuning with the C library's malloc and with tcmalloc, side by side, one thread each.

    python benchmarks/allocator.py [--model gemma-3-270m] [--epochs 12] [--runs 2] [--adapters 8]

A process's ``malloc`` is chosen when it starts (``LD_PRELOAD``), so each side is a child
process: ``system`` (glibc) and ``tcmalloc`` (the library
:func:`iclit.experiments.raypool.allocator_preload` finds, which ``make paper``'s Ray actors
preload). Each child runs, after one untimed warm-up of each, ``--runs`` full fine-tunings
(k = 4 sentiment demonstrations, ``--epochs`` full-batch steps, as ``lora_vs_full`` does per
set) and one batched LoRA pass of ``--adapters`` adapters (a chunk of the main cell trains 20), and
reports the seconds, the kernel's share (``getrusage``), its peak RSS and a SHA-256 of the
tuned weights and losses. The fp32 matmul peak is measured before and after. Prints one line
per side and

    RATIO name=allocator_full_ft value=<system / tcmalloc seconds> agree=<true|false>
    RATIO name=allocator_lora value=<system / tcmalloc seconds> agree=<true|false>

(agree: the two sides' tuned weights and losses are equal bit for bit).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from iclit.engine.flops import matmul_rate
from iclit.experiments.raypool import allocator_preload

CHILD = r"""
import hashlib, json, resource, sys, time
import torch
torch.set_num_threads(1)
from iclit.models import load_model
from iclit.tasks import get_task
from iclit.tuning import TuningRecipe, default_train_tokens, tuned, tuned_many

model, epochs, runs, adapters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
lm = load_model(model)
examples = get_task("sentiment").examples
template = get_task("sentiment").template
sets = [[template.training_pair(e) for e in examples[4 * j : 4 * j + 4]] for j in range(adapters)]
digest = hashlib.sha256()

def full(record):
    with tuned(lm.model, lm.tokenizer, sets[0], TuningRecipe(method="full", epochs=epochs), seed=0) as (m, r):
        if record:
            for p in m.parameters():
                digest.update(p.detach().numpy().tobytes())
            digest.update(repr(r.losses + [r.final_loss]).encode())

def lora(record):
    recipe = TuningRecipe(epochs=epochs)
    seeds = list(range(1000, 1000 + adapters))
    with tuned_many(lm.model, lm.tokenizer, sets, recipe, seeds=seeds, max_tokens=default_train_tokens(lm.device)) as (
        m, _, results
    ):
        if record:
            for p in m.parameters():
                if p.requires_grad or p.dim() == 3:
                    digest.update(p.detach().numpy().tobytes())
            digest.update(repr([r.losses + [r.final_loss] for r in results]).encode())

def timed(fn, n):
    fn(False)  # warm-up
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for i in range(n):
        fn(i == n - 1)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": time.perf_counter() - t, "kernel": r1.ru_stime - r0.ru_stime}

out = {"full": timed(full, runs), "lora": timed(lora, 1)}
out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
out["sha256"] = digest.hexdigest()
print(json.dumps(out))
"""


def run(preload: str | None, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = preload
    cmd = [sys.executable, "-c", CHILD, args.model, str(args.epochs), str(args.runs), str(args.adapters)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child with LD_PRELOAD={preload} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--adapters", type=int, default=8)
    args = ap.parse_args()
    tcmalloc = allocator_preload("tcmalloc")
    before = matmul_rate()
    sides = {"system": run(None, args), "tcmalloc": run(tcmalloc, args)}
    after = matmul_rate()
    threads = torch.get_num_threads()
    print(f"matmul {before / 1e9:.0f} GFLOP/s before, {after / 1e9:.0f} after (fp32 2048², {threads} threads)")
    print(f"tcmalloc: {tcmalloc}")
    for name, r in sides.items():
        print(
            f"{name:9s} full fine-tuning {args.runs} x {args.epochs} steps {r['full']['seconds']:.1f} s "
            f"(kernel {r['full']['kernel']:.1f} s); LoRA {args.adapters} adapters x {args.epochs} steps "
            f"{r['lora']['seconds']:.1f} s (kernel {r['lora']['kernel']:.1f} s); peak RSS {r['peak_rss_gib']:.2f} GiB"
        )
    agree = str(sides["system"]["sha256"] == sides["tcmalloc"]["sha256"]).lower()
    for part in ("full", "lora"):
        ratio = sides["system"][part]["seconds"] / sides["tcmalloc"][part]["seconds"]
        print(f"RATIO name=allocator_{part if part == 'lora' else 'full_ft'} value={ratio:.2f} agree={agree}")


if __name__ == "__main__":
    main()
