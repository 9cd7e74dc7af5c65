"""The units of the contrasts: per (query, set) trial, a pair's cosine or its excess over a
null at one layer, and their means per query block.

* ``cosine``: cos(x, y) of the pair's two states (anchor–ICL, anchor–IT, ICL–IT, or the
  update pair ICL − anchor vs IT − anchor);
* ``query_swap`` / ``demo_swap``: the trial's excess over its null, cos(x(q, A), y(q, A))
  minus the mean over its eligible swapped partners (:mod:`iclit.analysis.nulls`).

The (query, set) trials of one query block share their queries and demonstration sets, so
a block's mean (:func:`block_values`) is the independent unit that
:mod:`iclit.analysis.contrasts` and :mod:`iclit.report.claims` test.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from iclit.analysis.nulls import TEST_PAIRS, Units, pair_states, strata
from iclit.analysis.rundata import RunData

__all__ = ["QUANTITIES", "block_values", "check_quantities", "unit_values"]

QUANTITIES = ("cosine", "query_swap", "demo_swap")
"""Per-trial quantities: the pair's cosine, and its excess over each null."""
_UNIT_COLUMNS = ["cell_key", "trial_key", "seed", "set", "block", "query_id", "pair", "quantity", "layer", "value"]


def check_quantities(quantities: Sequence[tuple[str, str]]) -> None:
    """Raise ValueError naming an unknown pair or quantity, or a null the pair does not have."""
    for pair, quantity in quantities:
        if pair not in TEST_PAIRS:
            raise ValueError(f"unknown pair {pair!r}; known: {', '.join(TEST_PAIRS)}")
        if quantity not in QUANTITIES:
            raise ValueError(f"unknown quantity {quantity!r}; known: {', '.join(QUANTITIES)}")
        if quantity != "cosine" and quantity not in TEST_PAIRS[pair]:
            raise ValueError(
                f"the {pair} pair has no {quantity} null (it has {', '.join(TEST_PAIRS[pair])}): "
                "the anchor does not depend on the demonstration set"
            )


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _per_unit(x: np.ndarray, y: np.ndarray, units: Units, quantity: str) -> np.ndarray:
    """``[n]``: cos(x_i, y_i), or each unit's excess over its null's partners (NaN: no partner)."""
    xu, yu = _unit(x), _unit(y)
    if quantity == "cosine":
        return np.einsum("nd,nd->n", xu, yu)
    out = np.full(len(x), np.nan)
    for rows in strata(units, quantity):
        c = xu[rows] @ yu[rows].T
        m = len(rows)
        out[rows] = np.diag(c) - (c.sum(1) - np.diag(c)) / (m - 1)
    return out


def unit_values(
    run: RunData, quantities: Sequence[tuple[str, str]], layer: int = -1, *, it_state: str = "it"
) -> pd.DataFrame:
    """Per trial with stored states, each (pair, quantity) at one layer, from the states.

    Parameters
    ----------
    run
        A run read by :func:`iclit.analysis.load_run`.
    quantities
        (pair, quantity) with pair in :data:`iclit.analysis.nulls.TEST_PAIRS` and quantity in
        :data:`QUANTITIES` (a null only where the pair has it).
    layer
        State index read in every cell; -1 (default): each cell's own last layer (cells of
        different models have different depths).
    it_state
        The stored state that plays the IT arm: ``it``, or a captured step (``it:step4``,
        recipes with ``capture_steps``); cells without it are left out.

    Returns
    -------
    pandas.DataFrame
        Columns cell_key, trial_key, seed, set, block, query_id, pair, quantity, layer (the
        index read), value (NaN for a trial without a null partner).
    """
    from iclit.analysis.states import read_states

    check_quantities(quantities)
    trials = run.trials
    if not len(trials):
        return pd.DataFrame(columns=_UNIT_COLUMNS)
    trials = trials[trials["states_file"].notna()]
    golds = run.outputs.set_index("trial_key")["gold"] if "gold" in run.outputs.columns else None
    parts = []
    for cell, sub in trials.groupby("cell_key", sort=True):
        sub = sub.sort_values(["seed", "resample"], kind="stable")
        settings = run.settings.get(cell, {})
        classification = (settings.get("task") or {}).get("kind") == "classification"
        units = Units.from_trials(
            sub, settings, golds.loc[sub["trial_key"]].tolist() if classification and golds is not None else None
        )
        states = read_states(run.path, sub, names=["anchor", "icl", it_state])
        if it_state not in states:
            continue
        n_states = states["anchor"].shape[1]
        at = n_states - 1 if layer == -1 else layer
        if not 0 <= at < n_states:
            raise ValueError(
                f"layer {layer} is outside the {n_states} states of cell {cell} (0..{n_states - 1}, "
                "or -1 for each cell's last layer)"
            )
        arrays = {"anchor": states["anchor"][:, at], "icl": states["icl"][:, at], "it": states[it_state][:, at]}
        for pair, quantity in quantities:
            x, y = pair_states(arrays, pair)
            parts.append(
                pd.DataFrame(
                    {
                        "cell_key": cell,
                        "trial_key": sub["trial_key"].to_numpy(),
                        "seed": units.seed,
                        "set": units.set,
                        "block": units.block,
                        "query_id": units.query,
                        "pair": pair,
                        "quantity": quantity,
                        "layer": at,
                        "value": _per_unit(x, y, units, quantity),
                    }
                )
            )
    return pd.concat(parts, ignore_index=True)[_UNIT_COLUMNS] if parts else pd.DataFrame(columns=_UNIT_COLUMNS)


def block_values(units: pd.DataFrame, by: Sequence[str] = ("cell_key", "pair", "quantity")) -> pd.DataFrame:
    """One value per (seed, query block): the mean over the block's trials.

    Parameters
    ----------
    units
        Per-trial values (:func:`unit_values`: at least ``seed, block, query_id, value`` and
        the columns of ``by``); NaN values are left out.
    by
        Columns that tell the compared series apart.

    Returns
    -------
    pandas.DataFrame
        Columns ``*by, seed, block, value, n_units, queries`` (the block's sorted query ids,
        a tuple: two blocks are the same units when they read the same queries).
    """
    keys = [*by, "seed", "block"]
    ok = units[units["value"].notna()]
    if ok.empty:
        return pd.DataFrame(columns=[*keys, "value", "n_units", "queries"])
    g = ok.groupby(keys, sort=True)
    out = g["value"].agg(["mean", "size"]).rename(columns={"mean": "value", "size": "n_units"})
    out["queries"] = g["query_id"].agg(lambda q: tuple(sorted(map(str, set(q)))))
    return out.reset_index()
