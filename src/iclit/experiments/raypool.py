"""Computing chunks on Ray actors: resources per actor, and chunks retried when an actor dies.

Each actor (:class:`~iclit.experiments.workers.ChunkWorker`) loads the model once and computes
one chunk at a time. What it asks Ray for comes from :func:`actor_options` (a pure function,
tested without Ray): ``worker_threads`` CPUs (and as many torch threads), and on a GPU run
``1 / actors_per_gpu`` of a GPU, so several small-model actors share one GPU.

Faults: an actor that dies while computing a chunk (its process killed, its node lost) is
replaced by a new actor and the chunk is given to the next free actor, at most
``max_retries`` times per chunk; then :class:`ChunkFailed` names the chunk. The driver stores
a chunk only when its whole output has come back, once: finished chunks are never redone
or stored twice. An error raised by the engine itself (a bug, a prompt too long) is not
retried; it is raised as is.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from iclit.experiments.spec import ExperimentSpec
from iclit.experiments.workers import ChunkJob, ChunkOutput, ChunkWorker

__all__ = ["RayOptions", "ChunkFailed", "actor_options", "actors_per_gpu_for", "ray_options_of", "run_ray"]

log = logging.getLogger(__name__)


class ChunkFailed(RuntimeError):
    """A chunk whose workers died ``max_retries + 1`` times (named in the message)."""


@dataclass(frozen=True)
class RayOptions:
    """gpu: actors ask for GPUs (None: when the spec's device is cuda, or it is unset and the
    cluster has GPUs); actors_per_gpu: actors sharing one GPU (None: planned, see
    :func:`actors_per_gpu_for`, else 1); threads: torch threads and CPUs per actor;
    max_retries: retries per chunk after its actor died."""

    gpu: bool | None = None
    actors_per_gpu: int | None = None
    threads: int = 1
    max_retries: int = 2


def ray_options_of(
    spec: ExperimentSpec,
    *,
    actors_per_gpu: int | None = None,
    threads: int | None = None,
    max_retries: int | None = None,
    gpu: bool | None = None,
) -> RayOptions:
    """The spec's ``cluster`` section, with the given values (CLI flags) laid over it."""
    c = spec.cluster
    return RayOptions(
        gpu=gpu,
        actors_per_gpu=actors_per_gpu if actors_per_gpu is not None else (c.actors_per_gpu if c else None),
        threads=threads if threads is not None else (c.worker_threads if c else 1),
        max_retries=max_retries if max_retries is not None else (c.max_retries if c else 2),
    )


