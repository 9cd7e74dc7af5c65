"""Running a spec into a run directory, locally or on a Ray cluster; resumable; reusing other runs.

    Example (not run: it needs a model or a run directory)::

        from iclit.experiments import load_spec, run_experiment
        run_experiment(load_spec("configs/examples/smoke.yaml"), "runs/smoke")   # again: resumes
        run_experiment(load_spec("more.yaml"), "runs/more", reuse=["runs/smoke"])  # copies shared trials


The driver plans the trials, skips the chunks already stored, copies the chunks it can reuse
from other run directories, draws each remaining chunk's resamples (so every backend sees the
same demonstrations), has them evaluated — in this process, or by Ray actors that each load a
model once — and writes each chunk's trials in one transaction. Chunks of cells that differ
only in the IT recipe carry their shared base key, so the base model is read once for them
(:attr:`~iclit.experiments.workers.ChunkJob.base_key`).
A run directory holds ``spec.yaml`` (the spec last run there), ``results.sqlite`` (the
trials' outputs, see :mod:`~iclit.rundir.store`) and ``states/`` (their hidden states,
one safetensors file per chunk, written before the chunk's rows; see
:mod:`~iclit.rundir.statefiles`; none with ``store_states: false``).

One process writes a run directory at a time (:mod:`~iclit.experiments.lock`). ``shard=(I, N)``
computes a deterministic 1/N of the chunks into ``out/shards/I-of-N``
(:mod:`~iclit.experiments.shards`); a plain run folds such shards in before it computes.
Cluster recipes: docs/cluster.md.

**Reuse** (``reuse=[dir, …]``, ``iclit run … --reuse DIR``): see :mod:`~iclit.experiments.reuse`.
Reuse happens on the driver before any chunk is dispatched (any backend), copies every
reusable chunk, and sources are tried in the order given; ``max_chunks`` limits the chunks
computed.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from iclit._atomic import atomic_write_text
from iclit.experiments.lock import RunDirError, RunLock
from iclit.experiments.plan import Chunk, Plan, make_plan
from iclit.experiments.progress import TrialProgress
from iclit.experiments.raypool import RayOptions, RayPool, run_ray
from iclit.experiments.reuse import ReuseError, copy_reusable, find_reusable, open_reuse_stores
from iclit.experiments.shards import merge_shards, shard_chunks, shard_dir, unmerged_trials
from iclit.experiments.spec import ExperimentSpec, load_spec
from iclit.experiments.workers import ChunkJob, ChunkOutput, execute, loaded_model, make_job, model_preview, use_models
from iclit.rundir.statefiles import write_chunk_states
from iclit.rundir.store import DB_NAME, Store

__all__ = [
    "Backend",
    "ReuseError",
    "RunDirError",
    "RunSummary",
    "check_run_dir",
    "SPEC_NAME",
    "open_reuse_stores",
    "run_experiment",
    "experiment_versions",
]

Backend = Literal["local", "ray"]
SPEC_NAME = "spec.yaml"
log = logging.getLogger(__name__)


# --- running a spec ---------------------------------------------------------------------------


@dataclass
class RunSummary:
    """What a call of :func:`run_experiment` did.

    computed / chunks_run: trials and chunks evaluated by this call; reused / chunks_reused:
    those copied from the ``reuse`` run directories; reused_from: trials copied per source
    (every source given, in order, 0 where nothing matched).
    """

    out: Path
    backend: str
    planned: int
    already_done: int
    computed: int
    chunks_run: int
    seconds: float
    run_id: int
    reused: int = 0
    chunks_reused: int = 0
    reused_from: dict[str, int] = field(default_factory=dict)
    not_fitted: list[tuple[str, float]] = field(default_factory=list)
    """(trial key, final IT answer loss) of the trials computed here whose IT arm did not fit
    its demonstrations (:data:`iclit.engine.evaluate.FIT_LOSS`)."""

    def fit_warning(self) -> str | None:
        """One line naming how many computed trials' IT arm did not fit, with their losses."""
        if not self.not_fitted:
            return None
        losses = ", ".join(f"{loss:.3g}" for _, loss in self.not_fitted[:10]) + (
            ", …" if len(self.not_fitted) > 10 else ""
        )
        from iclit.engine.evaluate import FIT_LOSS

        return (
            f"the IT arm did not fit its demonstrations in {len(self.not_fitted)} of {self.computed} computed "
            f"trials (final answer loss ≥ {FIT_LOSS:g}: {losses}); their IT states are of a model that has not learnt "
            "the demonstrations (see `iclit results RUN --metric it_loss`)"
        )

    def __str__(self) -> str:
        text = (
            f"{self.out}: {self.planned} trials planned, {self.already_done} already stored, "
            f"{self.computed} computed in {self.chunks_run} chunks"
        )
        if self.reused_from:
            if len(self.reused_from) == 1:
                where = next(iter(self.reused_from))
            else:
                where = ", ".join(f"{src} ({n})" for src, n in self.reused_from.items())
            text += f", {self.reused} reused in {self.chunks_reused} chunks from {where}"
        return text + f" ({self.seconds:.1f} s, {self.backend})"


