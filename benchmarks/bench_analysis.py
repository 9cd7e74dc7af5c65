"""Side-by-side benchmark of the whole-cell geometry (debiased CKA and RSA with their
permutation nulls), the costliest table of a cell's analysis.

    python benchmarks/bench_analysis.py [--n 300] [--layers 19] [--dim 640] [--perms 1000]

On synthetic states shaped like one cell of the default model (300 (query, set) pairs, 19
captured layers, hidden size 640; three arms), one process:

* straightforward: each arm pair on its own (anchor–ICL, anchor–IT, ICL–IT; CKA, then RSA),
  every permutation's entries gathered with numpy fancy indexing (iclit's code before
  2026-12-03);
* iclit: :func:`iclit.analysis.stats.pair_tests`: each arm's Gram and rank matrix once, a
  second arm's permuted entries gathered once for every pair that shares it, in torch.

Both use the same permutations; ``agree``: every value, null mean and p equal to 1e-10.
Prints ``RATIO name=cell_geometry value=<speedup> agree=<true|false>``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from iclit.analysis.stats import representation
from iclit.analysis.stats.arrays import BLOCK


def numpy_permuted_inner(a: np.ndarray, b: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """``<A, B[pi][:, pi]>`` per layer, ``[n_perm, L]``: numpy fancy indexing on the upper triangle."""
    n_layers, n, _ = a.shape
    n_perm = len(perms)
    i, j = np.triu_indices(n)
    a_sel = (a[:, i, j] * np.where(i == j, 1.0, 2.0))[..., None]
    m = len(i)
    b_flat = b.reshape(n_layers, n * n)
    out = np.empty((n_perm, n_layers))
    block = max(1, BLOCK // (n_layers * m))
    step = n_layers if block > 1 else max(1, BLOCK // m)
    for b0 in range(0, n_perm, block):
        k = min(block, n_perm - b0)
        pi = perms[b0 : b0 + k]
        idx = pi[:, i] * n + pi[:, j]
        for l0 in range(0, n_layers, step):
            out[b0 : b0 + k, l0 : l0 + step] = (b_flat[l0 : l0 + step, idx] @ a_sel[l0 : l0 + step])[..., 0].T
    return out


def straightforward(states, pairs, n_perm, seed):
    real = representation.permuted_inners
    representation.permuted_inners = lambda a_list, b, perms: np.stack(
        [numpy_permuted_inner(a, b, perms) for a in a_list]
    )
    try:
        return {
            (name, measure): fn(states[a], states[b], n_perm=n_perm, seed=seed)
            for name, (a, b) in pairs.items()
            for measure, fn in (("cka", representation.cka_permutation_test), ("rsa", representation.rsa_per_layer))
        }
    finally:
        representation.permuted_inners = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="(query, set) pairs of the cell")
    ap.add_argument("--layers", type=int, default=19)
    ap.add_argument("--dim", type=int, default=640)
    ap.add_argument("--perms", type=int, default=1000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    shape = (args.n, args.layers, args.dim)
    shared = rng.normal(size=shape).astype(np.float32)
    states = {arm: shared + rng.normal(size=shape).astype(np.float32) for arm in ("anchor", "icl", "it")}
    pairs = {"anchor_icl": ("anchor", "icl"), "anchor_it": ("anchor", "it"), "icl_it": ("icl", "it")}
    t0 = time.perf_counter()
    ref = straightforward(states, pairs, args.perms, 0)
    t1 = time.perf_counter()
    fast = representation.pair_tests(states, pairs, n_perm=args.perms, seed=0)
    t2 = time.perf_counter()
    agree = ref.keys() == fast.keys() and all(
        np.allclose(ref[k][f], fast[k][f], rtol=1e-10, atol=1e-12, equal_nan=True) for k in ref for f in ref[k]
    )
    print(
        f"cell geometry: {args.n} pairs x {args.layers} layers x d={args.dim}, 3 arm pairs x (CKA, RSA), "
        f"{args.perms} permutations"
    )
    print(f"straightforward {t1 - t0:.1f} s, iclit {t2 - t1:.1f} s")
    print(f"RATIO name=cell_geometry value={(t1 - t0) / (t2 - t1):.2f} agree={str(agree).lower()}")


if __name__ == "__main__":
    main()
