"""The command line's cluster parts: ``iclit merge``, the plan's cost, ``--backend slurm``,
and folding shards in before ``iclit results`` / ``iclit report`` read a run.

Registered on the app by :mod:`iclit.cli` (:func:`register`); imports nothing heavy until a
command needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from iclit.cli_common import console, err, fail

__all__ = ["register", "fold_shards", "print_cost", "run_slurm"]


def merge(run: Path = typer.Argument(..., help="run directory whose shards (RUN/shards/I-of-N) to fold in")) -> None:
    """Fold the shards of a run (`iclit run SPEC --out RUN --shard I/N`) into its store; a second merge adds nothing."""
    from iclit.experiments.lock import RunLocked
    from iclit.experiments.shards import ShardError, merge_shards

    try:
        summary = merge_shards(run)
    except (ShardError, RunLocked, RuntimeError, OSError) as e:
        fail(str(e))
    console.print(str(summary), highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``merge`` to the app."""
    app.command("merge")(merge)


def fold_shards(run: Path) -> None:
    """Merge ``run``'s shards into its store when they hold trials it lacks (a note on stderr);
    a run being written by another process is read as it is; shards that cannot be merged
    (another spec or code version) exit 2."""
    from iclit.experiments.lock import RunDirError, RunLocked
    from iclit.experiments.shards import ShardError, merge_shards, unmerged_trials

    try:
        if not unmerged_trials(run):
            return
        summary = merge_shards(run)
    except ShardError as e:
        fail(str(e))
    except (RunLocked, RunDirError, RuntimeError, OSError) as e:
        err.print(f"note: the shards were not merged ({e}); reading the run as stored", highlight=False, soft_wrap=True)
        return
    err.print(f"note: {summary}", highlight=False, soft_wrap=True)


def print_cost(plan: Any, out: Path, *, calibrate: bool = False, strict: bool = False) -> None:
    """The plan's cost lines (:mod:`iclit.experiments.cost`); ``strict``: a failure (of the
    calibration) exits 2, else it is left out."""
    from iclit.experiments.cost import cost_lines

    try:
        lines = cost_lines(plan, out, calibrate=calibrate)
    except Exception as e:  # noqa: BLE001 - the cost is information; a run goes on without it
        if strict:
            fail(f"estimating the cost: {e}")
        return
    for line in lines:
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def _slurm_options(spec: Any, shards: int | None, settings: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    from iclit.experiments.spec.cluster import SlurmOptions

    base = spec.cluster.slurm.model_dump() if spec.cluster is not None else {}
    given = {**base, **settings, **({"shards": shards} if shards is not None else {})}
    try:
        return SlurmOptions(**given)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in e.errors())
        fail(f"--slurm / --shards: {problems} (keys: {', '.join(SlurmOptions.model_fields)})")


def run_slurm(
    spec: Any,
    out: Path,
    *,
    shards: int | None,
    settings: dict[str, Any],
    wait: bool,
    max_retries: int | None,
    cluster: str | None,
    progress: bool,
) -> None:
    """``iclit run --backend slurm``: lock ``out``, submit the shard jobs, wait and merge."""
    from iclit.experiments.lock import RunLock, RunLocked
    from iclit.experiments.runner import RunDirError, check_run_dir
    from iclit.experiments.slurm import ShardJobsFailed, launch_shards

    options = _slurm_options(spec, shards, settings)
    retries = max_retries if max_retries is not None else (spec.cluster.max_retries if spec.cluster else 2)
    try:
        check_run_dir(out)
        lock = RunLock.acquire(out)
    except (RunDirError, RunLocked) as e:
        fail(str(e))
    try:
        summary = launch_shards(
            spec,
            out,
            options=options,
            max_retries=retries,
            wait=wait,
            cluster=cluster,
            progress=progress,
            poll_s=10.0 if cluster in (None, "slurm") else 0.5,
        )
    except (ShardJobsFailed, ModuleNotFoundError, RuntimeError, ValueError, OSError) as e:
        fail(str(e))
    finally:
        lock.release()
    console.print(str(summary), highlight=False, soft_wrap=True)