def experiment_versions() -> dict[str, str]:
    from iclit.engine.evaluate import versions

    return versions()


def _write_spec(out: Path, spec: ExperimentSpec) -> None:
    text = spec.to_yaml()
    target = out / SPEC_NAME
    if target.exists() and target.read_text(encoding="utf-8") == text:
        return
    atomic_write_text(target, text)


def _load(spec: ExperimentSpec | str | Path, check_resources: bool = True) -> ExperimentSpec:
    if isinstance(spec, ExperimentSpec):
        return spec.validate(check_resources=check_resources)
    return load_spec(spec, check_resources=check_resources)


def run_experiment(
    spec: ExperimentSpec | str | Path,
    out: str | Path,
    *,
    backend: Backend = "local",
    address: str | None = None,
    workers: int | None = None,
    progress: bool = False,
    max_chunks: int | None = None,
    reuse: Sequence[str | Path] = (),
    models: Mapping[str, Any] | None = None,
    shard: tuple[int, int] | None = None,
    ray_options: RayOptions | None = None,
    ray_pool: RayPool | None = None,
) -> RunSummary:
    """Run (or resume) ``spec`` into the run directory ``out``; returns what was done.

    The spec is validated first (:class:`~iclit.experiments.spec.SpecError`, nothing
    written). Finished trials are skipped. ``backend="ray"`` spreads the chunks over a Ray
    cluster: ``address`` of an existing one, else a local one with ``workers`` CPUs (default:
    all); one actor per CPU, each loading the model once. ``max_chunks`` stops after that many
    chunks computed (for trying a spec out). ``reuse``: run directories whose stored chunks are
    copied instead of computed (see the module docstring); :class:`ReuseError`, nothing
    written, if one holds no results store. ``models``: name → an already loaded
    :class:`~iclit.models.LoadedModel` to use for the cells of that model (local backend;
    those names are not resolved, the rest of the spec is checked as usual). ``shard``:
    (I, N): compute only shard I's chunks (:mod:`~iclit.experiments.shards`) into
    ``out/shards/I-of-N``. ``ray_options``: the Ray actors' resources and retries
    (:class:`~iclit.experiments.raypool.RayOptions`; default from the spec's ``cluster``).
    ``ray_pool``: a :class:`~iclit.experiments.raypool.RayPool` whose actors (with the models
    they loaded) are kept for the next run, e.g. the next spec of a suite; without one the
    actors are started for this run and stopped after it.

    The run directory is locked for the run (:mod:`~iclit.experiments.lock`): another
    process writing it is refused (:class:`~iclit.experiments.lock.RunLocked`) before any work.
    """
    if models:
        if backend != "local":
            raise ValueError("models handed in as objects run on the local backend only")
        with use_models(models):
            return _run(
                _load(spec, check_resources=False),
                out,
                backend="local",
                address=None,
                workers=None,
                progress=progress,
                max_chunks=max_chunks,
                reuse=reuse,
                shard=shard,
                ray_options=None,
                ray_pool=None,
            )
    return _run(
        _load(spec),
        out,
        backend=backend,
        address=address,
        workers=workers,
        progress=progress,
        max_chunks=max_chunks,
        reuse=reuse,
        shard=shard,
        ray_options=ray_options,
        ray_pool=ray_pool,
    )


