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
from typing import Any, NamedTuple

import pandas as pd

__all__ = ["SCHEMA_VERSION", "DB_NAME", "Store", "StoredTrials", "TrialRecord", "open_store"]

SCHEMA_VERSION = 2
DB_NAME = "results.sqlite"

TrialRecord = dict[str, Any]
"""What the runner stores per trial: trial_key, cell_key, seed, resample, query_id,
n_layers (L+1), scores ({arm: float}), outputs (JSON-ready dict), demo_similarity (float or
None), n_wrong (int), seconds (float), states_file (str or None), states_row (int or None)."""

_TRIAL_COLUMNS = (
    "trial_key",
    "cell_key",
    "seed",
    "resample",
    "query_id",
    "n_layers",
    "demo_similarity",
    "n_wrong",
    "scores_json",
    "outputs_json",
    "seconds",
    "run_id",
    "written",
    "states_file",
    "states_row",
)
_RUN_COLUMNS_ADDED = (("reused", "INTEGER"), ("reused_from_json", "TEXT"), ("models_json", "TEXT"))
"""Columns of ``runs`` added after schema version 1 was released (added to older stores on open)."""


class StoredTrials(NamedTuple):  # not a dataclass: tests load this module on its own, outside sys.modules
    """Rows of some trials exactly as a store holds them (see :meth:`Store.stored_trials`).

    trials: one dict per trial (the ``trials`` columns), in the order asked for; cells:
    ``(cell_key, labels_json, settings_json)``.
    """

    trials: list[dict[str, Any]]
    cells: list[tuple[str, str, str]]

    @property
    def keys(self) -> list[str]:
        return [t["trial_key"] for t in self.trials]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started TEXT NOT NULL, finished TEXT, backend TEXT, host TEXT, pid INTEGER,
    spec_yaml TEXT NOT NULL, plan_json TEXT NOT NULL, versions_json TEXT,
    planned INTEGER, computed INTEGER
);
CREATE TABLE IF NOT EXISTS cells (
    cell_key TEXT PRIMARY KEY, labels_json TEXT NOT NULL, settings_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS trials (
    trial_key TEXT PRIMARY KEY,
    cell_key TEXT NOT NULL,
    seed INTEGER NOT NULL,
    resample INTEGER NOT NULL,
    query_id TEXT,
    n_layers INTEGER NOT NULL,
    demo_similarity REAL,
    n_wrong INTEGER,
    scores_json TEXT NOT NULL,
    outputs_json TEXT NOT NULL,
    seconds REAL,
    run_id INTEGER,
    written TEXT NOT NULL,
    states_file TEXT,
    states_row INTEGER
);
CREATE INDEX IF NOT EXISTS trials_cell ON trials (cell_key, seed, resample);
"""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Store:
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
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    c.execute(statement)
            c.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            have = {row[1] for row in c.execute("PRAGMA table_info(runs)")}
            for name, kind in _RUN_COLUMNS_ADDED:
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
        added = [name for name, _ in _RUN_COLUMNS_ADDED if name in have]
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
                    f"INSERT OR IGNORE INTO trials ({', '.join(_TRIAL_COLUMNS)}) "
                    f"VALUES ({','.join('?' * len(_TRIAL_COLUMNS))})",
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
                f"SELECT {', '.join(_TRIAL_COLUMNS)} FROM trials WHERE trial_key IN ({marks})", keys
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
        by_key = {r[0]: dict(zip(_TRIAL_COLUMNS, r, strict=True)) for r in rows}
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
                    f"INSERT OR IGNORE INTO trials ({', '.join(_TRIAL_COLUMNS)}) "
                    f"VALUES ({','.join('?' * len(_TRIAL_COLUMNS))})",
                    [values[col] for col in _TRIAL_COLUMNS],
                )
                new += cur.rowcount == 1
        return new

    def count(self) -> dict[str, int]:
        return {
            t: int(self.conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]) for t in ("trials", "cells", "runs")
        }

    def integrity(self) -> str:
        return str(self.conn.execute("PRAGMA integrity_check").fetchone()[0])

    # --- reading --------------------------------------------------------------------------

    def _cells(self) -> dict[str, dict[str, Any]]:
        return {k: json.loads(v) for k, v in self.conn.execute("SELECT cell_key, labels_json FROM cells")}

    def _selection(self, plan: Mapping[str, Any] | None) -> tuple[str, list[Any]]:
        """SQL condition on trials (alias t) selecting the trials of a plan (all if None)."""
        if plan is None:
            return "1", []
        cells = [c["key"] for c in plan["cells"]]
        seeds = [int(s) for s in plan["seeds"]]
        cond = (
            f"t.cell_key IN ({','.join('?' * len(cells))}) AND t.seed IN ({','.join('?' * len(seeds))}) "
            f"AND t.resample < ?"
        )
        return cond, [*cells, *seeds, int(plan.get("pairs", plan["resamples"]))]

    def with_labels(self, df: pd.DataFrame) -> pd.DataFrame:
        cells = self._cells()
        if df.empty:
            return df
        labels = pd.DataFrame([{"cell_key": k, **v} for k, v in cells.items()])
        df = df.merge(labels, on="cell_key", how="left")
        front = [c for c in labels.columns if c != "cell_key"]
        rest = [c for c in df.columns if c not in front]
        return df[front + rest]

    def trials(self, plan: Mapping[str, Any] | None = None) -> pd.DataFrame:
        """One row per trial, in (cell, seed, resample) order: factor values, cell_key, seed,
        resample, query_id, demo_similarity, n_wrong, n_layers, states_file, states_row,
        trial_key. ``plan``: only the trials of that plan (``latest_run()["plan"]``); None: all."""
        cond, args = self._selection(plan)
        df = pd.read_sql_query(
            "SELECT t.cell_key, t.seed, t.resample, t.query_id, t.demo_similarity, t.n_wrong, t.n_layers, "
            f"t.states_file, t.states_row, t.trial_key FROM trials t WHERE {cond} "
            "ORDER BY t.cell_key, t.seed, t.resample",
            self.conn,
            params=args,
        )
        return self.with_labels(df)

    def cell_settings(self) -> dict[str, dict[str, Any]]:
        """cell_key → the settings its key hashes (model, task, recipe, baselines, …)."""
        return {k: json.loads(v) for k, v in self.conn.execute("SELECT cell_key, settings_json FROM cells")}

    def outputs(self, plan: Mapping[str, Any] | None = None) -> pd.DataFrame:
        """One row per trial: factor values, seed, resample, query, gold, per-arm prediction
        and score (``score_<arm>``), IT final loss and per-step losses, demo similarity, wrong
        labels; the label distributions (``label_probs``), the dose record (``dose``) and the causal
        analyses' record (``causal``) when stored."""
        cond, args = self._selection(plan)
        rows = self.conn.execute(
            "SELECT t.trial_key, t.cell_key, t.seed, t.resample, t.query_id, t.demo_similarity, t.n_wrong, "
            "t.scores_json, t.outputs_json, t.seconds FROM trials t "
            f"WHERE {cond} ORDER BY t.cell_key, t.seed, t.resample",
            args,
        ).fetchall()
        out = []
        for key, cell, seed, resample, qid, sim, n_wrong, scores, outputs, seconds in rows:
            scores, outputs = json.loads(scores), json.loads(outputs)
            row: dict[str, Any] = {
                "cell_key": cell,
                "seed": seed,
                "resample": resample,
                "query_id": qid,
                "demo_similarity": sim,
                "n_wrong": n_wrong,
                "query": outputs.get("query"),
                "gold": outputs.get("gold"),
            }
            for arm, pred in outputs.get("predictions", {}).items():
                row[f"prediction_{arm}"] = pred
            for arm, s in scores.items():
                row[f"score_{arm}"] = s
            row["score_name"] = outputs.get("score_name")
            row["it_final_loss"] = outputs.get("it_final_loss")
            row["it_fitted"] = outputs.get("it_fitted")  # final IT answer loss under the engine's FIT_LOSS
            row["it_losses"] = outputs.get("it_losses")
            if "label_probs" in outputs:  # classification: arm → {label: probability}
                row["label_probs"] = outputs["label_probs"]
            if "dose" in outputs:  # recipe capture_steps: IT steps read, answers and scores after each
                row["dose"] = outputs["dose"]
            if "causal" in outputs:  # spec analyses: patched and steered runs (iclit.engine.causal)
                row["causal"] = outputs["causal"]
            row["seconds"] = seconds
            row["trial_key"] = key
            out.append(row)
        return self.with_labels(pd.DataFrame(out))

    def trial_outputs(self, trial_key: str) -> dict[str, Any]:
        row = self.conn.execute("SELECT outputs_json FROM trials WHERE trial_key = ?", (trial_key,)).fetchone()
        if row is None:
            raise KeyError(trial_key)
        return json.loads(row[0])


def open_store(run_dir: str | Path, *, readonly: bool = False) -> Store:
    """An existing run's store (FileNotFoundError if the directory holds none); ``readonly``:
    opened for reading only (nothing is written to it, not even the schema)."""
    return Store(run_dir, create=False, readonly=readonly)
