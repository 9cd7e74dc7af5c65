"""Run the whole paper suite (configs/paper) into one folder, timed, with every report.

    python scripts/run_paper.py                    # → runs/paper/<spec>/, runs/paper/suite.json
    python scripts/run_paper.py --only main dose   # some specs only
    python scripts/run_paper.py --suite causal     # the causal tests and the harder tasks (make causal-tasks)
    python scripts/run_paper.py --suite ladder     # the Qwen2.5-Coder size ladder (make paper-ladder)
    python scripts/run_paper.py --backend ray --workers 2 --worker-threads 1   # two one-thread actors: make paper

Each spec is ``iclit run configs/paper/<spec>.yaml --out runs/paper/<spec>`` with ``--reuse``
of every run directory before it, so a cell that several specs share (the base cell of the
one-factor experiments) is computed once; then ``iclit report`` and ``iclit results
--effects``. Everything runs in one process, so each model is loaded once (and dropped after
the last spec that reads it: :func:`iclit.experiments.workers.release_models`); with
``--backend ray`` each spec's chunks go to Ray actors instead, one
:class:`~iclit.experiments.raypool.RayPool` for the whole suite (Ray starts once, each actor
keeps the models it loaded until no later spec reads them). On the 2-core machine, two
one-thread processes computed 1.25x the chunks per second of one two-thread process, with
equal results (benchmarks/results/runs.csv). Rerunning
resumes: finished trials are never recomputed. ``suite.json`` records, per spec, the trials
computed and reused, the seconds taken (with the report, unless it ran behind) and the
report's own (``report_seconds``), when
it finished and the machine's fp32 matmul speed just before it (written after each spec, so a
suite stopped early keeps them), and every invocation (its specs, wall time and matmul speed
before and after). A reused cell's whole-cell tables come along
with its trials (:func:`iclit.analysis.cache.copy_entries`), so each cell is analysed once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import torch

from iclit.analysis.cache import copy_entries
from iclit.engine.flops import matmul_rate
from iclit.experiments import load_spec, run_experiment
from iclit.experiments.raypool import ALLOCATORS, RayOptions, RayPool, allocator_preload
from iclit.experiments.runner import experiment_versions
from iclit.experiments.workers import release_models
from iclit.report import write_report

ROOT = Path(__file__).resolve().parents[1]
ORDER = [
    "main",
    "label_control",
    "layers",
    "lora_vs_full",  # computes the one-factor specs' base cell, whose base reads its full-FT cell shares
    "dose",  # next, while the workers still hold those base reads: none of its 12 chunks reads the base model
    "cross_task",
    "wrong_labels",
    "instruction",
    "models",
    "similarity",
    "n_demos",
    "translation",
]  # otherwise the costliest last: a suite stopped early has the most cells
EXTRA = ["causal", "tasks_antonyms", "tasks_translation_words", "tasks_addition", "tasks_reverse_words"]
LADDER = ["ladder"]
SUITES = {"paper": ORDER, "causal": EXTRA, "ladder": LADDER}  # each timed apart: make paper, causal-tasks, paper-ladder
RUN_DIR = {"layers": "main"}  # layers.yaml plans exactly the main cell: same run directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "paper")
    ap.add_argument("--suite", choices=sorted(SUITES), default="paper", help="which list of specs")
    ap.add_argument("--only", nargs="*", choices=ORDER + EXTRA + LADDER, help="run only these specs (in suite order)")
    ap.add_argument("--backend", choices=["local", "ray"], default="local", help="where each spec's chunks run")
    ap.add_argument("--workers", type=int, default=None, help="ray: actors (default: one per CPU)")
    ap.add_argument("--worker-threads", type=int, default=1, help="ray: torch threads per actor")
    ap.add_argument(
        "--allocator",
        choices=list(ALLOCATORS),
        default="auto",
        help="ray: the actors' malloc (auto: tcmalloc where the machine has it; allocator_preload)",
    )
    ap.add_argument(
        "--reports",
        choices=["inline", "behind"],
        default="inline",
        help="each spec's report before the next spec starts, or behind it in a background process at nice 19",
    )
    args = ap.parse_args()
    try:
        malloc = allocator_preload(args.allocator) if args.backend == "ray" else None
    except ValueError as e:
        raise SystemExit(f"run_paper.py: {e}") from None
    pool = RayPool(workers=args.workers) if args.backend == "ray" else None  # one Ray, its actors kept across specs
    ray = (
        {}
        if pool is None
        else {"workers": args.workers, "ray_options": RayOptions(threads=args.worker_threads, allocator=args.allocator)}
    )
    order = SUITES[args.suite]
    names = [n for n in order if not args.only or n in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "suite.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {"specs": {}}
    started = time.perf_counter()
    done: list[Path] = [
        args.out / RUN_DIR.get(n, n) for n in order if (args.out / RUN_DIR.get(n, n) / "results.sqlite").exists()
    ]
    specs = {name: load_spec(ROOT / "configs" / "paper" / f"{name}.yaml") for name in names}
    rates: list[int] = []  # the machine's matmul speed before each spec, then after the last
    behind = Reports() if args.reports == "behind" else None
    with pool or contextlib.nullcontext(), behind or contextlib.nullcontext():
        for i, name in enumerate(names):
            out = args.out / RUN_DIR.get(name, name)
            rates.append(gflops())
            t0 = time.perf_counter()
            sources = [d for d in dict.fromkeys(done) if d != out]
            summary = run_experiment(
                specs[name], out, progress=True, reuse=sources, backend=args.backend, ray_pool=pool, **ray
            )
            # the models no later spec reads are dropped (SmolLM2 and the control model after `models`),
            # here and in the Ray actors
            keep = {str(m) for later in names[i + 1 :] for m in specs[later].factor_values("model")}
            release_models(keep)
            if pool is not None:
                pool.release_models(keep)
            trials_done = time.perf_counter()
            copied = [s for s in sources if summary.reused]  # the shared cells' analysis tables, computed once
            if behind is None:
                for source in copied:
                    copy_entries(source, out)
                write_report(out)
            else:
                behind.submit(name, copied, out)
            seconds = time.perf_counter() - t0
            print(summary, flush=True)
            log["specs"][name] = {
                "out": str(out.relative_to(args.out)),
                "planned": summary.planned,
                "already_stored": summary.already_done,
                "computed": summary.computed,
                "reused": summary.reused,
                "seconds": round(seconds, 1),
                "report_seconds": round(time.perf_counter() - trials_done, 1) if behind is None else None,
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                "matmul_gflops_before": rates[-1],
            }
            log_path.write_text(json.dumps(log, indent=2) + "\n")  # a suite stopped early keeps its specs' times
            if out not in done:
                done.append(out)
        if behind is not None:
            for name, report_seconds in behind.wait().items():  # the reports still queued finish here
                log["specs"][name]["report_seconds"] = report_seconds
                log["specs"][name]["report"] = "behind"
    total = time.perf_counter() - started
    rates.append(gflops())
    record = {
        "suite": args.suite,
        "specs": names,
        "seconds": round(total, 1),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "matmul_gflops": [rates[0], rates[-1]],
        "backend": args.backend
        if args.backend == "local"
        else f"ray: {args.workers or 'one per CPU'} x {args.worker_threads} threads, malloc {malloc or 'system'}",
        "versions": experiment_versions(),
    }
    # every invocation, in order (a spec rerun with --only does not hide the suite run before it)
    log.setdefault("invocations", [log["last_invocation"]] if "last_invocation" in log else []).append(record)
    log.setdefault("last_invocation_by_suite", {})[args.suite] = log["last_invocation"] = record
    log_path.write_text(json.dumps(log, indent=2) + "\n")
    print(
        f"{args.suite} suite: {len(names)} specs in {total / 60:.1f} min → {args.out} "
        f"(matmul {rates[0]} GFLOP/s before, {rates[-1]} after: fp32 2048², {torch.get_num_threads()} threads)"
    )


class Reports:
    """The specs' reports in one background process at nice 19, one after another in the order
    submitted (a spec's copied analysis tables, then its report), so a spec that reuses an earlier
    one's cell finds that cell's tables already written."""

    def __init__(self) -> None:
        self.executor = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=os.nice, initargs=(19,)
        )
        self.futures: dict[str, Future[Path]] = {}
        self.lock = threading.Lock()
        self.last_done = 0.0
        self.seconds: dict[str, float] = {}

    def __enter__(self) -> Reports:
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        self.executor.shutdown(wait=True, cancel_futures=kind is not None)  # interrupted: only the running one ends

    def submit(self, name: str, sources: list[Path], out: Path) -> None:
        submitted = time.perf_counter()
        for source in sources:
            self.executor.submit(copy_entries, source, out)
        future = self.executor.submit(write_report, out)

        def timed(_: Future[Path]) -> None:
            # jobs run one at a time: this one began at its submission or at the previous one's end
            with self.lock:
                now = time.perf_counter()
                self.seconds[name] = round(now - max(submitted, self.last_done), 1)
                self.last_done = now

        future.add_done_callback(timed)
        self.futures[name] = future

    def wait(self) -> dict[str, float]:
        """Wait for every report (re-raising the first that failed); each one's seconds, by spec."""
        for future in self.futures.values():
            future.result()
        with self.lock:
            return dict(self.seconds)


def gflops() -> int:
    """The machine's fp32 matmul speed now (:func:`iclit.engine.flops.matmul_rate`), GFLOP/s."""
    return round(matmul_rate() / 1e9)


if __name__ == "__main__":
    main()