def _run(
    spec: ExperimentSpec,
    out: str | Path,
    *,
    backend: Backend,
    address: str | None,
    workers: int | None,
    progress: bool,
    max_chunks: int | None,
    reuse: Sequence[str | Path],
    shard: tuple[int, int] | None,
    ray_options: RayOptions | None,
    ray_pool: RayPool | None,
) -> RunSummary:
    if backend not in ("local", "ray"):
        raise ValueError(f"backend must be 'local' or 'ray', not {backend!r}")
    started = time.perf_counter()
    plan: Plan = make_plan(spec)
    out = Path(out)
    check_run_dir(out)
    chunks, skip = plan.chunks, set()
    if shard is not None:  # this shard's chunks, into its own directory; those the run already holds are skipped
        chunks, skip = shard_chunks(plan, *shard), _stored_keys(out)
        out = shard_dir(out, *shard)
        check_run_dir(out)
    lock = RunLock.acquire(out)  # one writer per run directory, before any work
    try:
        if shard is None and unmerged_trials(out):  # shards of this run computed elsewhere: theirs, not recomputed
            merge_shards(out, lock=False)
        return _run_locked(
            spec,
            plan,
            chunks,
            skip,
            out,
            backend=backend,
            address=address,
            workers=workers,
            progress=progress,
            max_chunks=max_chunks,
            reuse=reuse,
            ray_options=ray_options,
            ray_pool=ray_pool,
            started=started,
        )
    finally:
        lock.release()


def _run_locked(
    spec: ExperimentSpec,
    plan: Plan,
    chunks: Sequence[Chunk],
    skip: set[str],
    out: Path,
    *,
    backend: Backend,
    address: str | None,
    workers: int | None,
    progress: bool,
    max_chunks: int | None,
    reuse: Sequence[str | Path],
    ray_options: RayOptions | None,
    ray_pool: RayPool | None,
    started: float,
) -> RunSummary:
    sources = open_reuse_stores(reuse, out)  # before anything is written
    reused_from = {name: 0 for name, _ in sources}
    try:
        done = _stored_keys(out) | skip
        found, todo = find_reusable([c for c in chunks if not all(k in done for k in c.keys)], sources)
        if max_chunks is not None:
            todo = todo[:max_chunks]
        jobs = _jobs(todo, spec, local=backend == "local")
        if (
            backend == "local" and jobs
        ):  # prompts fit the context window, LoRA targets exist: before anything is written
            from iclit.engine.evaluate import check_context, preflight

            previews = {name: model_preview(name) for name in dict.fromkeys(job.model for job in jobs)}
            for job in jobs:  # the prompts, from the tokenizer and config alone: before any weights load
                if previews[job.model] is not None:
                    check_context(previews[job.model], job.task, job.draws, job.demo_template, job.max_new_tokens)
            for job in jobs:
                preflight(
                    loaded_model(job.model, job.device, job.dtype),
                    job.task,
                    job.draws,
                    job.recipe,
                    job.demo_template,
                    job.max_new_tokens,
                    job.causal,
                )
        out.mkdir(parents=True, exist_ok=True)
        _write_spec(out, spec)
        store = Store(out)
        try:
            run_id = store.begin_run(
                spec.to_yaml(),
                plan.describe(),
                [(c.key, c.labels, c.settings) for c in plan.cells],
                backend=backend,
                versions=experiment_versions(),
            )
            stored = store.done_keys()
            planned = [k for c in chunks for k in c.keys]
            already = sum(k in stored or k in skip for k in planned)
            reused, chunks_reused = copy_reusable(found, store, run_id, reused_from)
            models: dict[str, Any] = {}
            not_fitted: list[tuple[str, float]] = []
            bar = TrialProgress(progress, len(planned), already + reused, spec.name)
            computed = 0
            try:
                if backend == "local":
                    computed = _run_local(jobs, spec, out, store, run_id, bar, models, not_fitted)
                else:
                    for job, output in run_ray(
                        jobs, spec, address=address, workers=workers, options=ray_options, pool=ray_pool
                    ):
                        computed += _store_chunk(out, store, output, run_id, spec, models, job.model, not_fitted)
                        bar.chunk_done(len(output.records))
            finally:
                bar.close()
            store.finish_run(
                run_id,
                computed,
                reused if reuse else None,
                {str(Path(n).resolve()): c for n, c in reused_from.items()} if reuse else None,
                models,
            )
        finally:
            store.close()
    finally:
        for _, source in sources:
            source.close()
    return RunSummary(
        out,
        backend,
        len(planned),
        already,
        computed,
        len(todo),
        time.perf_counter() - started,
        run_id,
        reused,
        chunks_reused,
        reused_from,
        not_fitted,
    )


