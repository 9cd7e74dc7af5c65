"""The chunks of cells that differ only in the IT recipe, computed alone and with their base
reads shared, alternated in one process.

    python benchmarks/shared_readouts.py [--spec configs/paper/dose.yaml] [--chunk 0]
                                         [--reps 1] [--threads 1]

Takes set-chunk ``--chunk`` of every cell of the spec (the dose spec: three learning rates,
so three chunks with one base key, :attr:`iclit.experiments.plan.Chunk.base_key`) and runs
them with :func:`iclit.experiments.workers.execute` twice: ``alone``, each chunk reading the
base model itself (what a run did before), and ``shared``, as a run does now (the first
chunk's base-arm outputs serve the others). The sides alternate (A B, B A, …), the model's
anchor memo and the shared reads are cleared before each side, and the fp32 matmul peak is
measured before every side and at the end. Prints each side's seconds and each chunk's
seconds per arm (an arm's time runs to the next arm's start; the last arm's includes the
chunk's scoring), the base arms' seconds that sharing skips, the medians, whether
every stored state of every chunk is equal bit for bit between the sides, and one line

    RATIO name=shared_readouts value=<median alone / median shared> equal=<true|false>
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import matmul_peak  # noqa: E402

from iclit.engine.evaluate import BASE_ARMS  # noqa: E402
from iclit.experiments import load_spec, make_plan, workers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, default=ROOT / "configs" / "paper" / "dose.yaml")
    ap.add_argument("--chunk", type=int, default=0, help="which set-chunk of every cell")
    ap.add_argument("--reps", type=int, default=1, help="pairs of sides (alone, shared)")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: a Ray actor; with 2, tuning is not bit-reproducible)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = load_spec(args.spec)
    chunks = [c for c in make_plan(spec).chunks if c.number == args.chunk]
    if len({c.base_key for c in chunks}) != 1 or len(chunks) < 2:
        sys.exit(f"{args.spec}: its cells differ beyond the recipe, or it has one cell: nothing to share")
    lm = workers.loaded_model(chunks[0].cell.model, spec.device, spec.dtype)
    cpu = torch.device("cpu")
    print(f"{args.spec.name}: {len(chunks)} chunks of {chunks[0].size} trials, {args.threads} threads")

    def side(shares: bool) -> tuple[float, list[dict[str, np.ndarray]], list[dict[str, float]]]:
        """Seconds, each chunk's states and each chunk's seconds per arm."""
        lm.memo.clear()
        workers._BASE_READOUTS.clear()
        jobs = [workers.make_job(c, spec, shares=shares) for c in chunks]
        arm_seconds: list[dict[str, float]] = []

        def progress(arm: str, n: int) -> None:  # called as each arm starts
            now = time.perf_counter()
            if arm_seconds[-1]:
                last = next(reversed(arm_seconds[-1]))
                arm_seconds[-1][last] = now - arm_seconds[-1][last]
            arm_seconds[-1][arm] = now

        start = time.perf_counter()
        outs = []
        for job in jobs:
            arm_seconds.append({})
            outs.append(workers.execute(job, lm, progress=progress))
            last = next(reversed(arm_seconds[-1]))
            arm_seconds[-1][last] = time.perf_counter() - arm_seconds[-1][last]  # the arm, then storing
        return time.perf_counter() - start, [o.states for o in outs], arm_seconds

    times: dict[str, list[float]] = {"alone": [], "shared": []}
    states: dict[str, list[dict[str, np.ndarray]]] = {}
    peaks = []
    for rep in range(args.reps):
        for name in ("alone", "shared") if rep % 2 == 0 else ("shared", "alone"):
            peaks.append(matmul_peak(cpu, torch.float32) / 1e9)
            seconds, states[name], arms = side(name == "shared")
            times[name].append(seconds)
            print(f"rep {rep} {name:6s} {seconds:7.1f} s   (matmul {peaks[-1]:.0f} GFLOP/s before)", flush=True)
            for i, per_arm in enumerate(arms):
                print(f"    chunk {i}: " + ", ".join(f"{a} {t:.1f} s" for a, t in per_arm.items()), flush=True)
            if name == "alone":
                base = sum(t for per_arm in arms[1:] for a, t in per_arm.items() if a in BASE_ARMS)
                print(f"    the base arms of chunks 1-{len(arms) - 1}, which sharing skips: {base:.1f} s", flush=True)
    peaks.append(matmul_peak(cpu, torch.float32) / 1e9)
    equal = all(
        a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        for a, b in zip(states["alone"], states["shared"], strict=True)
    )
    alone, shared = statistics.median(times["alone"]), statistics.median(times["shared"])
    print(f"median alone {alone:.1f} s, shared {shared:.1f} s; matmul {min(peaks):.0f}–{max(peaks):.0f} GFLOP/s")
    print(f"every state of every chunk equal bit for bit: {equal}")
    print(f"RATIO name=shared_readouts value={alone / shared:.3f} equal={str(equal).lower()}")


if __name__ == "__main__":
    main()
