"""The store's readers: its trials as pandas DataFrames with their cells' factor values.

:class:`StoreReaders` is a mixin of :class:`iclit.rundir.store.Store`: every method reads
through ``self.conn`` (the store's SQLite connection) and writes nothing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from typing import Any

import pandas as pd

__all__ = ["StoreReaders"]


class StoreReaders:
    """The reading half of a store: ``trials``, ``outputs``, ``cell_settings``, ``trial_outputs``."""

    conn: sqlite3.Connection

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
