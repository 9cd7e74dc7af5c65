"""Similarities computed from stored states: the per-trial × layer frame and per-cell CKA.

Everything is grouped by (cell, seed), the trials of one condition: the three pairs and the
per-trial baselines (:data:`~iclit.analysis.similarity.BASELINE_PAIRS`) of the cell's
``baselines``, the dose pairs of every captured IT step, and linear CKA across all the
queries of the group. The shuffled-pair null pairs ICL of trial i with IT of trial i + 1
(in resample order, cyclically) among all trials of the group.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from iclit.analysis.similarity import BASELINE_PAIRS, PAIRS, baseline_cosines, cka_per_layer, pairwise_cosines
from iclit.analysis.states import States

__all__ = ["FRAME_COLUMNS", "CKA_PAIRS", "pair_order", "state_tables", "group_cosines", "similarities"]

FRAME_COLUMNS = (
    "cell_key",
    "seed",
    "resample",
    "query_id",
    "demo_similarity",
    "n_wrong",
    "layer",
    "pair",
    "cosine",
    "trial_key",
)
CKA_PAIRS: dict[str, tuple[str, str]] = {
    "cka_anchor_icl": ("anchor", "icl"),
    "cka_anchor_it": ("anchor", "it"),
    "cka_icl_it": ("icl", "it"),
}
_BASELINE_ORDER = [p for pairs in BASELINE_PAIRS.values() for p in pairs]


def pair_order(pairs: Iterable[str]) -> list[str]:
    """The three pairs, then the baselines, then the dose pairs by step (ICL–IT, anchor–IT)."""

    def rank(p: str) -> tuple[int, int, int]:
        if p in PAIRS:
            return (0, PAIRS.index(p), 0)
        if p in _BASELINE_ORDER:
            return (1, _BASELINE_ORDER.index(p), 0)
        head, _, step = p.rpartition("_step")
        if step.isdigit():
            return (2, int(step), 0 if head == "icl_it" else 1)
        return (3, 0, 0)

    return sorted(dict.fromkeys(pairs), key=rank)


def _torch(states: States, rows: np.ndarray, names: Iterable[str]) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(states[n][rows]) for n in names if n in states}


def group_cosines(
    states: States, rows: np.ndarray, baselines: Iterable[str], reference: np.ndarray | None
) -> dict[str, np.ndarray]:
    """pair → ``[n, L+1]`` cosines of the trials ``rows`` of one (cell, seed) group."""
    baselines = tuple(b for b in baselines if b != "cka")
    arms = _torch(states, rows, ("anchor", "icl", "it", "it_seed2", "icl_reordered"))
    out = {p: c.numpy() for p, c in pairwise_cosines(arms).items()}
    if baselines:
        pooled = None
        if "query_mean" in baselines:
            pooled = {a: torch.from_numpy(states[f"{a}:qmean"][rows]) for a in ("anchor", "icl", "it")}
        mean = torch.from_numpy(reference) if reference is not None else None
        extra = baseline_cosines(arms, baselines, reference_mean=mean, pooled=pooled)
        out.update({p: c.numpy() for p, c in extra.items()})
    steps = sorted(int(n.split(":step")[1]) for n in states if n.startswith("it:step"))
    for s in steps:
        it = torch.from_numpy(states[f"it:step{s}"][rows])
        out[f"icl_it_step{s}"] = _cos(arms["icl"], it)
        out[f"anchor_it_step{s}"] = _cos(arms["anchor"], it)
    return out


def similarities(states: Mapping[str, Any], baselines: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """pair → ``[n, L+1]`` cosines of one group of trials from states in memory (e.g.
    :attr:`iclit.engine.evaluate.Evaluated.states`: name → ``[n, L+1, d]`` numpy or torch,
    with ``reference_mean`` ``[L+1, d]`` for the centred baseline) — what a run directory's
    frame holds for the same trials."""
    arrays = {
        n: (a.detach().cpu().float().numpy() if hasattr(a, "detach") else np.asarray(a)) for n, a in states.items()
    }
    reference = arrays.pop("reference_mean", None)
    n = len(next(iter(arrays.values())))
    return group_cosines(States([str(i) for i in range(n)], arrays), np.arange(n), baselines, reference)


def _cos(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    from iclit.analysis.similarity import cosine_per_layer

    return cosine_per_layer(a, b).numpy()


def _groups(trials: pd.DataFrame) -> Iterable[tuple[tuple[str, int], pd.DataFrame]]:
    """(cell_key, seed) → its trials in resample order."""
    for key, grp in trials.groupby(["cell_key", "seed"], sort=True):
        yield key, grp.sort_values("resample", kind="stable")


def _frame_block(sub: pd.DataFrame, cos: Mapping[str, np.ndarray], label_cols: list[str]) -> list[pd.DataFrame]:
    n, n_layers = len(sub), next(iter(cos.values())).shape[1]
    cols = {
        c: np.repeat(sub[c].to_numpy(), n_layers)
        for c in (*label_cols, "cell_key", "seed", "resample", "query_id", "demo_similarity", "n_wrong")
    }
    keys = np.repeat(sub["trial_key"].to_numpy(), n_layers)
    layers = np.tile(np.arange(n_layers), n)
    return [
        pd.DataFrame({**cols, "layer": layers, "pair": pair, "cosine": cos[pair].reshape(-1), "trial_key": keys})
        for pair in cos
    ]


def state_tables(
    run_dir: str | Path,
    trials: pd.DataFrame,
    settings: Mapping[str, Mapping[str, Any]],
    *,
    cka: bool | None = None,
    min_queries: int = 3,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(similarity frame, CKA frame) of a run's trials, read group by group from the states.

    trials: one row per trial (``Store.trials``: factor columns, cell_key, seed, resample,
    states_file, states_row, …); settings: cell_key → cell settings (its ``baselines``).

    The frame has one row per trial × layer × pair (the factor columns, then
    :data:`FRAME_COLUMNS`), ordered by cell, seed, resample, pair, layer. The CKA frame has
    linear CKA across all queries of each (cell, seed) group per layer and pair
    (:data:`CKA_PAIRS`; columns cell_key, seed, layer, pair, value, n), for the cells whose
    baselines ask for ``cka`` (``cka=None``), every cell (True) or none (False); groups with
    fewer than ``min_queries`` trials are left out.
    """
    from iclit.analysis.states import read_states

    label_cols = [c for c in trials.columns if c not in (*FRAME_COLUMNS, "n_layers", "states_file", "states_row")]
    parts: list[pd.DataFrame] = []
    cka_rows: list[dict[str, Any]] = []
    for (cell, seed), sub in _groups(trials):
        baselines = tuple(settings.get(cell, {}).get("baselines", ()))
        states = read_states(run_dir, sub)
        every = np.arange(len(sub))
        parts += _frame_block(sub, group_cosines(states, every, baselines, states.reference.get(cell)), label_cols)
        if (cka if cka is not None else "cka" in baselines) and len(sub) >= min_queries:
            arms = _torch(states, every, ("anchor", "icl", "it"))
            for pair, (a, b) in CKA_PAIRS.items():
                values = cka_per_layer(arms[a], arms[b]).numpy()
                cka_rows += [
                    {
                        "cell_key": cell,
                        "seed": int(seed),
                        "layer": layer,
                        "pair": pair,
                        "value": float(v),
                        "n": len(sub),
                    }
                    for layer, v in enumerate(values)
                ]
    cka_df = pd.DataFrame(cka_rows, columns=["cell_key", "seed", "layer", "pair", "value", "n"])
    if not parts:
        return pd.DataFrame(columns=[*label_cols, *FRAME_COLUMNS]), cka_df
    df = pd.concat(parts, ignore_index=True)
    df = df.sort_values(["cell_key", "seed", "resample", "pair", "layer"], kind="stable", ignore_index=True)
    return df[[*label_cols, *FRAME_COLUMNS]], cka_df
