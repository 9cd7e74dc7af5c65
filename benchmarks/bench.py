"""Side-by-side benchmark: the straightforward way vs iclit's engine, on the same work.

    python benchmarks/bench.py [--model gemma-3-270m] [--icl-k 8] [--queries 64]
                               [--adapters 16] [--it-k 4] [--epochs 15] [--e2e]

One process, one model. For each comparison it times the straightforward way and iclit's
fast path on identical inputs, records peak memory during each (resident set size on CPU,
``torch.cuda.max_memory_allocated`` on CUDA), checks that the results agree, prints a table
and one machine-readable line per comparison:

    RATIO name=<comparison> value=<speedup> agree=<true|false>

* ``icl_capture``: k demonstrations + query, one demonstration set, many queries.
  Straightforward: one transformers forward per ICL prompt with ``output_hidden_states``
  (full-vocabulary logits included), last token taken. iclit: the demonstrations' KV cache
  once, queries batched on top, hooks keep only last-token rows, no LM head.
  Agree: cosine >= 0.99999 at every layer for every query.
* ``it_tuning``: N LoRA adapters (q/v, PEFT defaults r=8) of k demonstrations each, then the
  IT state of one query per adapter. Straightforward: PEFT ``get_peft_model`` + training
  with transformers' ``labels=`` loss, one adapter after another, then a forward with
  ``output_hidden_states``. iclit: all N adapters in one batched forward/backward (stacked
  A/B, per-adapter clipping), loss from answer positions only, batched routed capture.
  Agree: every adapter's final loss within 1e-3 (relative or absolute) and IT-state cosine
  >= 0.9999 at every layer.
* ``it_readout``: Q queries read through each of N LoRA adapters (a set's queries, or one
  dose step). Straightforward: every prompt whole, each row routed to its adapter. iclit: the
  query prompts' common start (the instruction) once per adapter, every row continuing its
  adapter's key/value cache. Agree: cosine >= 0.99999 at every layer for every prompt.
* ``crossed_pairs``: (query, demonstration set) pairs per second, all three arms, at S sets ×
  Q queries (default 30 × 10, k = 4). Crossed: one ICL prefix and one IT adapter per set,
  its Q queries read through them (``draw_sets``). One-query trials: the same S·Q pairs as
  S·Q trials of one query each (one adapter per pair), in chunks of min(10, S) trials of
  different sets, as a run computes them. Agree: every pair's anchor, ICL and IT states
  equal the one-query trial's (same demonstrations, same tuning seed) at cosine >= 0.99999.
  ``limit``: the ratio the token counts allow (training tokens × 3 for forward + backward,
  plus every read; the query prompts' common start is read once per model variant: per chunk
  for the anchors, per adapter for IT), beside it.
  ``--timed-chunks N``: only N of the one-query chunks, spread evenly, are computed, their time
  scaled to all chunks and ``agree`` checked on their pairs (an estimate, printed as such; for
  a slow machine, where the 300 one-query trials take hours).
* ``GFLOPS`` lines: the achieved rate of the capture pass (``icl_capture``) and of the tuning
  pass (``it_tuning``) on each side, FLOPs counted from the model's shapes and token counts
  (:mod:`iclit.engine.flops`: ≈ 2·params a token forward, forward + backward with frozen
  weights ≈ 4·params a token, plus causal attention; the LM head only at the answer rows), as a
  fraction of this machine's fp32 (or ``--dtype``) matmul peak measured in the same run
  (:func:`iclit.engine.flops.matmul_rate`, before and after the comparisons). The count is
  the useful work of the straightforward computation; iclit's fast path skips part of it, so
  its rate is an effective one.
* ``--e2e``: ``iclit compare --task sentiment --k 4 --resamples 30`` in a subprocess, model
  already cached: wall time and peak RSS (targets: < 180 s, < 4 GB on a 2-core CPU).

The in-process comparisons run with PyTorch's default CPU allocator setting (transparent huge
pages off; set ``THP_MEM_ALLOC_ENABLE=1`` to run both sides with them on); the e2e run gets
iclit's default (on).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

# Both sides of an in-process comparison share one allocator setting, read once per process.
# iclit turns transparent huge pages on for large CPU tensors (it helps full fine-tuning);
# here they stay at PyTorch's default (off) unless THP_MEM_ALLOC_ENABLE is set, so the
# straightforward side runs as plain PyTorch would. The e2e run gets iclit's own default.
THP_SETTING = os.environ.get("THP_MEM_ALLOC_ENABLE")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "0")

from iclit.core.batching import common_prefix_length  # noqa: E402
from iclit.engine.capture import capture, reference_last_states  # noqa: E402
from iclit.engine.flops import PassWork, attended_pairs, forward_flops, matmul_rate, training_flops  # noqa: E402
from iclit.models import load_model  # noqa: E402
from iclit.tasks import get_task  # noqa: E402
from iclit.tuning import TuningRecipe, default_train_tokens, encode_pairs, fit, lora_config, tuned_many  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Measure:
    seconds: float = 0.0
    peak_bytes: int = 0


@contextmanager
def measure(device: torch.device):
    """Wall time and peak memory (RSS sampled every 5 ms on CPU; CUDA allocator peak)."""
    m = Measure()
    stop = threading.Event()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        m.peak_bytes = rss_bytes()

        def poll():
            while not stop.is_set():
                m.peak_bytes = max(m.peak_bytes, rss_bytes())
                time.sleep(0.005)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
    start = time.perf_counter()
    try:
        yield m
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize()
            m.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            stop.set()
            thread.join()
        m.seconds = time.perf_counter() - start


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """This machine's matmul FLOP/s now (:func:`iclit.engine.flops.matmul_rate`; 2048² on a CPU)."""
    return matmul_rate(device, dtype, 2048 if device.type == "cpu" else 8192)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


