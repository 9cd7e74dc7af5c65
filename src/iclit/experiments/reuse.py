"""Reusing the chunks that earlier run directories already computed (``iclit run --reuse DIR``).

The stores of those run directories are opened read-only (a missing one is a
:class:`ReuseError` before anything is written). A chunk is reused only whole: when every one
of its trial keys is stored in one source, written there together (one run, one
transaction), since the batched passes of a chunk depend on its composition; keys hash
everything that determines a trial, chunking included (:mod:`~iclit.experiments.plan`), so a
different ``chunk_size`` reuses nothing. The chunk's rows — trials (scores, outputs, seconds)
and cell — are copied verbatim in one transaction under the same keys, and its hidden states
are copied into a states file of this run directory first; reused trials are counted as
reused, not computed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from iclit.experiments.plan import Chunk
from iclit.rundir.statefiles import read_chunk_states, write_chunk_states
from iclit.rundir.store import DB_NAME, Store, StoredTrials

__all__ = ["ReuseError", "open_reuse_stores", "find_reusable", "copy_reusable"]

log = logging.getLogger(__name__)


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


Reusable = tuple[Chunk, str, Store, StoredTrials]
"""A chunk that a source holds whole: (chunk, the source as given, its store, its rows)."""


def find_reusable(todo: Sequence[Chunk], sources: Sequence[tuple[str, Store]]) -> tuple[list[Reusable], list[Chunk]]:
    """The chunks of ``todo`` that one source holds whole (the first such source, in order),
    and the chunks left to compute. Reads only."""
    if not sources or not todo:
        return [], list(todo)
    available = [(name, src, src.done_keys()) for name, src in sources]
    found: list[Reusable] = []
    left: list[Chunk] = []
    for chunk in todo:
        for name, src, keys in available:
            if not all(k in keys for k in chunk.keys):
                continue
            rows = src.stored_trials(chunk.keys)
            if rows is None or not _whole_chunk(rows, chunk) or _part_of_larger_chunk(src, chunk):
                continue
            found.append((chunk, name, src, rows))
            break
        else:
            left.append(chunk)
    return found, left


def copy_reusable(found: Sequence[Reusable], store: Store, run_id: int, reused_from: dict[str, int]) -> tuple[int, int]:
    """Copy the chunks :func:`find_reusable` found (states first, then rows); returns the
    trials copied and the chunks copied (``reused_from`` counts per source)."""
    trials = 0
    for _chunk, name, src, rows in found:
        new = store.copy_trials(rows, run_id, _copy_states(src, rows, store))
        reused_from[name] += new
        trials += new
    if trials:
        log.info(
            "reused %d trials in %d chunks from %s",
            trials,
            len(found),
            ", ".join(f"{n} ({c})" for n, c in reused_from.items()),
        )
    return trials, len(found)


def _whole_chunk(rows: StoredTrials, chunk: Chunk) -> bool:
    """The rows are the chunk's trials of its cell, written together (one run, one transaction):
    not a mix of trials computed in differently composed chunks."""
    return (
        all(t["cell_key"] == chunk.cell.key and t["seed"] == chunk.seed for t in rows.trials)
        and len({(t["run_id"], t["written"]) for t in rows.trials}) == 1
    )


def _part_of_larger_chunk(src: Store, chunk: Chunk) -> bool:
    """The source also holds resamples of the chunk's window ``[n·c, (n+1)·c)`` that the chunk
    lacks: there the chunk was computed with more trials (a source run with more resamples,
    so a longer last chunk), and its batched passes differed."""
    q = int(chunk.cell.settings.get("queries_per_set", 1))
    size = int(chunk.cell.settings.get("chunk_size") or len(chunk.resamples) // q) * q  # pairs of chunk_size sets
    lo = chunk.number * size
    held = src.resamples_of(chunk.cell.key, chunk.seed, lo, lo + size)
    return bool(held - set(chunk.resamples))


def _copy_states(src: Store, rows: StoredTrials, store: Store) -> dict[str, tuple[str | None, int | None]]:
    """Copy the states of ``rows`` (stored in ``src``'s run directory) into one states file of
    ``store``'s run directory; trial key → (file, row) there (nothing for trials without states)."""
    refs = [(t["trial_key"], t["states_file"], t["states_row"]) for t in rows.trials]
    if any(f is None for _, f, _ in refs):
        return {}
    files: dict[str, dict[str, np.ndarray]] = {}
    for _, f, _ in refs:
        if f not in files:
            files[f] = read_chunk_states(src.path.parent / f)[1]
    names = set.intersection(*(set(a) for a in files.values()))
    arrays = {name: np.stack([files[f][name][r] for _, f, r in refs]) for name in names if name != "reference_mean"}
    if "reference_mean" in names:
        arrays["reference_mean"] = files[refs[0][1]]["reference_mean"]
    keys = [k for k, _, _ in refs]
    rel = write_chunk_states(store.path.parent, keys, arrays)
    return {k: (rel, i) for i, k in enumerate(keys)}
