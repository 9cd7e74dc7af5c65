"""Computing chunks: the per-process model cache, the picklable chunk job, and the Ray actor class
(scheduled by :mod:`~iclit.experiments.raypool`).

A :class:`ChunkJob` holds everything a worker needs (drawn on the driver, so every backend
sees the same demonstrations); :func:`execute` runs the engine on it and returns a
:class:`ChunkOutput` — the trial records for the store and the chunk's hidden states.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from iclit.experiments.plan import Chunk
from iclit.experiments.spec import ExperimentSpec
from iclit.rundir.store import TrialRecord
from iclit.tasks import Resample, Task, Template
from iclit.tuning.recipe import TuningRecipe

__all__ = [
    "ChunkJob",
    "ChunkOutput",
    "ChunkWorker",
    "make_job",
    "execute",
    "loaded_model",
    "clear_model_cache",
    "release_models",
    "use_models",
]

log = logging.getLogger(__name__)

# --- models: one load per process -------------------------------------------------------------

_MODELS: dict[tuple[str, str | None, str | None], Any] = {}
_LOADS: list[tuple[str, str | None, str | None]] = []  # every load this process made
_GIVEN: dict[str, Any] = {}  # already loaded models handed in by the caller (see use_models)


def loaded_model(name: str, device: str | None = None, dtype: str | None = None) -> Any:
    """The process's copy of a model (a :class:`~iclit.models.LoadedModel`), loaded on first
    use (arms leave its weights unchanged); a model handed in with :func:`use_models` as is."""
    if name in _GIVEN:
        return _GIVEN[name]
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


class use_models:  # noqa: N801 - used as a context manager, like a function
    """``with use_models({"tiny": lm}): run_experiment(...)``: cells whose model is one of
    these names run on the given (already loaded) models instead of loading them."""

    def __init__(self, models: Mapping[str, Any] | None) -> None:
        self.models = dict(models or {})

    def __enter__(self) -> None:
        self.before = dict(_GIVEN)
        _GIVEN.update(self.models)

    def __exit__(self, *exc: Any) -> None:
        _GIVEN.clear()
        _GIVEN.update(self.before)


def model_preview(name: str) -> Any:
    """What the checks before a run can read of a model without loading its weights: a model
    handed in or already loaded, else its tokenizer and config
    (:func:`iclit.models.loading.preview_model`), else None."""
    if name in _GIVEN:
        return _GIVEN[name]
    loaded = next((lm for (n, _, _), lm in _MODELS.items() if n == name), None)
    if loaded is not None:
        return loaded
    from iclit.models.loading import preview_model

    return preview_model(name)


def clear_model_cache() -> None:
    """Drop every model this process has loaded."""
    release_models(())


def release_models(keep: Iterable[str]) -> list[str]:
    """Drop this process's loaded models whose name is not in ``keep`` (a long suite frees the
    models no later spec needs: several GiB of fp32 weights); returns the names dropped."""
    keep = set(keep)
    dropped = [key for key in _MODELS if key[0] not in keep]
    for key in dropped:
        del _MODELS[key]
    if dropped:
        _BASE_READOUTS.clear()
        gc.collect()
    return [name for name, _, _ in dropped]


def model_info(lm: Any) -> dict[str, Any]:
    """What a run records of a loaded model."""
    return {
        "source": lm.source,
        "device": str(lm.device),
        "dtype": str(lm.dtype).replace("torch.", ""),
        "n_layers": lm.n_layers,
        "hidden_size": lm.hidden_size,
    }


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
    memory: dict[str, Any] = field(default_factory=dict)
    """Overrides of the IT path's memory plan (memory_budget, adapters_per_pass, max_train_tokens)."""
    it_seeds: int = 1
    causal: dict[str, Any] | None = None
    """The causal analyses' settings (:meth:`ExperimentSpec.causal_settings`), None without ``analyses``."""
    prompt_format: str = "raw"
    """raw or chat (:mod:`iclit.tasks.chat`): the engine frames the prompts with the model's tokenizer."""
    base_key: str | None = None
    """:attr:`Chunk.base_key <iclit.experiments.plan.Chunk.base_key>` when another chunk of the
    run has the same one (a cell that differs only in the IT recipe): a worker that computed
    that chunk's base-model arms reuses them (:func:`execute`); None, nothing to share."""


@dataclass
class ChunkOutput:
    """records: one per trial, for the store (states_file filled in when the states are
    written); states: name → ``[n, L+1, d]`` float32 (and ``reference_mean`` ``[L+1, d]``);
    model: :func:`model_info` of the model that computed it."""

    records: list[TrialRecord]
    states: dict[str, np.ndarray]
    model: dict[str, Any]


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