FLOPS: dict[str, float] = {}
"""Comparison → FLOPs of its work (:mod:`iclit.engine.flops`), filled by the bench functions."""


def bench_icl(lm, task, k: int, queries: int, batch_size: int):
    ex = task.examples
    demos, qs = ex[:k], ex[k : k + queries]
    prompts = [task.template.icl_prompt(demos, q) for q in qs]
    prefixes = [task.template.icl_prefix(demos)] * len(prompts)
    tok, model, device = lm.tokenizer, lm.model, lm.device
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    n_tokens = sum(lengths)
    FLOPS["icl_capture"] = forward_flops(model, PassWork(tokens=n_tokens, attended=attended_pairs(lengths)))
    with measure(device) as ref:
        ref_states = []
        for p in prompts:
            enc = tok(p, return_tensors="pt").to(device)
            ref_states.append(reference_last_states(model, enc["input_ids"], enc["attention_mask"])[0].float().cpu())
        ref_states = torch.stack(ref_states)
    with measure(device) as fast:
        states = capture(model, tok, prompts, prefixes=prefixes, batch_size=batch_size).states
    cos = torch.nn.functional.cosine_similarity(ref_states.double(), states.double(), dim=-1)
    agree = bool(cos.min() >= 0.99999)
    detail = f"min cosine {cos.min().item():.7f} over {cos.numel()} (query, layer) pairs"
    return ref, fast, agree, detail, n_tokens


def bench_it(lm, task, n_adapters: int, k: int, epochs: int, batch_size: int):
    from peft import get_peft_model

    tok, model, device = lm.tokenizer, lm.model, lm.device
    ex = task.examples
    recipe = TuningRecipe(epochs=epochs)
    sets = [[task.template.training_pair(e) for e in ex[j * k : (j + 1) * k]] for j in range(n_adapters)]
    queries = [task.template.query(ex[n_adapters * k + j].input) for j in range(n_adapters)]
    seeds = list(range(1000, 1000 + n_adapters))
    encoded = [encode_pairs(tok, pairs) for pairs in sets]
    n_tokens = epochs * sum(b.attention_mask.sum().item() for b in encoded)
    lengths = [int(n) for b in encoded for n in b.attention_mask.sum(dim=1).tolist()]
    FLOPS["it_tuning"] = epochs * training_flops(
        model,
        PassWork(
            tokens=sum(lengths),
            attended=attended_pairs(lengths),
            head_rows=sum(int(b.targets.numel()) for b in encoded),
        ),
    )

    with measure(device) as ref:
        ref_loss, ref_states = [], []
        for pairs, seed, q in zip(sets, seeds, queries, strict=True):
            torch.manual_seed(seed)
            peft_model = get_peft_model(model, lora_config(recipe))
            params = [p for p in peft_model.parameters() if p.requires_grad]
            result = fit(peft_model, params, encode_pairs(tok, pairs).to(device), recipe, seed, reference=True)
            enc = tok(q, return_tensors="pt").to(device)
            ref_states.append(
                reference_last_states(peft_model, enc["input_ids"], enc["attention_mask"])[0].float().cpu()
            )
            ref_loss.append(result.final_loss)
            peft_model.unload()
            vars(model).pop("peft_config", None)
            model.requires_grad_(False)
        ref_states = torch.stack(ref_states)
    with measure(device) as fast:
        with tuned_many(model, tok, sets, recipe, seeds=seeds, max_tokens=default_train_tokens(device)) as (
            m,
            router,
            results,
        ):
            states = capture(
                m, tok, queries, batch_size=batch_size, before_batch=lambda rows: router.set(rows, device)
            ).states
    losses = [r.final_loss for r in results]
    loss_ok = all(abs(a - b) <= 1e-3 * max(1.0, abs(a)) for a, b in zip(ref_loss, losses, strict=True))
    cos = torch.nn.functional.cosine_similarity(ref_states.double(), states.double(), dim=-1)
    agree = bool(loss_ok and cos.min() >= 0.9999)
    detail = (
        f"min IT-state cosine {cos.min().item():.7f}; final losses ref "
        f"{max(ref_loss):.2e} max / iclit {max(losses):.2e} max; max |diff| "
        f"{max(abs(a - b) for a, b in zip(ref_loss, losses, strict=True)):.1e}"
    )
    return ref, fast, agree, detail, n_tokens


