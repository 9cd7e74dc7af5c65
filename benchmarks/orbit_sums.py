"""The restricted CKA / RSA nulls' permuted sums: through the orbits against gathering every entry.

    python benchmarks/orbit_sums.py [--blocks 20] [--queries 6] [--layers 31] [--perms 1000] [--reps 3]

One cell shaped like configs/paper's (``--blocks`` query blocks of two demonstration sets,
``--queries`` queries per set, half of each label: 240 items), a symmetric ``[L, n, n]`` pair
of matrices, and the design's permutations
(:func:`iclit.analysis.permutations.design_permutations`) for both nulls, ``queries`` and
``sets``. For each, :func:`iclit.analysis.stats.permuted_inners` with its orbit path
(:func:`iclit.analysis.stats.permutation._orbit_inners`, the default for such permutations)
and with the gather path (every permuted upper-triangle entry gathered), alternating
(A B, B A, …) after one untimed run of each, the fp32 matmul rate measured before and after.
Prints each repetition, the medians and one line per null

    RATIO name=orbit_sums_<null> value=<median gather / median orbits> agree=<true|false>

``agree``: the two paths' sums differ by at most 1e-12 of the largest sum.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from iclit.analysis.nulls import Units
from iclit.analysis.permutations import design_permutations
from iclit.analysis.stats import permutation
from iclit.engine.flops import matmul_rate


def cell_units(blocks: int, queries: int) -> Units:
    """Items in state order (set, query): each block's two sets read the block's queries."""
    rows = [
        (0, 2 * b + k, b, f"b{b}q{q}", ("pos", "neg")[q % 2])
        for b in range(blocks)
        for k in (0, 1)
        for q in range(queries)
    ]
    return Units(
        *(np.asarray(col, dtype=object if f in (3, 4) else None) for f, col in enumerate(zip(*rows, strict=True)))
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=20)
    ap.add_argument("--queries", type=int, default=6)
    ap.add_argument("--layers", type=int, default=31)
    ap.add_argument("--perms", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    units = cell_units(args.blocks, args.queries)
    n = len(units)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, args.layers, n, n))
    a, b = a + a.transpose(0, 2, 1), b + b.transpose(0, 2, 1)
    print(f"matmul {matmul_rate() / 1e9:.0f} GFLOP/s (fp32 2048², {torch.get_num_threads()} threads)")
    print(f"{n} items, {args.layers} layers, {args.perms} permutations")
    orbits = permutation._orbits
    sides = {"orbits": orbits, "gather": lambda perms: None}
    for null in ("queries", "sets"):
        perms = design_permutations(units, args.perms, seed=1, swap=null)

        def run(side: str, perms: np.ndarray = perms) -> tuple[float, np.ndarray]:
            permutation._orbits = sides[side]
            try:
                start = time.perf_counter()
                out = permutation.permuted_inners([a], b, perms)
                return time.perf_counter() - start, out
            finally:
                permutation._orbits = orbits

        found = orbits(perms)
        assert found is not None, "the design's permutations have orbits"
        print(f"{null}: {len(found.chosen[0])} orbits, {len(found.starts)} arrangements, {len(found.src)} entries")
        got = {side: run(side)[1] for side in sides}  # untimed warm-up of each
        times: dict[str, list[float]] = {side: [] for side in sides}
        for rep in range(args.reps):
            for side in ("orbits", "gather") if rep % 2 == 0 else ("gather", "orbits"):
                seconds, out = run(side)
                times[side].append(seconds)
                print(f"  rep {rep + 1} {side}: {seconds:.3f} s")
        med = {side: statistics.median(t) for side, t in times.items()}
        agree = np.abs(got["orbits"] - got["gather"]).max() <= 1e-12 * np.abs(got["gather"]).max()
        print(f"  median orbits {med['orbits']:.3f} s, gather {med['gather']:.3f} s")
        print(f"RATIO name=orbit_sums_{null} value={med['gather'] / med['orbits']:.2f} agree={str(agree).lower()}")
    print(f"matmul {matmul_rate() / 1e9:.0f} GFLOP/s after")


if __name__ == "__main__":
    main()
