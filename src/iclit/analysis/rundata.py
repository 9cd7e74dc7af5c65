"""A run directory read for analysis: the plan, per-trial outputs, and similarities from the states.

Nothing here loads a model: every similarity is computed from the hidden states stored in
the run directory (:mod:`iclit.analysis.frames`), every behavioural number from the stored
outputs.

    Example (not run: it needs a model or a run directory)::

        run = load_run("runs/main")
        run.frame        # trial × layer × pair cosines
        run.outputs      # one row per trial: predictions, scores, losses

"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["RunData", "load_run"]

_CKA_COLUMNS = ["cell_key", "seed", "layer", "pair", "value"]


@dataclass
class RunData:
    """What analysis reads of a run directory.

    latest: the last invocation's row (``plan``, ``spec_yaml``, ``versions``, ``models``…)
    or None; plan: ``latest["plan"]`` unless every trial was asked for; frame: one row per
    trial × layer × pair (factor columns, cell_key, seed, resample, query_id,
    demo_similarity, n_wrong, layer, pair, cosine, trial_key); outputs: one row per trial
    (factor columns, predictions, ``score_<arm>``, losses…); cka: linear CKA across all
    queries of a cell, per cell × seed × layer × pair (columns cell_key, seed, layer, pair,
    value), for the cells that ask for the ``cka`` baseline; trials: one row per trial with
    where its states are; settings: cell_key → the cell's settings; notes: what could not be
    computed and why.
    """

    path: Path
    latest: dict[str, Any] | None
    plan: dict[str, Any] | None
    frame: pd.DataFrame
    outputs: pd.DataFrame
    cka: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=_CKA_COLUMNS))
    trials: pd.DataFrame = field(default_factory=pd.DataFrame)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def margin(self) -> float | dict[str, Any] | None:
        """The equivalence margins the spec declared (``equivalence_margin``: a number, or a
        mapping per quantity; None: the defaults of :func:`iclit.analysis.margins.margins`)."""
        return (self.plan or {}).get("equivalence_margin")

    @cached_property
    def cells(self) -> dict[str, pd.DataFrame]:
        """The whole-cell analyses (:func:`iclit.analysis.cells.cell_tables`), computed on
        first use: ``tests`` (each pair against its query-swap and demo-swap nulls),
        ``geometry`` (debiased CKA, RSA) and ``behaviour`` (agreement, KL)."""
        from iclit.analysis.cells import cell_tables

        with_states = self.trials[self.trials["states_file"].notna()] if len(self.trials) else self.trials
        return cell_tables(self.path, with_states, self.outputs, self.settings, margin=self.margin)

    @property
    def tests(self) -> pd.DataFrame:
        return self.cells["tests"]

    @property
    def geometry(self) -> pd.DataFrame:
        return self.cells["geometry"]

    @property
    def behaviour(self) -> pd.DataFrame:
        return self.cells["behaviour"]


def load_run(run_dir: str | Path, *, all_trials: bool = False, cka: bool | None = None) -> RunData:
    """Read a run directory (FileNotFoundError if it holds no results store).

    ``all_trials``: every stored trial, not only those of the last spec run there; ``cka``:
    CKA for every cell (True), none (False), or those whose baselines ask for it (None).
    """
    from iclit.analysis.frames import state_tables
    from iclit.rundir.store import open_store

    with open_store(run_dir, readonly=True) as store:
        latest = store.latest_run()
        plan = None if all_trials or latest is None else latest["plan"]
        trials = store.trials(plan)
        outputs = store.outputs(plan)
        settings = store.cell_settings()
    notes: list[str] = []
    missing = trials["states_file"].isna() if len(trials) else pd.Series(dtype=bool)
    if missing.any():
        notes.append(
            f"{int(missing.sum())} of {len(trials)} trials have no stored states (store_states: false): "
            "their similarities cannot be computed"
        )
    frame, cka_df = state_tables(run_dir, trials[~missing] if len(trials) else trials, settings, cka=cka)
    return RunData(Path(run_dir), latest, plan, frame, outputs, cka_df, trials, settings, notes)