def actors_per_gpu_for(gpu_bytes: int, model_bytes: int, budget_bytes: int) -> int:
    """Actors that fit one GPU of ``gpu_bytes``: each holds its model's weights and plans
    ``budget_bytes`` for the batched IT path (``memory_budget``); 90% of the GPU is used."""
    per_actor = max(1, model_bytes + budget_bytes)
    return max(1, int(gpu_bytes * 0.9) // per_actor)


def actor_options(*, gpu: bool, actors_per_gpu: int = 1, threads: int = 1) -> dict[str, Any]:
    """The keyword arguments of ``ActorClass.options(...)`` for one chunk worker.

    >>> actor_options(gpu=True, actors_per_gpu=4, threads=2)
    {'num_cpus': 2, 'num_gpus': 0.25}
    >>> actor_options(gpu=False, threads=1)
    {'num_cpus': 1, 'num_gpus': 0}
    """
    if actors_per_gpu < 1 or threads < 1:
        raise ValueError(f"actors_per_gpu and threads must be >= 1, not {actors_per_gpu} and {threads}")
    return {"num_cpus": threads, "num_gpus": round(1.0 / actors_per_gpu, 6) if gpu else 0}


def _uses_gpu(spec: ExperimentSpec, options: RayOptions, cluster_gpus: float) -> bool:
    if options.gpu is not None:
        return options.gpu
    if spec.device is not None:
        return spec.device.startswith("cuda")
    return cluster_gpus > 0


def _planned_actors_per_gpu(spec: ExperimentSpec, options: RayOptions, model: str) -> int:
    """options.actors_per_gpu, else from memory_budget, the model's size and this machine's
    GPU when all are known, else 1."""
    if options.actors_per_gpu is not None:
        return options.actors_per_gpu
    if spec.memory_budget is None:
        return 1
    try:
        import torch

        if not torch.cuda.is_available():
            return 1
        total = int(torch.cuda.get_device_properties(0).total_memory)
        from iclit.experiments.workers import model_preview
        from iclit.schema import parse_bytes

        preview = model_preview(model)
        params = _parameters(
            getattr(preview, "config", None) or getattr(getattr(preview, "model", None), "config", None)
        )
    except Exception:  # noqa: BLE001 - no plan: one actor per GPU
        return 1
    if not params:
        return 1
    width = 2 if (spec.dtype or "bfloat16") != "float32" else 4
    return actors_per_gpu_for(total, params * width, parse_bytes(spec.memory_budget))


def _parameters(config: Any) -> int:
    """About how many parameters a decoder of this config has (embeddings, attention, MLP)."""
    config = getattr(config, "text_config", None) or config
    d = int(getattr(config, "hidden_size", 0) or 0)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    ff = int(getattr(config, "intermediate_size", 0) or 4 * d)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    return vocab * d + layers * (4 * d * d + 3 * d * ff)


def _describe(job: ChunkJob) -> str:
    indices = [d.index for d in job.draws]
    span = f"resamples {min(indices)}-{max(indices)}" if indices else "no resamples"
    first = job.keys[0][:12] if job.keys else "-"
    return f"chunk of cell {job.cell_key[:12]} (seed {job.seed}, {span}, first trial {first})"


def run_ray(
    jobs: Sequence[ChunkJob],
    spec: ExperimentSpec,
    *,
    address: str | None,
    workers: int | None,
    options: RayOptions | None = None,
) -> Iterator[tuple[ChunkJob, ChunkOutput]]:
    """Compute ``jobs`` on Ray actors; yields (job, output) once per job as chunks finish.

    ``address``: an existing cluster, else a local one with ``workers`` CPUs (default: all).
    Actors: ``workers``, else as many as the cluster's CPUs (or GPU shares) allow, at most one
    per job. Raises :class:`ChunkFailed` when a chunk's actors died too often.
    """
    if not jobs:
        return
    try:
        import ray
        from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("the Ray backend needs ray: pip install 'iclit[ray]'") from e

    options = options or ray_options_of(spec)
    own = not ray.is_initialized()
    if own:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=workers or os.cpu_count() or 1, **kwargs)
    actors: list[Any] = []
    try:
        resources = ray.cluster_resources()
        first = jobs[0]
        gpu = _uses_gpu(spec, options, float(resources.get("GPU", 0)))
        per_gpu = _planned_actors_per_gpu(spec, options, first.model) if gpu else 1
        opts = actor_options(gpu=gpu, actors_per_gpu=per_gpu, threads=options.threads)
        fit = int(resources.get("GPU", 0) * per_gpu) if gpu else int(resources.get("CPU", 1) // options.threads)
        n = max(1, min(workers or max(1, fit), len(jobs)))
        log.info("Ray: %d actors, each %s", n, opts)
        Actor = ray.remote(ChunkWorker)

        def start() -> Any:
            actor = Actor.options(**opts).remote((first.model, spec.device, spec.dtype), options.threads)
            actors.append(actor)
            return actor

        idle = [start() for _ in range(n)]
        queue: deque[ChunkJob] = deque(jobs)
        tries: dict[tuple[str, ...], int] = {}
        running: dict[Any, tuple[Any, ChunkJob]] = {}
        while queue or running:
            while queue and idle:
                actor, job = idle.pop(), queue.popleft()
                tries[job.keys] = tries.get(job.keys, 0) + 1
                running[actor.run.remote(job)] = (actor, job)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, job = running.pop(ref)
            try:
                output = ray.get(ref)
            except RayTaskError as e:  # the engine raised: not a fault of the worker
                raise e.as_instanceof_cause() from None
            except (RayActorError, WorkerCrashedError) as e:
                _kill(ray, actor)
                if tries[job.keys] > options.max_retries:
                    n = tries[job.keys]
                    raise ChunkFailed(
                        f"{_describe(job)}: its worker died {n} time{'s' if n != 1 else ''} "
                        f"(max_retries {options.max_retries}); last: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}"
                    ) from e
                log.warning("%s: its worker died (%s); retrying on another worker", _describe(job), type(e).__name__)
                queue.appendleft(job)
                idle.append(start())
                continue
            idle.append(actor)
            yield job, output
    finally:
        for actor in actors:
            _kill(ray, actor)
        if own:
            ray.shutdown()


def _kill(ray: Any, actor: Any) -> None:
    try:
        ray.kill(actor)
    except Exception:  # noqa: BLE001 - best effort
        pass
