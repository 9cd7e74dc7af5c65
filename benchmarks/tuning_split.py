"""The batched IT pass with and without length-matched sub-batches, alternated in one process.

    python benchmarks/tuning_split.py [--model gemma-3-270m] [--adapters 4] [--k 4]
                                      [--epochs 4] [--reps 3] [--threads 1]

Both sides train the same N LoRA adapters (k demonstrations each, the same seeds) with
:func:`iclit.tuning.tuned_many`. ``one_forward``: one padded forward per micro-batch (the
split cost set so high that no micro-batch is split); ``sub_batches``: iclit's default
(:func:`iclit.core.batching.padded_groups` with :func:`iclit.tuning.batched.forward_cost_tokens`),
each micro-batch's rows split into forwards of similar length that share one LM-head sweep.
The sides alternate (A B, B A, …) so a change in the machine's load reaches both alike; the
fp32 matmul peak is measured before every repetition and at the end. Prints each repetition,
the medians, the achieved GFLOP/s (FLOPs counted by :mod:`iclit.engine.flops`) as a fraction
of the median peak, the largest difference of the adapters' final losses, and one line

    RATIO name=tuning_split value=<median one_forward / median sub_batches> agree=<true|false>

(agree: every final loss within 1e-4). ``--threads 1`` by default: on a shared 2-core machine
two threads contend with the other jobs and the timings scatter.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import matmul_peak  # noqa: E402

import iclit.tuning.batched as batched  # noqa: E402
from iclit.engine.flops import PassWork, attended_pairs, training_flops  # noqa: E402
from iclit.models import load_model  # noqa: E402
from iclit.tasks import get_task  # noqa: E402
from iclit.tuning import TuningRecipe, default_train_tokens, encode_pairs, tuned_many  # noqa: E402

NO_SPLIT = 10**12  # a split cost no padding saving can pay for: one forward per micro-batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    task = get_task("sentiment")
    ex = task.examples
    sets = [[task.template.training_pair(e) for e in ex[j * args.k : (j + 1) * args.k]] for j in range(args.adapters)]
    lengths = [
        int(n) for b in (encode_pairs(lm.tokenizer, s) for s in sets) for n in b.attention_mask.sum(dim=1).tolist()
    ]
    answers = sum(int(encode_pairs(lm.tokenizer, s).targets.numel()) for s in sets)
    work = args.epochs * training_flops(
        lm.model, PassWork(tokens=sum(lengths), attended=attended_pairs(lengths), head_rows=answers)
    )
    recipe = TuningRecipe(epochs=args.epochs)
    default_cost = batched.forward_cost_tokens

    def run(split: bool) -> tuple[float, list[float]]:
        batched.forward_cost_tokens = default_cost if split else (lambda device: NO_SPLIT)
        try:
            start = time.perf_counter()
            with tuned_many(
                lm.model,
                lm.tokenizer,
                sets,
                recipe,
                seeds=list(range(1000, 1000 + args.adapters)),
                max_tokens=default_train_tokens(lm.device),
            ) as (_, _router, results):
                losses = [float(r.final_loss) for r in results]
            return time.perf_counter() - start, losses
        finally:
            batched.forward_cost_tokens = default_cost

    run(True)  # warm-up
    times: dict[str, list[float]] = {"one_forward": [], "sub_batches": []}
    losses: dict[str, list[float]] = {}
    peaks = []
    for rep in range(args.reps):
        peaks.append(matmul_peak(lm.device, lm.dtype))
        order = ("one_forward", "sub_batches") if rep % 2 == 0 else ("sub_batches", "one_forward")
        for name in order:
            seconds, losses[name] = run(name == "sub_batches")
            times[name].append(seconds)
            print(f"rep {rep} {name}: {seconds:.2f} s ({work / seconds / 1e9:.1f} GFLOP/s)", flush=True)
    peaks.append(matmul_peak(lm.device, lm.dtype))
    peak = statistics.median(peaks)
    print(
        f"{args.model}: {args.adapters} adapters x {args.k} demonstrations x {args.epochs} epochs, "
        f"{torch.get_num_threads()} thread(s), work {work / 1e9:.1f} GFLOP; fp32 matmul peak GFLOP/s "
        + ", ".join(f"{p / 1e9:.1f}" for p in peaks)
    )
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{name}: median {med:.2f} s, min {min(ts):.2f} s, {work / med / 1e9:.1f} GFLOP/s "
            f"= {work / med / peak:.2f} of the median peak"
        )
    diff = max(abs(a - b) for a, b in zip(losses["one_forward"], losses["sub_batches"], strict=True))
    ratio = statistics.median(times["one_forward"]) / statistics.median(times["sub_batches"])
    print(f"largest final-loss difference {diff:.2e}")
    print(f"RATIO name=tuning_split value={ratio:.2f} agree={'true' if diff < 1e-4 else 'false'}")


if __name__ == "__main__":
    main()