def bench_it_readout(lm, task, n_adapters: int, q: int, k: int, batch_size: int):
    """IT read-out: q queries through each of n adapters (as a set's queries, or a dose
    step's). Straightforward: every prompt whole, each row routed to its adapter. iclit: the
    prompts' common start (the instruction) once per adapter, each row continuing its own
    adapter's cache (``capture(variants=...)``)."""
    tok, model, device = lm.tokenizer, lm.model, lm.device
    ex = task.examples
    sets = [[task.template.training_pair(e) for e in ex[j * k : (j + 1) * k]] for j in range(n_adapters)]
    prompts = [task.template.query(e.input) for e in ex[n_adapters * k : n_adapters * k + q] for _ in range(n_adapters)]
    adapter = [j for _ in range(q) for j in range(n_adapters)]
    n_tokens = sum(len(ids) for ids in tok(prompts)["input_ids"])
    recipe = TuningRecipe(epochs=2, lr=1e-2)  # two steps: adapters that differ, not a full tuning
    with tuned_many(
        model, tok, sets, recipe, seeds=list(range(n_adapters)), max_tokens=default_train_tokens(device)
    ) as (m, router, _):

        def route(rows):
            return router.set([adapter[i] for i in rows], device)

        with measure(device) as ref:
            whole = capture(m, tok, prompts, batch_size=batch_size, before_batch=route).states
        with measure(device) as fast:
            shared = capture(
                m,
                tok,
                prompts,
                batch_size=batch_size,
                before_batch=route,
                prefixes=[task.template.icl_prefix(())] * len(prompts),
                variants=adapter,
            ).states
    cos = torch.nn.functional.cosine_similarity(whole.double(), shared.double(), dim=-1)
    agree = bool(cos.min() >= 0.99999)
    head = common_prefix_length(tok(prompts)["input_ids"])
    read = n_tokens - (len(prompts) - n_adapters) * head  # the shared start read once per adapter
    return (
        ref,
        fast,
        agree,
        (
            f"min state cosine {cos.min().item():.7f} over {cos.numel()} (prompt, layer) pairs; "
            f"token-count limit {n_tokens / read:.2f}x ({n_tokens} vs {read} tokens read)"
        ),
        n_tokens,
    )


