"""Full fine-tuning with the input embedding's gradient as rows, against autograd's dense one.

    python benchmarks/full_ft_rows.py [--model gemma-3-270m] [--epochs 6] [--reps 2] [--threads 1]

Both sides run the same full fine-tuning (k = 4 sentiment demonstrations, ``--epochs``
full-batch steps, seed 0) with :func:`iclit.tuning.tuned`: ``dense`` with autograd's embedding
backward (a ``[V, d]`` table of zeros per step, then the tied head's gradient added to it out of
place), ``rows`` with iclit's default, :func:`iclit.tuning.embedding_rows.embedding_rows_grad`.
The sides alternate (A B, B A, …) after one untimed warm-up run of each, with the fp32 matmul
peak measured before every repetition and at the end. Prints each repetition, the medians,
whether every tuned weight of the two sides is equal bit for bit, and one line

    RATIO name=full_ft_rows value=<median dense / median rows> agree=<true|false>

``--threads 1`` by default: one thread is what each of ``make paper``'s two actors has.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

import iclit.tuning.peft_path as peft_path
from iclit.engine.flops import matmul_rate
from iclit.models import load_model
from iclit.tasks import get_task
from iclit.tuning import TuningRecipe, tuned
from iclit.tuning.embedding_rows import embedding_rows_grad


@contextmanager
def dense_embedding_grad(model: nn.Module) -> Iterator:
    """Autograd's own embedding backward: nothing routed, nothing to flush."""
    yield lambda: None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    task = get_task("sentiment")
    pairs = [task.template.training_pair(e) for e in task.examples[:4]]
    recipe = TuningRecipe(method="full", epochs=args.epochs)
    sides = {"rows": embedding_rows_grad, "dense": dense_embedding_grad}

    def run(side: str) -> tuple[float, dict[str, torch.Tensor]]:
        peft_path.embedding_rows_grad = sides[side]
        try:
            start = time.perf_counter()
            with tuned(lm.model, lm.tokenizer, pairs, recipe, seed=0) as (model, _):
                seconds = time.perf_counter() - start
                weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        finally:
            peft_path.embedding_rows_grad = embedding_rows_grad
        return seconds, weights

    weights = {side: run(side)[1] for side in sides}  # warm-up, and the weights compared
    same = weights["rows"].keys() == weights["dense"].keys() and all(
        torch.equal(weights["rows"][n], weights["dense"][n]) for n in weights["rows"]
    )
    del weights
    times: dict[str, list[float]] = {side: [] for side in sides}
    peaks = []
    for rep in range(args.reps):
        peaks.append(matmul_rate() / 1e9)
        order = list(sides) if rep % 2 == 0 else list(sides)[::-1]
        for side in order:
            times[side].append(run(side)[0])
        timed = ", ".join(f"{s} {times[s][-1]:.2f} s" for s in order)
        print(f"rep {rep + 1}: matmul {peaks[-1]:.0f} GFLOP/s; {timed}")
    peaks.append(matmul_rate() / 1e9)
    med = {side: statistics.median(ts) for side, ts in times.items()}
    print(
        f"{args.model}, full fine-tuning, {args.epochs} steps, {args.threads} thread(s), matmul "
        f"{min(peaks):.0f}-{max(peaks):.0f} GFLOP/s: median dense {med['dense']:.2f} s, rows {med['rows']:.2f} s; "
        f"tuned weights equal bit for bit: {same}"
    )
    print(f"RATIO name=full_ft_rows value={med['dense'] / med['rows']:.2f} agree={str(same).lower()}")


if __name__ == "__main__":
    main()
