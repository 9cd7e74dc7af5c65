"""Shards of a run: a deterministic 1/N of the plan's chunks each, merged into the run afterwards.

``iclit run SPEC --out RUN --shard I/N`` computes the chunks :func:`assign_shards` gives
shard I into its own run directory ``RUN/shards/I-of-N`` (spec.yaml, results.sqlite,
states/; locked by that shard alone), so N jobs on a shared filesystem write N different
directories and need no locking between them. The assignment is greedy
longest-processing-time on :func:`~iclit.experiments.cost.chunk_cost`: chunks in order of
decreasing cost (ties: by their first trial key), each to the shard with the least cost so
far (ties: the lowest index). It depends on the plan alone, so every job computes the same
assignment, every chunk is in exactly one shard, and the shards' costs differ by at most one
chunk's.

``iclit merge RUN`` (and ``iclit results`` / ``iclit report`` on RUN) folds the shards into
RUN's own store: rows copied verbatim with ``INSERT OR IGNORE`` on the trial key (a second
merge adds nothing), each states file copied atomically before its rows. Shards computed
from another spec or with other versions of the code that computes trials are refused
(:class:`ShardError`) before anything is written.
"""

from __future__ import annotations

import heapq
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iclit._atomic import atomic_write, atomic_write_text
from iclit.experiments.cost import chunk_cost
from iclit.experiments.lock import RunLock
from iclit.experiments.plan import Chunk, Plan
from iclit.rundir.store import DB_NAME, Store

__all__ = [
    "SHARDS_DIR",
    "CODE_PACKAGES",
    "ShardError",
    "MergeSummary",
    "parse_shard",
    "shard_dir",
    "assign_shards",
    "shard_chunks",
    "find_shards",
    "merge_shards",
    "unmerged_trials",
]

SHARDS_DIR = "shards"
CODE_PACKAGES = ("iclit", "torch", "transformers", "peft")
"""The packages whose versions must agree between the shards of a run (they compute the trials)."""
_NAME = re.compile(r"^(\d+)-of-(\d+)$")


