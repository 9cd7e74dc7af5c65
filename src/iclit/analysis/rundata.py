"""A run directory read for analysis: the plan, per-trial outputs and the similarity frame.

Nothing here loads a model. (Interim: the similarity frame is read from the store's
cosines table; it moves to states computed post hoc.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["RunData", "load_run"]


@dataclass
class RunData:
    """What analysis reads of a run directory.

    latest: the last invocation's row (``plan``, ``spec_yaml``, ``versions``…) or None;
    plan: ``latest["plan"]`` unless every trial was asked for; frame: one row per trial ×
    layer × pair (factor columns, cell_key, seed, resample, query_id, demo_similarity,
    n_wrong, layer, pair, cosine, trial_key); outputs: one row per trial (factor columns,
    predictions, ``score_<arm>``, losses…); cka: per cell × seed × layer × pair
    (columns cell_key, seed, layer, pair, value), empty when not asked for.
    """

    path: Path
    latest: dict[str, Any] | None
    plan: dict[str, Any] | None
    frame: pd.DataFrame
    outputs: pd.DataFrame
    cka: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["cell_key", "seed", "layer", "pair", "value"]))


def load_run(run_dir: str | Path, *, all_trials: bool = False) -> RunData:
    """Read a run directory (FileNotFoundError if it holds no results store)."""
    from iclit.experiments.store import open_store

    with open_store(run_dir, readonly=True) as store:
        latest = store.latest_run()
        plan = None if all_trials or latest is None else latest["plan"]
        return RunData(Path(run_dir), latest, plan, store.frame(plan), store.outputs(plan))