def bench_crossed(lm, task, n_sets: int, q: int, k: int, epochs: int, batch_size: int, timed_chunks: int | None = None):
    from dataclasses import replace

    from iclit.engine.evaluate import evaluate
    from iclit.tasks import draw_sets

    recipe = TuningRecipe(epochs=epochs)
    draws = draw_sets(task, k, n_sets, q, seed=0)
    singles = [replace(r, index=r.set_id, set_index=None, slot=0) for r in draws]
    tok = lm.tokenizer
    lm.memo.clear()  # no anchor states carried over from another comparison
    # One-query trials, each with its own adapter, in chunks of up to 10 trials of 10 different
    # sets, as a run computes them (a chunk of one-query trials trains one adapter per trial);
    # slot j of every set, then slot j + 1, … (each trial keeps its set's tuning seed).
    order = sorted(range(len(singles)), key=lambda i: (draws[i].slot, draws[i].set_id))
    chunks = [order[i : i + min(10, n_sets)] for i in range(0, len(order), min(10, n_sets))]
    # --timed-chunks N: only N of the chunks (spread evenly) are computed and their time scaled
    # by len(chunks) / N — an estimate, for machines where 300 one-query trials take hours
    picked = (
        chunks
        if not timed_chunks or timed_chunks >= len(chunks)
        else [
            chunks[int(i)]
            for i in dict.fromkeys(round(x * (len(chunks) - 1) / max(1, timed_chunks - 1)) for x in range(timed_chunks))
        ]
    )
    with measure(lm.device) as ref:
        ref_states = {a: [None] * len(singles) for a in ("anchor", "icl", "it")}
        for rows in picked:
            out = evaluate(lm, task, [singles[i] for i in rows], recipe=recipe, seed=0, batch_size=batch_size)
            for a in ref_states:
                for j, i in enumerate(rows):
                    ref_states[a][i] = out.states[a][j]
    ref.seconds *= len(chunks) / len(picked)
    lm.memo.clear()
    with measure(lm.device) as fast:
        crossed = evaluate(lm, task, draws, recipe=recipe, seed=0, batch_size=batch_size).states
    checked = [i for rows in picked for i in rows]
    worst = min(
        float(
            torch.nn.functional.cosine_similarity(
                torch.stack([ref_states[a][i] for i in checked]).double(), crossed[a][checked].double(), dim=-1
            ).min()
        )
        for a in ref_states
    )
    agree = worst >= 0.99999

    # the token counts: training (forward + backward ≈ 3 forwards) and every read. The query
    # prompts' common start (the instruction, `head` tokens) is read once per group of prompts
    # on one model variant: the anchors of an evaluate call, a set's queries on its adapter.
    def n(texts) -> int:
        return sum(len(ids) for ids in tok(list(texts))["input_ids"])

    tpl = task.template
    train = {r.set_id: epochs * n(p + a for p, a in (tpl.training_pair(d) for d in r.demonstrations)) for r in draws}
    query = n(tpl.query(r.query.input) for r in draws)
    head = common_prefix_length(tok([tpl.query(r.query.input) for r in draws])["input_ids"])
    prefix = {r.set_id: n([tpl.icl_prefix(r.demonstrations)]) for r in draws}
    icl_query = n(tpl.icl_prompt(r.demonstrations, r.query) for r in draws) - sum(prefix[r.set_id] for r in draws)
    n_pairs, n_sets_drawn = len(draws), len(train)
    one = (
        sum(3 * train[r.set_id] + prefix[r.set_id] for r in draws)
        + icl_query
        + query
        - (n_pairs - len(chunks)) * head
        + query
    )  # anchors shared per chunk; one query per adapter
    sets = (
        sum(3 * t + prefix[s] for s, t in train.items())
        + icl_query
        + query
        - (n_pairs - 1) * head
        + query
        - (n_pairs - n_sets_drawn) * head
    )
    sampled = (
        ""
        if picked is chunks
        else (
            f"; one-query side: {len(picked)} of {len(chunks)} chunks timed "
            f"({len(checked)} pairs), time scaled x{len(chunks) / len(picked):.1f}"
        )
    )
    detail = (
        f"min state cosine {worst:.7f} (anchor, ICL, IT, every layer); token-count limit {one / sets:.1f}x; "
        f"{len(draws) / ref.seconds:.2f} vs {len(draws) / fast.seconds:.2f} pairs/s{sampled}"
    )
    return ref, fast, agree, detail, one, one / sets