class ShardError(ValueError):
    """A ``--shard`` that is not I/N, or shards that cannot be merged (named in the message)."""


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` → (I, N) with 0 ≤ I < N; :class:`ShardError` otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise ShardError(f"--shard takes I/N (this job's index and the number of shards, e.g. 0/32), not {text!r}")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or index >= count:
        raise ShardError(f"--shard {text}: the index must be in 0..N-1 and N >= 1 (e.g. $SLURM_ARRAY_TASK_ID/32)")
    return index, count


def shard_dir(out: str | Path, index: int, count: int) -> Path:
    """``out/shards/I-of-N``: the run directory of one shard."""
    return Path(out) / SHARDS_DIR / f"{index}-of-{count}"


def assign_shards(chunks: Sequence[Chunk], count: int) -> list[int]:
    """The shard of each chunk (greedy longest-processing-time on the chunk cost; see the module)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, not {count}")
    order = sorted(
        range(len(chunks)), key=lambda i: (-chunk_cost(chunks[i]), chunks[i].keys[0] if chunks[i].keys else "")
    )
    loads = [(0.0, s) for s in range(count)]
    heapq.heapify(loads)
    shard = [0] * len(chunks)
    for i in order:
        load, s = heapq.heappop(loads)
        shard[i] = s
        heapq.heappush(loads, (load + chunk_cost(chunks[i]), s))
    return shard


def shard_chunks(plan: Plan, index: int, count: int) -> list[Chunk]:
    """The chunks of shard ``index`` of ``count``, in plan order."""
    owner = assign_shards(plan.chunks, count)
    return [c for c, s in zip(plan.chunks, owner, strict=True) if s == index]


def find_shards(out: str | Path) -> list[Path]:
    """The shard directories of ``out`` that hold a results store, in (N, I) order."""
    root = Path(out) / SHARDS_DIR
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _NAME.match(d.name)
        if m and (d / DB_NAME).is_file():
            found.append(((int(m.group(2)), int(m.group(1))), d))
    return [d for _, d in sorted(found)]


@dataclass
class MergeSummary:
    """shards: shard directories found; merged: trials new to the run's store; per_shard:
    trials merged from each (0: nothing new)."""

    out: Path
    shards: int
    merged: int
    stored: int
    per_shard: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        return (
            f"{self.out}: merged {self.merged} new trials from {self.shards} shards "
            f"({self.stored} trials stored in the run)"
        )


def _code(versions: dict[str, str]) -> dict[str, str | None]:
    return {p: versions.get(p) for p in CODE_PACKAGES}


def _reference(out: Path, shards: Sequence[Path]) -> tuple[str, dict[str, Any], str]:
    """(spec YAML, latest run, where they come from) the shards must agree with: the run's own
    store when it has one, else the first shard."""
    for source in ([out] if (out / DB_NAME).exists() else []) + list(shards):
        with Store(source, readonly=True) as store:
            run = store.latest_run()
        if run is not None:
            return run["spec_yaml"], run, str(source)
    raise ShardError(f"{out}: no shard has recorded a run yet (nothing to merge)")


def _check(out: Path, shards: Sequence[Path]) -> tuple[dict[str, Any], list[tuple[Path, dict[str, Any]]]]:
    spec_yaml, ref, where = _reference(out, shards)
    runs = []
    for d in shards:
        with Store(d, readonly=True) as store:
            run = store.latest_run()
        if run is None:
            continue
        if run["spec_yaml"] != spec_yaml:
            raise ShardError(
                f"{d}: this shard was computed from another spec than {where} (compare their spec.yaml); "
                f"merge only the shards of one spec (move this one out of {out / SHARDS_DIR})"
            )
        if _code(run["versions"]) != _code(ref["versions"]):
            diff = ", ".join(
                f"{p} {run['versions'].get(p)} vs {ref['versions'].get(p)}"
                for p in CODE_PACKAGES
                if run["versions"].get(p) != ref["versions"].get(p)
            )
            raise ShardError(
                f"{d}: this shard was computed with other code versions than {where} ({diff}); "
                "recompute it with the same installation"
            )
        runs.append((d, run))
    return ref, runs


def unmerged_trials(out: str | Path) -> int:
    """Trials the shards of ``out`` hold that its own store lacks (reads only)."""
    out = Path(out)
    shards = find_shards(out)
    if not shards:
        return 0
    have: set[str] = set()
    if (out / DB_NAME).exists():
        with Store(out, readonly=True) as store:
            have = store.done_keys()
    n = 0
    for d in shards:
        with Store(d, readonly=True) as store:
            n += len(store.done_keys() - have)
    return n


def _copy_file(src: Path, dst: Path) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def merge_shards(out: str | Path, *, lock: bool = True) -> MergeSummary:
    """Fold the shards of ``out`` into its store (idempotent; see the module).

    lock: take ``out``'s lock for the merge (:class:`~iclit.experiments.lock.RunLocked` if
    another process writes it); False when the caller holds it. Raises :class:`ShardError`
    when there are no shards or one was computed from another spec or code version (nothing
    written).
    """
    out = Path(out)
    shards = find_shards(out)
    if not shards:
        raise ShardError(
            f"{out}: no shards to merge (no {SHARDS_DIR}/I-of-N/{DB_NAME}; "
            "they come from `iclit run SPEC --out DIR --shard I/N`)"
        )
    ref, runs = _check(out, shards)
    if unmerged_trials(out) == 0:
        stored = 0
        if (out / DB_NAME).exists():
            with Store(out, readonly=True) as store:
                stored = store.count()["trials"]
        return MergeSummary(out, len(shards), 0, stored, {str(d): 0 for d in shards})
    held = RunLock.acquire(out) if lock else None
    try:
        if not (out / "spec.yaml").exists():
            atomic_write_text(out / "spec.yaml", ref["spec_yaml"])
        per_shard: dict[str, int] = {}
        with Store(out) as main:
            run_id = main.begin_run(ref["spec_yaml"], ref["plan"], [], backend="merge", versions=ref["versions"])
            models: dict[str, Any] = {}
            for d, run in runs:
                models.update(run.get("models") or {})
                per_shard[str(d)] = _merge_one(d, out, main, run_id)
            total = sum(per_shard.values())
            main.finish_run(run_id, 0, total, per_shard, models)
            stored = main.count()["trials"]
    finally:
        if held is not None:
            held.release()
    return MergeSummary(out, len(shards), total, stored, per_shard)


def _merge_one(shard: Path, out: Path, main: Store, run_id: int) -> int:
    """Copy the trials of one shard that ``main`` lacks: states files first, then the rows in
    one transaction; returns how many were new."""
    with Store(shard, readonly=True) as src:
        keys = sorted(src.done_keys() - main.done_keys())
        if not keys:
            return 0
        rows = src.stored_trials(keys)
    if rows is None:  # cannot happen: the keys were read from the shard's own store
        raise ShardError(f"{shard}: its store changed while being merged; merge again")
    for f in sorted({t["states_file"] for t in rows.trials if t["states_file"]}):
        source = shard / f
        if not source.is_file():
            raise ShardError(f"{shard}: states file {f} named by its trials is missing; rerun that shard")
        _copy_file(source, out / f)
    states = {t["trial_key"]: (t["states_file"], t["states_row"]) for t in rows.trials}
    return main.copy_trials(rows, run_id, states)
