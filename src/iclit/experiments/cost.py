"""What a plan costs before it runs: cells, chunks, adapters to train, time and disk.

``iclit run SPEC --check`` prints :func:`describe_cost` of :func:`plan_cost`; ``iclit run``
prints its first lines before computing anything, so a grid of thousands of cells states
its cost first.

- **chunk cost** (:func:`chunk_cost`): a unitless estimate of a chunk's compute, used to
  balance shards and to scale timings: trials × (k + 1) prompt parts × (1 + epochs ×
  adapters per set) passes.
- **time**: seconds per cost unit, from the timings the run directory's store already holds
  (a resumed run), else from a calibration (``--calibrate``: one chunk computed in a
  temporary directory on this machine, model load excluded), times the cost of the chunks
  left to compute. Without either, no time is stated.
- **disk**: the states files' size from shapes: state arrays × (layers + 1) × hidden size ×
  4 bytes per trial (float32), the shapes read from the model's config (no weights loaded).
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iclit.experiments.plan import Chunk, Plan
from iclit.rundir.store import DB_NAME, Store

__all__ = [
    "PlanCost",
    "arms_run",
    "chunk_cost",
    "plan_cost",
    "describe_cost",
    "cost_lines",
    "model_shape",
    "state_arrays",
]


@dataclass(frozen=True)
class PlanCost:
    """cells, chunks, trials of the plan; todo: trials not yet stored in the run directory;
    adapters: IT adapters the todo trials train; state_bytes: the states files of the whole
    plan (None: shapes unknown); seconds: estimated time of the todo trials (None: no timing)
    and timing_source: where the seconds per cost unit came from."""

    cells: int
    chunks: int
    trials: int
    todo: int
    todo_chunks: int
    adapters: int
    state_bytes: int | None
    shape: tuple[int, int] | None
    seconds: float | None
    timing_source: str


def chunk_cost(chunk: Chunk) -> float:
    """A chunk's compute in arbitrary units: trials × (k + 1) × (1 + epochs × it_seeds)."""
    settings = chunk.cell.settings
    epochs = int(chunk.cell.recipe.epochs)
    seeds = int(settings.get("it_seeds", 1))
    return float(chunk.size * (chunk.cell.k + 1) * (1 + epochs * seeds))


def arms_run(arms: Sequence[str], baselines: Sequence[str], it_seeds: int = 1) -> tuple[str, ...]:
    """The arms a run computes (torch-free; tests keep it equal to
    :func:`iclit.engine.evaluate.run_arms`)."""
    arms = tuple(a for a in arms if not (it_seeds >= 2 and a == "it_seed2"))
    if "noise_ceiling" in baselines:
        arms += tuple(a for a in (("it_seed2",) if it_seeds < 2 else ()) + ("icl_reordered",) if a not in arms)
    return arms


def state_arrays(plan: Plan) -> int:
    """State arrays stored per trial: one per arm run (noise-ceiling arms included) and per
    IT step read (``capture_steps``); the query-mean baseline adds one per ICL and IT arm."""
    spec = plan.spec
    arms = arms_run(spec.arms, spec.baselines, spec.it_seeds)
    steps = max((len(c.recipe.capture_steps) for c in plan.cells), default=0)
    extra = 2 if "query_mean" in spec.baselines else 0
    return len(arms) + max(0, spec.it_seeds - 1) * ("it_seed2" not in arms) + steps + extra


def _stored_shape(out: Path | None, name: str) -> tuple[int, int] | None:
    """(layers + 1, hidden size) of ``name`` as a run in ``out`` recorded it."""
    if out is None or not (out / DB_NAME).exists():
        return None
    try:
        with Store(out, readonly=True) as store:
            info = store.model_info(name)
    except (RuntimeError, OSError):
        return None
    if info.get("n_layers") and info.get("hidden_size"):
        return int(info["n_layers"]) + 1, int(info["hidden_size"])
    return None


def _config_shape(config: Any) -> tuple[int, int] | None:
    get = (lambda k: config.get(k)) if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    text = get("text_config")
    if text is not None:
        return _config_shape(text)
    layers = get("num_hidden_layers") or get("n_layer")
    hidden = get("hidden_size") or get("n_embd")
    return (int(layers) + 1, int(hidden)) if layers and hidden else None


