"""``iclit run --backend slurm``: one job array over a run's shards, submitted with submitit.

The driver (the process that runs ``iclit run``, e.g. on a login node) holds the run
directory's lock, submits one job per shard (:func:`run_shard`: ``iclit run --shard I/N``
in Python), waits for them with a progress bar over the shards, resubmits a shard whose job
failed (at most ``max_retries`` times; a resubmitted shard resumes from the chunks it already
stored), and merges the shards into the run (:func:`~iclit.experiments.shards.merge_shards`).
With ``wait=False`` it only submits; ``iclit merge RUN`` (or ``iclit results RUN``) merges
later. submitit's logs and pickles go to ``RUN/slurm/``.

``cluster``: ``"slurm"`` (sbatch; the default) or ``"local"`` (submitit's LocalExecutor: each
job a process on this machine; how the tests run it).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iclit.experiments.shards import MergeSummary, merge_shards
from iclit.experiments.spec import ExperimentSpec
from iclit.experiments.spec.cluster import SlurmOptions

__all__ = ["ShardJobsFailed", "LaunchSummary", "run_shard", "make_executor", "launch_shards"]


class ShardJobsFailed(RuntimeError):
    """Shard jobs that failed more than ``max_retries`` times (named, with their logs)."""


def run_shard(spec_yaml: str, out: str, index: int, count: int) -> dict[str, Any]:
    """The job of one shard: run shard ``index`` of ``count`` of the spec into ``out``; returns
    what it did (trials planned, already stored, computed)."""
    from iclit.experiments.runner import run_experiment
    from iclit.experiments.spec import loads_spec

    summary = run_experiment(loads_spec(spec_yaml, source=f"{out}/spec.yaml"), out, shard=(index, count))
    return {"shard": index, "planned": summary.planned, "already": summary.already_done, "computed": summary.computed}


def make_executor(folder: Path, options: SlurmOptions, *, name: str, cluster: str | None = None) -> Any:
    """A submitit executor for the shard jobs, with the job settings of ``options``."""
    try:
        import submitit
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("the SLURM launcher needs submitit: pip install 'iclit[slurm]'") from e

    cluster = cluster or "slurm"
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise RuntimeError(
            "--backend slurm: no sbatch on this machine (run it on a SLURM login node; "
            "--slurm-cluster local runs the shard jobs as processes here)"
        )
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=cluster)
    params: dict[str, Any] = {
        "name": f"iclit-{name}",
        "timeout_min": options.time_min,
        "cpus_per_task": options.cpus_per_task,
        "gpus_per_node": options.gpus_per_task,
        "tasks_per_node": 1,
        "nodes": 1,
    }
    if options.mem_gb is not None:
        params["mem_gb"] = options.mem_gb
    slurm = {
        "slurm_partition": options.partition,
        "slurm_account": options.account,
        "slurm_array_parallelism": options.array_parallelism,
        "slurm_constraint": options.constraint,
    }
    if executor.cluster == "slurm":
        params.update({k: v for k, v in slurm.items() if v is not None})
    executor.update_parameters(**params)
    return executor


@dataclass
class LaunchSummary:
    """jobs: the job id of each shard (the last submission); resubmitted: shard → times;
    merge: the merge (None with ``wait=False``)."""

    out: Path
    shards: int
    jobs: dict[int, str]
    resubmitted: dict[int, int] = field(default_factory=dict)
    merge: MergeSummary | None = None
    results: dict[int, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        ids = sorted(set(self.jobs.values()))
        first = f"{self.out}: {self.shards} shard jobs ({', '.join(ids[:4])}{', …' if len(ids) > 4 else ''})"
        if self.resubmitted:
            first += f", {sum(self.resubmitted.values())} resubmitted after a failure"
        if self.merge is None:
            return first + f" submitted; when they are done: `iclit merge {self.out}`"
        return first + f" done; {self.merge}"


def _job_log(job: Any) -> str:
    try:
        return str(job.paths.stderr)
    except Exception:  # noqa: BLE001 - only for the message
        return "its log"


def launch_shards(
    spec: ExperimentSpec,
    out: str | Path,
    *,
    options: SlurmOptions,
    max_retries: int = 2,
    wait: bool = True,
    cluster: str | None = None,
    progress: bool = False,
    poll_s: float = 10.0,
    job: Callable[..., Any] = run_shard,
    executor: Any | None = None,
) -> LaunchSummary:
    """Submit one job per shard of ``spec`` into ``out``; wait, resubmit failures, merge.

    The caller holds ``out``'s lock (the merge does not take it again). ``job``: the
    function each job runs (``run_shard``; tests wrap it); ``executor``: a submitit executor
    to use instead of :func:`make_executor`'s. Raises :class:`ShardJobsFailed` naming the
    shards whose jobs failed ``max_retries + 1`` times (the others' trials are merged first).
    """
    out = Path(out)
    count = options.shards
    text = spec.to_yaml()
    executor = executor or make_executor(out / "slurm", options, name=spec.name, cluster=cluster)
    jobs: dict[int, Any] = {}
    with executor.batch():
        for i in range(count):
            jobs[i] = executor.submit(job, text, str(out), i, count)
    summary = LaunchSummary(out, count, {i: str(j.job_id) for i, j in jobs.items()})
    if not wait:
        return summary
    failed: dict[int, str] = {}
    bar = _Bar(progress, count)
    try:
        pending = dict(jobs)
        while pending:
            for i, j in list(pending.items()):
                if not j.done():
                    continue
                del pending[i]
                error = j.exception()
                if error is None:
                    summary.results[i] = j.result()
                    bar.advance()
                    continue
                tries = summary.resubmitted.get(i, 0)
                if tries >= max_retries:
                    failed[i] = (
                        f"shard {i}/{count} (job {j.job_id}, log {_job_log(j)}): {str(error).strip().splitlines()[-1:]}"
                    )
                    bar.advance()
                    continue
                summary.resubmitted[i] = tries + 1
                pending[i] = executor.submit(job, text, str(out), i, count)
                summary.jobs[i] = str(pending[i].job_id)
            if pending:
                time.sleep(poll_s)
    finally:
        bar.close()
    summary.merge = merge_shards(out, lock=False)
    if failed:
        raise ShardJobsFailed(
            f"{len(failed)} of {count} shard jobs failed after {max_retries} resubmissions "
            f"(the other shards are merged; rerun to retry these): " + "; ".join(failed.values())
        )
    return summary


class _Bar:
    """A progress bar over shards done (stderr), or nothing."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("shards"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self.bar.start()
            self.task = self.bar.add_task("shards", total=total)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