def make_job(chunk: Chunk, spec: ExperimentSpec, *, shares: bool = False) -> ChunkJob:
    """Draw the chunk's resamples (on the driver, so every backend sees the same ones).
    shares: another chunk of the run has its base key (:attr:`ChunkJob.base_key`)."""
    from iclit.engine.evaluate import run_arms

    cell = chunk.cell
    draws = cell.draws(chunk.seed, chunk.resamples)
    record = spec.records_similarity
    return ChunkJob(
        model=cell.model,
        device=spec.device,
        dtype=spec.dtype,
        task=cell.task,
        demo_template=cell.demo_template,
        draws=draws,
        recipe=cell.recipe,
        seed=chunk.seed,
        arms=run_arms(spec.arms, spec.baselines, spec.it_seeds),
        batch_size=spec.batch_size,
        max_new_tokens=spec.max_new_tokens,
        cell_key=cell.key,
        keys=chunk.keys,
        extras=[_extras(d, record) for d in draws],
        fast=spec.fast,
        baselines=tuple(spec.baselines),
        memory={
            k: getattr(spec, k)
            for k in ("memory_budget", "adapters_per_pass", "max_train_tokens")
            if getattr(spec, k) is not None
        },
        it_seeds=spec.it_seeds,
        causal=spec.causal_settings(),
        prompt_format=spec.prompt_format,
        base_key=chunk.base_key if shares else None,
    )


_BASE_READOUTS: OrderedDict[str, dict[str, Any]] = OrderedDict()
"""This process's base-arm outputs by :attr:`ChunkJob.base_key`, the most recent last."""
BASE_READOUTS_KEPT = 8
"""How many chunks' base-arm outputs a process keeps (a chunk of 60 trials: about 20 MB)."""


def base_readouts(key: str | None) -> dict[str, Any] | None:
    """The base-arm outputs this process holds for ``key`` (a new, empty dict the first time),
    for :func:`iclit.engine.evaluate.evaluate`'s ``shared``; None for no key."""
    if key is None:
        return None
    held = _BASE_READOUTS.pop(key, {})
    _BASE_READOUTS[key] = held
    while len(_BASE_READOUTS) > BASE_READOUTS_KEPT:
        _BASE_READOUTS.popitem(last=False)
    return held


def execute(job: ChunkJob, lm: Any, progress: Callable[[str, int], Any] | None = None) -> ChunkOutput:
    """Run the engine on the chunk's draws (:func:`iclit.engine.evaluate.evaluate`)."""
    from iclit.engine.evaluate import evaluate

    start = time.perf_counter()
    result = evaluate(
        lm,
        job.task,
        job.draws,
        recipe=job.recipe,
        seed=job.seed,
        batch_size=job.batch_size,
        max_new_tokens=job.max_new_tokens,
        arms=job.arms,
        demo_template=job.demo_template,
        fast=job.fast,
        progress=progress,
        baselines=job.baselines,
        memory=job.memory,
        it_seeds=job.it_seeds,
        causal=job.causal,
        prompt_format=job.prompt_format,
        shared=base_readouts(job.base_key),
    )
    seconds = (time.perf_counter() - start) / max(1, len(job.draws))
    score_name = job.task.score_name  # correct, exact_match or chrf
    n_layers = int(result.states["anchor"].shape[1])
    records = []
    for i, (draw, key) in enumerate(zip(job.draws, job.keys, strict=True)):
        outputs = dict(result.trials[i])
        extra = job.extras[i] if i < len(job.extras) else {}
        outputs.update({k: v for k, v in extra.items() if k not in ("n_wrong", "demo_similarity")})
        outputs["score_name"] = score_name
        records.append(
            {
                "trial_key": key,
                "cell_key": job.cell_key,
                "seed": job.seed,
                "resample": draw.index,
                "query_id": draw.query.id,
                "n_layers": n_layers,
                "scores": {arm: float(s[i]) for arm, s in result.scores.items()},
                "outputs": outputs,
                "demo_similarity": extra.get("demo_similarity"),
                "n_wrong": extra.get("n_wrong"),
                "seconds": seconds,
                "states_file": None,
                "states_row": None,
            }
        )
    states = {name: t.numpy() for name, t in result.states.items()}
    return ChunkOutput(records, states, model_info(lm))


class ChunkWorker:
    """A Ray actor: loads models by name once, then computes chunks (one thread each)."""

    def __init__(self, preload: tuple[str, str | None, str | None] | None = None, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(threads)
        if preload is not None:
            loaded_model(*preload)

    def run(self, job: ChunkJob) -> ChunkOutput:
        return execute(job, loaded_model(job.model, job.device, job.dtype))

    def release_models(self, keep: list[str]) -> list[str]:
        """Drop the models not in ``keep`` (:func:`release_models`)."""
        return release_models(keep)

    def models(self) -> list[tuple[str, str | None, str | None]]:
        """The models this worker holds."""
        return list(_MODELS)

    def loads(self) -> int:
        """How many times this worker loaded a model."""
        return len(_LOADS)

    def pid(self) -> int:
        return os.getpid()