def bench_e2e(model: str, resamples: int, out: Path) -> tuple[float, int, str]:
    cmd = [
        sys.executable,
        "-m",
        "iclit.cli",
        "compare",
        "--model",
        model,
        "--task",
        "sentiment",
        "--k",
        "4",
        "--resamples",
        str(resamples),
        "--seed",
        "0",
        "--out",
        str(out),
    ]
    # A small wrapper process starts the run and reports its children's peak RSS: a child
    # forked straight from this (large) process would count this process's pages in its
    # ru_maxrss until it execs.
    wrapper = (
        "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
    )
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if THP_SETTING is not None:
        env["THP_MEM_ALLOC_ENABLE"] = THP_SETTING
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"e2e compare failed:\n{proc.stderr[-3000:]}")
    peak = int(proc.stdout.strip().splitlines()[-1]) * 1024
    return seconds, peak, " ".join(cmd[3:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--icl-k", type=int, default=8)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--it-k", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=TuningRecipe.epochs)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--skip", nargs="*", default=[], choices=["icl", "it", "readout", "crossed"])
    ap.add_argument("--readout-queries", type=int, default=30, help="it_readout: queries per adapter")
    ap.add_argument("--sets", type=int, default=30, help="crossed_pairs: demonstration sets")
    ap.add_argument("--queries-per-set", type=int, default=10, help="crossed_pairs: queries per set")
    ap.add_argument(
        "--timed-chunks",
        type=int,
        default=None,
        help="crossed_pairs: compute only this many of the one-query chunks (spread evenly) and scale their "
        "time (an estimate; default: all)",
    )
    ap.add_argument("--e2e", action="store_true", help="also time `iclit compare --k 4 --resamples 30`")
    ap.add_argument("--resamples", type=int, default=30)
    ap.add_argument("--e2e-out", type=Path, default=Path("runs/bench-e2e"), help="output directory of the e2e run")
    args = ap.parse_args()

    torch.manual_seed(0)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    peaks = [matmul_peak(lm.device, lm.dtype)]
    task = get_task("sentiment")
    print(
        f"model {args.model} on {lm.device} ({str(lm.dtype).replace('torch.', '')}), "
        f"torch threads {torch.get_num_threads()}, "
        f"THP_MEM_ALLOC_ENABLE={os.environ['THP_MEM_ALLOC_ENABLE']}"
    )
    rows = []
    if "icl" not in args.skip:
        rows.append(
            (
                "icl_capture",
                f"k={args.icl_k}, {args.queries} queries",
                *bench_icl(lm, task, args.icl_k, args.queries, args.batch_size),
            )
        )
    if "it" not in args.skip:
        rows.append(
            (
                "it_tuning",
                f"{args.adapters} adapters, k={args.it_k}, {args.epochs} epochs",
                *bench_it(lm, task, args.adapters, args.it_k, args.epochs, args.batch_size),
            )
        )
    if "readout" not in args.skip:
        rows.append(
            (
                "it_readout",
                f"{args.adapters} adapters x {args.readout_queries} queries",
                *bench_it_readout(lm, task, args.adapters, args.readout_queries, args.it_k, args.batch_size),
            )
        )
    limits = {}
    if "crossed" not in args.skip:
        ref, fast, agree, detail, n_tokens, limits["crossed_pairs"] = bench_crossed(
            lm, task, args.sets, args.queries_per_set, args.it_k, args.epochs, args.batch_size, args.timed_chunks
        )
        rows.append(
            (
                "crossed_pairs",
                f"{args.sets} sets x {args.queries_per_set} queries, k={args.it_k}",
                ref,
                fast,
                agree,
                detail,
                n_tokens,
            )
        )
    print()
    print(
        f"{'comparison':<12} {'work':<32} {'straightforward':>16} {'iclit':>9} {'speedup':>8} "
        f"{'peak mem (ref / iclit)':>26}  agree"
    )
    for name, work, ref, fast, agree, detail, n_tokens in rows:
        print(
            f"{name:<12} {work:<32} {ref.seconds:>15.1f}s {fast.seconds:>8.1f}s {ref.seconds / fast.seconds:>7.1f}x "
            f"{gib(ref.peak_bytes) + ' / ' + gib(fast.peak_bytes):>26}  {agree}"
        )
        print(
            f"{'':<12} {detail}; {n_tokens} input tokens; "
            f"{n_tokens / ref.seconds:.0f} vs {n_tokens / fast.seconds:.0f} tokens/s"
        )
    peaks.append(matmul_peak(lm.device, lm.dtype))
    peak = max(peaks)
    print(
        f"\nmeasured {str(lm.dtype).replace('torch.', '')} matmul peak on {lm.device}: "
        f"{' / '.join(f'{p / 1e9:.1f}' for p in peaks)} GFLOP/s "
        "(before / after; the rates below are against the higher)"
    )
    for name, _work, ref, fast, _agree, _detail, _n_tokens in rows:
        if name in FLOPS:
            f = FLOPS[name]
            print(
                f"GFLOPS name={name} work_gflop={f / 1e9:.1f} straightforward={f / ref.seconds / 1e9:.1f} "
                f"iclit={f / fast.seconds / 1e9:.1f} peak={peak / 1e9:.1f} "
                f"fraction_of_peak={f / fast.seconds / peak:.3f} (straightforward {f / ref.seconds / peak:.3f})"
            )
    for name, _work, ref, fast, agree, _detail, _n_tokens in rows:
        limit = f" limit={limits[name]:.2f}" if name in limits else ""
        print(f"RATIO name={name} value={ref.seconds / fast.seconds:.2f} agree={str(agree).lower()}{limit}")
    if args.e2e:
        seconds, peak, cmd = bench_e2e(args.model, args.resamples, args.e2e_out)
        print(f"\ne2e: `{cmd}`: {seconds:.1f} s wall, peak RSS {gib(peak)} (targets < 180 s, < 4 GiB)")


if __name__ == "__main__":
    main()
