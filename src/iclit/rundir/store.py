"""The results store: one embedded SQLite database (WAL) per run directory.

Tables::

    cells    cell_key PK, labels (factor values, JSON), settings (what the key hashes, JSON)
    trials   trial_key PK, cell_key, seed, resample, query_id, n_layers, demo_similarity,
             n_wrong, scores (per arm, JSON), outputs (predictions, prompts, losses…, JSON),
             seconds, run_id, written, states_file + states_row (where the trial's hidden
             states are: a file under RUN/states/ and its row there; see
             :mod:`~iclit.rundir.statefiles`; NULL when the run stores no states)
    runs     one row per `iclit run` invocation: spec (YAML), plan (JSON), versions, backend,
             trials computed, trials reused from other run directories (and from which)
    meta     schema version

Safety: every chunk of trials is written in one ``BEGIN IMMEDIATE`` transaction with
``INSERT OR IGNORE`` on the trial key, so a process killed at any point leaves whole chunks
or nothing, and two writers never store a trial twice. WAL lets readers (``iclit results``,
a progress poller) read while a run writes; ``busy_timeout`` makes writers wait their turn.

Every similarity is computed from the states by :mod:`iclit.analysis`; the store keeps no
derived number. The states file of a chunk is written before its rows are committed.

Reuse: :meth:`Store.stored_trials` reads a chunk's rows from another run's store (opened
``readonly``) exactly as stored, and :meth:`Store.copy_trials` writes them here in one
transaction, verbatim (JSON text and REAL values unchanged) under the same keys, naming the
copy of their states file in this run directory.

The schema (tables, columns, version) is :mod:`iclit.rundir.schema`; the DataFrame readers
(:meth:`Store.trials`, :meth:`Store.outputs`, …) are :mod:`iclit.rundir.readers`.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from iclit.rundir.readers import StoreReaders
from iclit.rundir.schema import (
    DB_NAME,
    RUN_COLUMNS_ADDED,
    SCHEMA,
    SCHEMA_VERSION,
    TRIAL_COLUMNS,
    StoredTrials,
    TrialRecord,
)

__all__ = ["SCHEMA_VERSION", "DB_NAME", "Store", "StoredTrials", "TrialRecord", "open_store"]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Store(StoreReaders):
    """A results database. One instance per thread (SQLite connections are not shared).

    Example (not run: it needs a model or a run directory)::

        store = Store("runs/smoke")            # a run directory or a .sqlite path
        store.outputs()                        # one row per trial, with factor columns

    """

    def __init__(
        self, path: str | Path, *, timeout: float = 120.0, create: bool = True, readonly: bool = False
    ) -> None:
        path = Path(path)
        if path.suffix not in (".sqlite", ".db"):
            path = path / DB_NAME
        if (readonly or not create) and not path.exists():
            raise FileNotFoundError(f"{path}: no results store here (run `iclit run SPEC --out DIR` first)")
        self.path = path
        self.readonly = readonly
        if readonly:
            self._open_readonly(timeout)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=None, check_same_thread=False)
        self.conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        self._retry(lambda: self.conn.execute("PRAGMA journal_mode = WAL"))
        self.conn.execute("PRAGMA synchronous = NORMAL")  # durable against a killed process
        if self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone():
            self._check_version()  # an older (or newer) store is refused before anything is written to it
        with self.transaction() as c:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    c.execute(statement)
            c.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            have = {row[1] for row in c.execute("PRAGMA table_info(runs)")}
            for name, kind in RUN_COLUMNS_ADDED:
                if name not in have:
                    c.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
        self._check_version()

    def _open_readonly(self, timeout: float) -> None:
        """Open for reading only (``mode=ro``): no schema created, nothing written to the store."""
        uri = self.path.resolve().as_uri() + "?mode=ro"
        try:
            self.conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False)
            self.conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as e:
            raise RuntimeError(f"{self.path}: cannot read it as a results store ({e})") from e
        missing = {"meta", "cells", "trials", "runs"} - tables
        if missing:
            self.conn.close()
            raise RuntimeError(f"{self.path}: not a results store (no {', '.join(sorted(missing))} table)")
        self._check_version()

    def _check_version(self) -> None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = int(row[0]) if row else None
        if version != SCHEMA_VERSION:
            self.conn.close()
            raise RuntimeError(
                f"{self.path}: store schema version {version}, this iclit reads version {SCHEMA_VERSION}"
                + (
                    " (a run made before hidden states were stored: rerun it into a new directory)"
                    if version is not None and version < SCHEMA_VERSION
                    else ""
                )
            )

    @staticmethod
    def _retry(fn, attempts: int = 50):
        for i in range(attempts):
            try:
                return fn()
            except sqlite3.OperationalError as e:  # "database is locked" outside the busy handler
                if "locked" not in str(e) or i == attempts - 1:
                    raise
                time.sleep(0.1)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on any error): all or nothing; yields
        the connection (use its ``execute`` / ``executemany`` only)."""
        self._retry(lambda: self.conn.execute("BEGIN IMMEDIATE"))
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    # --- runs -----------------------------------------------------------------------------

    def begin_run(
        self,
        spec_yaml: str,
        plan: Mapping[str, Any],
        cells: Iterable[tuple[str, dict, dict]],
        *,
        backend: str,
        versions: Mapping[str, str],
    ) -> int:
        """Record an invocation and the plan's cells; returns the run id."""
        with self.transaction() as c:
            c.executemany(
                # the labels are how the latest spec names the cell's factor values (e.g. a recipe's name)
                "INSERT INTO cells (cell_key, labels_json, settings_json) VALUES (?, ?, ?) "
                "ON CONFLICT (cell_key) DO UPDATE SET labels_json = excluded.labels_json",
                [
                    (key, json.dumps(labels, sort_keys=True), json.dumps(settings, sort_keys=True))
                    for key, labels, settings in cells
                ],
            )
            cur = c.execute(
                "INSERT INTO runs (started, backend, host, pid, spec_yaml, plan_json, versions_json, planned) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    _now(),
                    backend,
                    socket.gethostname(),
                    os.getpid(),
                    spec_yaml,
                    json.dumps(plan),
                    json.dumps(dict(versions)),
                    int(plan.get("n_trials", 0)),
                ),
            )
            return int(cur.lastrowid)

    def finish_run(
        self,
        run_id: int,
        computed: int,
        reused: int | None = None,
        reused_from: Mapping[str, int] | None = None,
        models: Mapping[str, Any] | None = None,
    ) -> None:
        """Record the end of a run: trials computed, trials reused per source run directory,
        and what each model the run loaded was (source, device, dtype, layers, hidden size)."""
        with self.transaction() as c:
            c.execute(
                "UPDATE runs SET finished = ?, computed = ?, reused = ?, reused_from_json = ?, models_json = ? "
                "WHERE id = ?",
                (
                    _now(),
                    computed,
                    reused,
                    None if reused_from is None else json.dumps(dict(reused_from)),
                    None if not models else json.dumps(dict(models)),
                    run_id,
                ),
            )

    def latest_run(self) -> dict[str, Any] | None:
        """The last invocation: spec_yaml, plan (dict), versions (dict), started, finished,
        planned, computed, reused (None: no reuse asked for), reused_from ({source: trials}),
        models ({name: source, device, dtype, n_layers, hidden_size} of the models it loaded)."""
        have = {r[1] for r in self.conn.execute("PRAGMA table_info(runs)")}  # a read-only older store may lack some
        added = [name for name, _ in RUN_COLUMNS_ADDED if name in have]
        row = self.conn.execute(
            "SELECT id, started, finished, backend, host, spec_yaml, plan_json, versions_json, planned, computed"
            + "".join(f", {name}" for name in added)
            + " FROM runs ORDER BY id DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        keys = (
            "id",
            "started",
            "finished",
            "backend",
            "host",
            "spec_yaml",
            "plan",
            "versions",
            "planned",
            "computed",
            *added,
        )
        out = {"reused": None, "reused_from_json": None, "models_json": None, **dict(zip(keys, row, strict=True))}
        out["plan"] = json.loads(out["plan"])
        out["versions"] = json.loads(out["versions"] or "{}")
        reused_from = out.pop("reused_from_json")
        out["reused_from"] = json.loads(reused_from) if reused_from else {}
        models = out.pop("models_json")
        out["models"] = json.loads(models) if models else {}
        return out

    def model_info(self, name: str) -> dict[str, Any]:
        """What the latest run that loaded model ``name`` recorded of it (source, device, dtype,
        n_layers, hidden_size); {} if none did."""
        have = {r[1] for r in self.conn.execute("PRAGMA table_info(runs)")}
        if "models_json" not in have:
            return {}
        for (text,) in self.conn.execute("SELECT models_json FROM runs WHERE models_json IS NOT NULL ORDER BY id DESC"):
            found = json.loads(text).get(name)
            if found:
                return found
        return {}

    # --- trials ---------------------------------------------------------------------------

    def done_keys(self) -> set[str]:
        """Keys of every stored trial."""
        return {r[0] for r in self.conn.execute("SELECT trial_key FROM trials")}

    def has_all(self, keys: Iterable[str]) -> bool:
        keys = list(keys)
        if not keys:
            return True
        q = f"SELECT COUNT(*) FROM trials WHERE trial_key IN ({','.join('?' * len(keys))})"
        return int(self.conn.execute(q, keys).fetchone()[0]) == len(set(keys))

    def write_trials(self, records: Iterable[TrialRecord], run_id: int | None = None) -> int:
        """Store records in one transaction; already stored trials are left as they are.

        Returns how many trials were new. ``records`` is consumed inside the transaction.
        """
        written = _now()
        new = 0
        with self.transaction() as c:
            for r in records:
                cur = c.execute(
                    f"INSERT OR IGNORE INTO trials ({', '.join(TRIAL_COLUMNS)}) "
                    f"VALUES ({','.join('?' * len(TRIAL_COLUMNS))})",
                    (
                        r["trial_key"],
                        r["cell_key"],
                        int(r["seed"]),
                        int(r["resample"]),
                        r.get("query_id"),
                        int(r.get("n_layers") or 0),
                        r.get("demo_similarity"),
                        r.get("n_wrong"),
                        json.dumps(r.get("scores", {}), sort_keys=True),
                        json.dumps(r.get("outputs", {}), ensure_ascii=False),
                        r.get("seconds"),
                        run_id,
                        written,
                        r.get("states_file"),
                        r.get("states_row"),
                    ),
                )
                new += cur.rowcount == 1
        return new

    def stored_trials(self, keys: Sequence[str]) -> StoredTrials | None:
        """The rows of the trials ``keys`` as stored (one read snapshot), with their cells;
        None unless every one of them is stored here."""
        keys = list(keys)
        if not keys:
            return None
        marks = ",".join("?" * len(keys))
        self.conn.execute("BEGIN")  # one snapshot for the reads
        try:
            rows = self.conn.execute(
                f"SELECT {', '.join(TRIAL_COLUMNS)} FROM trials WHERE trial_key IN ({marks})", keys
            ).fetchall()
            if len(rows) != len(set(keys)):
                return None
            cell_keys = sorted({r[1] for r in rows})
            cells = self.conn.execute(
                "SELECT cell_key, labels_json, settings_json FROM cells "
                f"WHERE cell_key IN ({','.join('?' * len(cell_keys))})",
                cell_keys,
            ).fetchall()
        finally:
            self.conn.execute("COMMIT")
        by_key = {r[0]: dict(zip(TRIAL_COLUMNS, r, strict=True)) for r in rows}
        return StoredTrials([by_key[k] for k in dict.fromkeys(keys)], cells)

    def resamples_of(self, cell_key: str, seed: int, lo: int, hi: int) -> set[int]:
        """Resample indices in ``[lo, hi)`` stored for (cell, seed)."""
        rows = self.conn.execute(
            "SELECT resample FROM trials WHERE cell_key = ? AND seed = ? AND resample >= ? AND resample < ?",
            (cell_key, int(seed), int(lo), int(hi)),
        ).fetchall()
        return {int(r[0]) for r in rows}

    def copy_trials(
        self,
        stored: StoredTrials,
        run_id: int | None = None,
        states: Mapping[str, tuple[str | None, int | None]] | None = None,
    ) -> int:
        """Store trials read from another store (:meth:`stored_trials`) in one transaction,
        verbatim: same keys, cell, scores, outputs and seconds (``run_id``: this store's run
        that copied them; ``states``: trial key → (states file, row) of the copies of their
        states in this run directory). Trials already stored here are left as they are; their
        cells are added when missing. Returns how many trials were new."""
        states = states or {}
        new = 0
        with self.transaction() as c:
            c.executemany(
                "INSERT OR IGNORE INTO cells (cell_key, labels_json, settings_json) VALUES (?, ?, ?)", stored.cells
            )
            for t in stored.trials:
                where = states.get(t["trial_key"], (None, None))
                values = {**t, "run_id": run_id, "states_file": where[0], "states_row": where[1]}
                cur = c.execute(
                    f"INSERT OR IGNORE INTO trials ({', '.join(TRIAL_COLUMNS)}) "
                    f"VALUES ({','.join('?' * len(TRIAL_COLUMNS))})",
                    [values[col] for col in TRIAL_COLUMNS],
                )
                new += cur.rowcount == 1
        return new

    def count(self) -> dict[str, int]:
        return {
            t: int(self.conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]) for t in ("trials", "cells", "runs")
        }

    def integrity(self) -> str:
        return str(self.conn.execute("PRAGMA integrity_check").fetchone()[0])


def open_store(run_dir: str | Path, *, readonly: bool = False) -> Store:
    """An existing run's store (FileNotFoundError if the directory holds none); ``readonly``:
    opened for reading only (nothing is written to it, not even the schema)."""
    return Store(run_dir, create=False, readonly=readonly)
