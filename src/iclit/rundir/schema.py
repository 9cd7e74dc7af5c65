"""The results store's schema: its tables, their columns and its version.

Tables, per run directory's ``results.sqlite``: ``meta`` (the schema version), ``runs`` (one
row per ``iclit run``), ``cells`` (factor values and the settings a cell key hashes) and
``trials`` (one row per trial; see :mod:`iclit.rundir.store` for what each column holds).
Standard library only: the store's tests load it without the iclit package's heavy imports.
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["DB_NAME", "RUN_COLUMNS_ADDED", "SCHEMA", "SCHEMA_VERSION", "TRIAL_COLUMNS", "StoredTrials", "TrialRecord"]

SCHEMA_VERSION = 2
DB_NAME = "results.sqlite"

TrialRecord = dict[str, Any]
"""What the runner stores per trial: trial_key, cell_key, seed, resample, query_id,
n_layers (L+1), scores ({arm: float}), outputs (JSON-ready dict), demo_similarity (float or
None), n_wrong (int), seconds (float), states_file (str or None), states_row (int or None)."""

TRIAL_COLUMNS = (
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
RUN_COLUMNS_ADDED = (("reused", "INTEGER"), ("reused_from_json", "TEXT"), ("models_json", "TEXT"))
"""Columns of ``runs`` added after schema version 1 was released (added to older stores on open)."""


class StoredTrials(NamedTuple):
    """Rows of some trials exactly as a store holds them (see :meth:`Store.stored_trials`).

    trials: one dict per trial (the ``trials`` columns), in the order asked for; cells:
    ``(cell_key, labels_json, settings_json)``.
    """

    trials: list[dict[str, Any]]
    cells: list[tuple[str, str, str]]

    @property
    def keys(self) -> list[str]:
        return [t["trial_key"] for t in self.trials]


SCHEMA = """
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