def _jobs(todo: Sequence[Chunk], spec: ExperimentSpec, *, local: bool) -> list[ChunkJob]:
    """The chunks' jobs. Chunks that share their base key (cells that differ only in the IT
    recipe) carry it, so a worker reads the base model once for them; in one process they run
    one after another (after the first chunk of their group, in plan order), so the reads are
    still held when the next one comes."""
    counts = Counter(c.base_key for c in todo)  # in order of first appearance
    if local:
        rank = {key: i for i, key in enumerate(counts)}
        todo = sorted(todo, key=lambda c: rank[c.base_key])  # stable: plan order within a group
    return [make_job(c, spec, shares=counts[c.base_key] > 1) for c in todo]


def _stored_keys(out: Path) -> set[str]:
    """Keys of the trials already stored in ``out`` (read-only; none when it has no store yet)."""
    if not (out / DB_NAME).exists():
        return set()
    with Store(out, readonly=True) as store:
        return store.done_keys()


def check_run_dir(out: Path) -> None:
    """``out`` is a writable directory, or can be created as one (nothing is created here);
    :class:`RunDirError` naming the path otherwise."""
    if out.exists():
        if not out.is_dir():
            raise RunDirError(
                f"{out}: exists and is not a directory (a run directory is a folder; choose another --out)"
            )
        if not os.access(out, os.W_OK | os.X_OK):
            raise RunDirError(f"{out}: the run directory is not writable")
        return
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RunDirError(f"{out}: cannot be created: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(f"{out}: cannot be created: {parent} is not writable")


def _store_chunk(
    out: Path,
    store: Store,
    output: ChunkOutput,
    run_id: int,
    spec: ExperimentSpec,
    models: dict[str, Any],
    model: str,
    not_fitted: list[tuple[str, float]],
) -> int:
    """States file first (atomically), then the chunk's rows in one transaction."""
    records = output.records
    if spec.store_states:
        keys = [r["trial_key"] for r in records]
        rel = write_chunk_states(out, keys, output.states)
        records = [{**r, "states_file": rel, "states_row": i} for i, r in enumerate(records)]
    models.setdefault(model, output.model)
    new = store.write_trials(records, run_id)
    not_fitted += [
        (r["trial_key"], r["outputs"]["it_final_loss"]) for r in records if r["outputs"].get("it_fitted") is False
    ]
    return new


def _run_local(
    jobs: Sequence[ChunkJob],
    spec: ExperimentSpec,
    out: Path,
    store: Store,
    run_id: int,
    bar: TrialProgress,
    models: dict[str, Any],
    not_fitted: list[tuple[str, float]],
) -> int:
    computed = 0
    for job in jobs:
        if store.has_all(job.keys):  # another process finished it meanwhile
            bar.chunk_done(0)
            continue
        lm = loaded_model(job.model, job.device, job.dtype)
        output = execute(job, lm, progress=bar.arm_callback(len(job.keys), len(job.arms)))
        computed += _store_chunk(out, store, output, run_id, spec, models, job.model, not_fitted)
        bar.chunk_done(len(job.keys))
    return computed
