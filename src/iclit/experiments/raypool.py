"""Computing chunks on Ray actors: resources per actor, and chunks retried when an actor dies.

Each actor (:class:`~iclit.experiments.workers.ChunkWorker`) loads the model once and computes
one chunk at a time. What it asks Ray for comes from :func:`actor_options` (a pure function,
tested without Ray): ``worker_threads`` CPUs (and as many torch threads), and on a GPU run
``1 / actors_per_gpu`` of a GPU, so several small-model actors share one GPU. A
:class:`RayPool` keeps the actors (and the models they loaded) from one run to the next, and
sends a chunk to the actor that holds its base-model reads (cells that differ only in the IT
recipe, :attr:`~iclit.experiments.workers.ChunkJob.base_key`).

Faults: an actor that dies while computing a chunk (its process killed, its node lost) is
replaced by a new actor and the chunk is given to the next free actor, at most
``max_retries`` times per chunk; then :class:`ChunkFailed` names the chunk. The driver stores
a chunk only when its whole output has come back, once: finished chunks are never redone
or stored twice. An error raised by the engine itself (a bug, a prompt too long) is not
retried; it is raised as is.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from iclit.experiments.spec import ExperimentSpec
from iclit.experiments.workers import BASE_READOUTS_KEPT, ChunkJob, ChunkOutput, ChunkWorker

__all__ = [
    "RayOptions",
    "RayPool",
    "ChunkFailed",
    "actor_options",
    "actors_per_gpu_for",
    "ALLOCATORS",
    "allocator_preload",
    "ray_options_of",
    "run_ray",
]

log = logging.getLogger(__name__)


class ChunkFailed(RuntimeError):
    """A chunk whose workers died ``max_retries + 1`` times (named in the message)."""


@dataclass(frozen=True)
class RayOptions:
    """gpu: actors ask for GPUs (None: when the spec's device is cuda, or it is unset and the
    cluster has GPUs); actors_per_gpu: actors sharing one GPU (None: planned, see
    :func:`actors_per_gpu_for`, else 1); threads: torch threads and CPUs per actor;
    max_retries: retries per chunk after its actor died; allocator: the actors' ``malloc``
    (:func:`allocator_preload`: ``"auto"``, ``"tcmalloc"`` or ``"system"``)."""

    gpu: bool | None = None
    actors_per_gpu: int | None = None
    threads: int = 1
    max_retries: int = 2
    allocator: str = "auto"


ALLOCATORS = ("auto", "tcmalloc", "system")


def allocator_preload(allocator: str = "auto") -> str | None:
    """The library an actor's process preloads (``LD_PRELOAD``) as its ``malloc``, or None for
    the C library's own.

    ``"tcmalloc"``: gperftools' tcmalloc (``libtcmalloc_minimal``, Debian's
    ``libtcmalloc-minimal4``), an error where the machine lacks it; ``"auto"``: tcmalloc where
    it is found on Linux, else the system's; ``"system"``: the C library's. glibc hands large
    freed blocks back to the kernel, so a process that allocates and frees gigabytes per
    trial (full fine-tuning copies the model and its optimiser state for every set) pays for
    fresh zeroed pages again and again in kernel time; tcmalloc keeps them. The same numbers
    (both align tensors as PyTorch asks), about the same peak RSS per process, though the pages
    kept count as in use (``make paper``'s memory in use peaked 1.5 GiB higher), and on the
    2-core reference machine one full fine-tuning of Gemma-3-270M 1.29x as fast
    (``benchmarks/allocator.py``).
    """
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {', '.join(ALLOCATORS)}, not {allocator!r}")
    if allocator == "system" or not sys.platform.startswith("linux"):
        if allocator == "tcmalloc":
            raise ValueError("allocator 'tcmalloc' preloads a shared library, which needs Linux")
        return None
    found = ctypes.util.find_library("tcmalloc_minimal")
    if found is None and allocator == "tcmalloc":
        raise ValueError(
            "allocator 'tcmalloc': libtcmalloc_minimal was not found on this machine "
            "(Debian/Ubuntu: apt install libtcmalloc-minimal4); use 'auto' or 'system'"
        )
    return found


def ray_options_of(
    spec: ExperimentSpec,
    *,
    actors_per_gpu: int | None = None,
    threads: int | None = None,
    max_retries: int | None = None,
    gpu: bool | None = None,
    allocator: str | None = None,
) -> RayOptions:
    """The spec's ``cluster`` section, with the given values (CLI flags) laid over it; an
    unknown or missing ``allocator`` raises ValueError here, before anything runs."""
    c = spec.cluster
    allocator = allocator or "auto"
    allocator_preload(allocator)
    return RayOptions(
        gpu=gpu,
        actors_per_gpu=actors_per_gpu if actors_per_gpu is not None else (c.actors_per_gpu if c else None),
        threads=threads if threads is not None else (c.worker_threads if c else 1),
        max_retries=max_retries if max_retries is not None else (c.max_retries if c else 2),
        allocator=allocator,
    )


def actors_per_gpu_for(gpu_bytes: int, model_bytes: int, budget_bytes: int) -> int:
    """Actors that fit one GPU of ``gpu_bytes``: each holds its model's weights and plans
    ``budget_bytes`` for the batched IT path (``memory_budget``); 90% of the GPU is used."""
    per_actor = max(1, model_bytes + budget_bytes)
    return max(1, int(gpu_bytes * 0.9) // per_actor)


def actor_options(
    *, gpu: bool, actors_per_gpu: int = 1, threads: int = 1, preload: str | None = None
) -> dict[str, Any]:
    """The keyword arguments of ``ActorClass.options(...)`` for one chunk worker; ``preload``
    (:func:`allocator_preload`) goes into the actor's environment as ``LD_PRELOAD``.

    >>> actor_options(gpu=True, actors_per_gpu=4, threads=2)
    {'num_cpus': 2, 'num_gpus': 0.25}
    >>> actor_options(gpu=False, threads=1, preload="libtcmalloc_minimal.so.4")
    {'num_cpus': 1, 'num_gpus': 0, 'runtime_env': {'env_vars': {'LD_PRELOAD': 'libtcmalloc_minimal.so.4'}}}
    """
    if actors_per_gpu < 1 or threads < 1:
        raise ValueError(f"actors_per_gpu and threads must be >= 1, not {actors_per_gpu} and {threads}")
    options: dict[str, Any] = {"num_cpus": threads, "num_gpus": round(1.0 / actors_per_gpu, 6) if gpu else 0}
    if preload:
        options["runtime_env"] = {"env_vars": {"LD_PRELOAD": preload}}
    return options


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


class RayPool:
    """Ray actors kept from one run to the next (a suite of specs: ``run_experiment(...,
    ray_pool=pool)``), so the runtime starts once and each actor keeps the models it loaded.

    ``address``: an existing cluster, else a local one with ``workers`` CPUs (default: all);
    Ray is started at the first run that needs it and shut down by :meth:`close` (or the
    ``with`` block's end) when this pool started it. Actors are started as a run needs them
    and kept while the next run asks for the same resources per actor. Besides its actors it
    remembers which chunks' base-model reads (:attr:`ChunkJob.base_key
    <iclit.experiments.workers.ChunkJob.base_key>`) each one holds, so a chunk that shares
    them goes to the actor that holds them when it is free.
    """

    def __init__(self, *, address: str | None = None, workers: int | None = None) -> None:
        self.address = address
        self.workers = workers
        self.actors: list[Any] = []
        self.held: dict[Any, deque[str]] = {}
        self._options: dict[str, Any] | None = None
        self._own = False
        self._ray: Any = None

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def ray(self) -> Any:
        """The ``ray`` module, initialised (a local cluster unless ``address`` was given)."""
        if self._ray is None:
            try:
                import ray
            except ModuleNotFoundError as e:
                raise ModuleNotFoundError("the Ray backend needs ray: pip install 'iclit[ray]'") from e
            if not ray.is_initialized():
                kwargs: dict[str, Any] = {
                    "include_dashboard": False,
                    "log_to_driver": False,
                    "logging_level": logging.WARNING,
                }
                if self.address:
                    ray.init(address=self.address, **kwargs)
                else:
                    ray.init(num_cpus=self.workers or os.cpu_count() or 1, **kwargs)
                self._own = True
            self._ray = ray
        return self._ray

    def actors_for(self, options: dict[str, Any], n: int, preload: tuple[Any, ...], threads: int) -> list[Any]:
        """``n`` actors started with ``options`` (those kept from the last run when it asked for
        the same; otherwise they are stopped first)."""
        if options != self._options:
            self.stop_actors()
            self._options = options
        while len(self.actors) < n:
            self.start(preload, threads)
        return self.actors[:n]

    def start(self, preload: tuple[Any, ...], threads: int) -> Any:
        """A new actor with the pool's current options."""
        actor = self.ray().remote(ChunkWorker).options(**(self._options or {})).remote(preload, threads)
        self.actors.append(actor)
        self.held[actor] = deque(maxlen=BASE_READOUTS_KEPT)
        return actor

    def drop(self, actor: Any) -> None:
        """Stop an actor (one that died, or all at the end)."""
        _kill(self.ray(), actor)
        if actor in self.actors:
            self.actors.remove(actor)
        self.held.pop(actor, None)

    def stop_actors(self) -> None:
        for actor in list(self.actors):
            self.drop(actor)

    def release_models(self, keep: Iterable[str]) -> None:
        """Every actor drops the models not in ``keep`` (those no later run reads)."""
        if self._ray is not None and self.actors:
            self._ray.get([a.release_models.remote(sorted(set(keep))) for a in self.actors])

    def close(self) -> None:
        """Stop the actors, and Ray when this pool started it."""
        if self._ray is None:
            return
        self.stop_actors()
        if self._own:
            self._ray.shutdown()
        self._ray, self._own, self._options = None, False, None

    def next_job(self, actor: Any, queue: deque[ChunkJob], busy: Sequence[Any]) -> ChunkJob:
        """The job ``actor`` takes from ``queue``: the first whose base-model reads it holds,
        else the first whose reads no busy actor holds, else the first."""
        mine = set(self.held.get(actor, ()))
        theirs = {k for other in busy for k in self.held.get(other, ())}
        pick = next((j for j in queue if j.base_key is not None and j.base_key in mine), None)
        if pick is None:
            pick = next((j for j in queue if j.base_key is None or j.base_key not in theirs), queue[0])
        queue.remove(pick)
        if pick.base_key is not None and pick.base_key not in mine:
            self.held[actor].append(pick.base_key)
        return pick


def run_ray(
    jobs: Sequence[ChunkJob],
    spec: ExperimentSpec,
    *,
    address: str | None,
    workers: int | None,
    options: RayOptions | None = None,
    pool: RayPool | None = None,
) -> Iterator[tuple[ChunkJob, ChunkOutput]]:
    """Compute ``jobs`` on Ray actors; yields (job, output) once per job as chunks finish.

    ``address``: an existing cluster, else a local one with ``workers`` CPUs (default: all).
    Actors: ``workers``, else as many as the cluster's CPUs (or GPU shares) allow, at most one
    per job. ``pool``: the actors (and Ray, at the pool's address) are kept there for the next
    run; without one they are started for these jobs and stopped after them. Raises :class:`ChunkFailed` when a
    chunk's actors died too often.
    """
    if not jobs:
        return
    own = pool is None
    pool = pool or RayPool(address=address, workers=workers)
    ray = pool.ray()
    from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

    options = options or ray_options_of(spec)
    try:
        resources = ray.cluster_resources()
        first = jobs[0]
        gpu = _uses_gpu(spec, options, float(resources.get("GPU", 0)))
        per_gpu = _planned_actors_per_gpu(spec, options, first.model) if gpu else 1
        malloc = allocator_preload(options.allocator)
        opts = actor_options(gpu=gpu, actors_per_gpu=per_gpu, threads=options.threads, preload=malloc)
        fit = int(resources.get("GPU", 0) * per_gpu) if gpu else int(resources.get("CPU", 1) // options.threads)
        n = max(1, min(workers or max(1, fit), len(jobs)))
        log.info("Ray: %d actors, each %s", n, opts)
        preload = (first.model, spec.device, spec.dtype)
        idle = list(reversed(pool.actors_for(opts, n, preload, options.threads)))
        queue: deque[ChunkJob] = deque(jobs)
        tries: dict[tuple[str, ...], int] = {}
        running: dict[Any, tuple[Any, ChunkJob]] = {}
        while queue or running:
            while queue and idle:
                actor = idle.pop()
                job = pool.next_job(actor, queue, [a for a, _ in running.values()])
                tries[job.keys] = tries.get(job.keys, 0) + 1
                running[actor.run.remote(job)] = (actor, job)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, job = running.pop(ref)
            try:
                output = ray.get(ref)
            except RayTaskError as e:  # the engine raised: not a fault of the worker
                raise e.as_instanceof_cause() from None
            except (RayActorError, WorkerCrashedError) as e:
                pool.drop(actor)
                if tries[job.keys] > options.max_retries:
                    n = tries[job.keys]
                    raise ChunkFailed(
                        f"{_describe(job)}: its worker died {n} time{'s' if n != 1 else ''} "
                        f"(max_retries {options.max_retries}); last: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}"
                    ) from e
                log.warning("%s: its worker died (%s); retrying on another worker", _describe(job), type(e).__name__)
                queue.appendleft(job)
                idle.append(pool.start(preload, options.threads))
                continue
            idle.append(actor)
            yield job, output
    except BaseException:
        if not own:  # a run that failed leaves no actor busy with its chunks
            pool.stop_actors()
        raise
    finally:
        if own:
            pool.close()


def _kill(ray: Any, actor: Any) -> None:
    try:
        ray.kill(actor)
    except Exception:  # noqa: BLE001 - best effort
        pass