def model_shape(name: str, out: str | Path | None = None) -> tuple[int, int] | None:
    """(layers + 1, hidden size) of a model without loading weights (or torch): as a run in
    ``out`` recorded it, else from a model directory's config.json, else from a model this
    process has loaded or can preview (only where torch is imported already); None when unknown."""
    stored = _stored_shape(Path(out) if out is not None else None, name)
    if stored is not None:
        return stored
    from iclit.models.names import resolve

    try:
        kind, location = resolve(name)
    except LookupError:
        return None
    if kind == "dir":
        try:
            return _config_shape(json.loads((Path(location) / "config.json").read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return None
    if "torch" not in sys.modules:  # reading a spec's cost imports no torch
        return None
    from iclit.experiments.workers import model_preview

    try:
        preview = model_preview(name)
    except Exception:  # noqa: BLE001 - a model that cannot be previewed just has no stated size
        return None
    if preview is None:
        return None
    if hasattr(preview, "n_layers") and hasattr(preview, "hidden_size"):
        return int(preview.n_layers) + 1, int(preview.hidden_size)
    return _config_shape(getattr(preview, "config", None))


def _stored_rate(plan: Plan, out: Path) -> tuple[float, int] | None:
    """(seconds per cost unit, chunks timed) from the plan's chunks stored whole in ``out``."""
    if not (out / DB_NAME).exists():
        return None
    try:
        with Store(out, readonly=True) as store:
            rows = dict(
                store.conn.execute("SELECT trial_key, seconds FROM trials WHERE seconds IS NOT NULL").fetchall()
            )
    except (RuntimeError, OSError):
        return None
    seconds = units = 0.0
    timed = 0
    for chunk in plan.chunks:
        if all(k in rows for k in chunk.keys):
            seconds += sum(float(rows[k]) for k in chunk.keys)
            units += chunk_cost(chunk)
            timed += 1
    return (seconds / units, timed) if units > 0 and seconds > 0 else None


def _calibrate(plan: Plan) -> tuple[float | None, tuple[int, int] | None]:
    """Seconds per cost unit of the plan's first chunk, computed here in a temporary
    directory, and the (layers + 1, hidden) of its model."""
    from iclit.experiments.runner import run_experiment

    with tempfile.TemporaryDirectory(prefix="iclit-calibrate-") as tmp:
        run_experiment(plan.spec, Path(tmp) / "run", max_chunks=1)
        rate = _stored_rate(plan, Path(tmp) / "run")
        shape = _stored_shape(Path(tmp) / "run", plan.chunks[0].cell.model)
    return (None if rate is None else rate[0]), shape


def plan_cost(
    plan: Plan,
    out: str | Path | None = None,
    *,
    calibrate: bool = False,
    shapes: dict[str, tuple[int, int] | None] | None = None,
) -> PlanCost:
    """The cost of ``plan`` run into ``out`` (None: a new run directory).

    calibrate: when ``out`` holds no timings, compute one chunk here to time it (loads the
    model). shapes: model name → (layers + 1, hidden) to use instead of reading configs.
    """
    out = Path(out) if out is not None else None
    done: set[str] = set()
    if out is not None and (out / DB_NAME).exists():
        try:
            with Store(out, readonly=True) as store:
                done = store.done_keys()
        except (RuntimeError, OSError):
            done = set()
    todo = [c for c in plan.chunks if not all(k in done for k in c.keys)]
    spec = plan.spec
    q = max(1, spec.queries_per_set)
    adapters = sum(len(c.resamples) // q for c in todo) * spec.it_seeds
    models = dict.fromkeys(c.model for c in plan.cells)
    shapes = dict(shapes) if shapes is not None else {m: model_shape(m, out) for m in models}
    seconds, source = None, "no timing: `--calibrate` times one chunk on this machine (loads the model)"
    rate = _stored_rate(plan, out) if out is not None else None
    if rate is not None:
        source = f"the timings of {rate[1]} chunks stored in {out}"
    elif calibrate and todo:
        value, shape = _calibrate(plan)
        rate = None if value is None else (value, 1)
        source = "a calibration: one chunk computed on this machine"
        if shapes.get(plan.chunks[0].cell.model) is None:
            shapes[plan.chunks[0].cell.model] = shape
    per_trial = state_arrays(plan) * 4
    state_bytes: int | None = 0
    for c in plan.chunks:
        shape = shapes.get(c.cell.model)
        if shape is None or state_bytes is None:
            state_bytes = None
            break
        state_bytes += c.size * per_trial * shape[0] * shape[1]
    if not spec.store_states:
        state_bytes = 0
    if rate is not None:
        seconds = rate[0] * sum(chunk_cost(c) for c in todo)
    one_shape = next(iter(shapes.values()), None) if len(set(shapes.values())) == 1 else None
    return PlanCost(
        len(plan.cells),
        len(plan.chunks),
        plan.n_trials,
        sum(c.size for c in todo),
        len(todo),
        adapters,
        state_bytes,
        one_shape,
        seconds,
        source if todo else "nothing left to compute",
    )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def describe_cost(cost: PlanCost, spec: Any | None = None) -> list[str]:
    """The cost as lines for the terminal."""
    lines = [
        f"cost: {cost.cells} cells, {cost.chunks} chunks, {cost.trials} trials "
        f"({cost.todo} in {cost.todo_chunks} chunks left to compute); {cost.adapters} IT adapters to train"
    ]
    if cost.state_bytes is None:
        lines.append(
            "states on disk: unknown (the model's shapes are read from its config, a stored run or `--calibrate`)"
        )
    elif spec is not None and not spec.store_states:
        lines.append("states on disk: none (store_states: false)")
    else:
        shape = f" ({cost.shape[0]} layers × {cost.shape[1]} hidden × 4 B per state array)" if cost.shape else ""
        lines.append(f"states on disk: {_size(cost.state_bytes)} for the whole plan{shape}")
    if cost.seconds is not None:
        lines.append(f"estimated time: {_duration(cost.seconds)} in one process (from {cost.timing_source})")
    else:
        lines.append(f"estimated time: {cost.timing_source}")
    return lines


def cost_lines(plan: Plan, out: str | Path | None, *, calibrate: bool = False) -> Sequence[str]:
    """:func:`describe_cost` of :func:`plan_cost` (what the CLI prints)."""
    return describe_cost(plan_cost(plan, out, calibrate=calibrate), plan.spec)
