"""Stored hidden states, loaded back from a run directory without any model.

Example (not run: it needs a model or a run directory)::

    st = iclit.load_states("runs/main")
    st["icl"].shape            # [n_trials, L+1, d], rows in the order of st.keys
    st.frame()                 # trial_key, row: joins with `iclit results` rows on trial_key

"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["States", "load_states", "read_states"]


@dataclass
class States:
    """Per state name (``anchor``, ``icl``, ``it``, ``it_seed2``, ``icl:qmean``, ``it:step4``, …)
    an array ``[n_trials, L+1, d]`` (float32), row i belonging to trial ``keys[i]``.

    Only names stored for every selected trial are present. ``reference``: the per-layer
    reference mean ``[L+1, d]`` of each cell that asked for the centred baseline
    (cell_key → array).
    """

    keys: list[str]
    arrays: dict[str, np.ndarray]
    reference: dict[str, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            raise KeyError(f"no states {name!r} stored (stored: {', '.join(sorted(self.arrays)) or 'none'})")
        return self.arrays[name]

    def __contains__(self, name: object) -> bool:
        return name in self.arrays

    def __iter__(self) -> Iterator[str]:
        return iter(self.arrays)

    def __len__(self) -> int:
        return len(self.keys)

    def frame(self) -> pd.DataFrame:
        """``trial_key, row``: merge with any per-trial table of the run on ``trial_key``."""
        return pd.DataFrame({"trial_key": self.keys, "row": np.arange(len(self.keys))})

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}: {list(a.shape)}" for n, a in self.arrays.items())
        return f"States({len(self.keys)} trials; {shapes})"


def read_states(
    run_dir: str | Path, refs: pd.DataFrame, names: Sequence[str] | None = None, cells: Mapping[str, str] | None = None
) -> States:
    """The states of the trials in ``refs`` (columns trial_key, states_file, states_row and,
    for the reference means, cell_key), in that order. Raises ValueError for trials whose run
    stored no states."""
    from iclit.rundir.statefiles import read_chunk_states

    run_dir = Path(run_dir)
    if len(refs) and refs["states_file"].isna().any():
        n = int(refs["states_file"].isna().sum())
        raise ValueError(
            f"{run_dir}: {n} of {len(refs)} trials have no stored states (run with store_states: false, "
            "or from before states were stored); rerun them with store_states: true"
        )
    files: dict[str, dict[str, np.ndarray]] = {}
    for f in dict.fromkeys(refs["states_file"]):
        files[f] = read_chunk_states(run_dir / f, names if names is None else [*names, "reference_mean"])[1]
    present = set.intersection(*(set(a) - {"reference_mean"} for a in files.values())) if files else set()
    order = [n for n in (names or sorted(present, key=_name_order)) if n in present]
    arrays = (
        {
            name: np.stack(
                [files[f][name][int(r)] for f, r in zip(refs["states_file"], refs["states_row"], strict=True)]
            )
            for name in order
        }
        if len(refs)
        else {}
    )
    reference: dict[str, np.ndarray] = {}
    if "cell_key" in refs.columns:
        for cell, f in zip(refs["cell_key"], refs["states_file"], strict=True):
            if cell not in reference and "reference_mean" in files[f]:
                reference[cell] = files[f]["reference_mean"]
    return States(list(refs["trial_key"]), arrays, reference)


def _name_order(name: str) -> tuple[int, str]:
    base = ("anchor", "icl", "it", "it_seed2")
    arm, _, rest = name.partition(":")
    return (base.index(arm) if arm in base else len(base), f"{rest}{arm}")


def load_states(run_dir: str | Path, names: Sequence[str] | None = None, *, all_trials: bool = False) -> States:
    """The stored states of a run directory's trials (those of the last spec run there, or
    every stored trial with ``all_trials``), in the order of ``iclit results`` (cell, seed,
    resample). ``names``: only these state names. Needs no model."""
    from iclit.rundir.store import open_store

    with open_store(run_dir, readonly=True) as store:
        latest = store.latest_run()
        plan: Any = None if all_trials or latest is None else latest["plan"]
        refs = store.trials(plan)
    return read_states(run_dir, refs, names)
