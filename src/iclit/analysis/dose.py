"""The IT dose, done right: the behaviour-matched step and a selection-aware peak.

A recipe with ``capture_steps`` stores, per trial, the IT states (``it:stepS``) and label
distributions after each of those optimiser steps. Two questions, each answered without
choosing on the numbers it reports:

* **matched step**: for query i of set A, the step at which IT's label distribution is
  closest to ICL's (mean KL(ICL ‖ IT_step)) over the *other* queries of set A (held out:
  query i is not used to choose its own step). The cosines at that step, and their
  query-swap and demo-swap nulls (:func:`iclit.analysis.nulls.null_tests`, with the ICL
  reorder ceiling as the positive control of the margin where ``icl_reordered`` is stored),
  are then those of an IT arm stopped when it behaves most like ICL. Classification tasks with
  ``queries_per_set`` ≥ 2.
* **cross-fitted peak**: the step of the highest mean last-layer ICL–IT cosine is chosen on
  the query blocks of one half (even block indices) and the cosine read at that step on the
  other half (odd), and the other way round — whole blocks, so the two halves share no
  query; the estimate is the mean over both halves' units, so the
  choice among steps does not inflate it (the naive peak, chosen and read on all sets, is
  reported beside it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from iclit.analysis import stats
from iclit.analysis.nulls import Units, null_tests

__all__ = ["DOSE_COLUMNS", "matched_steps", "dose_tables", "row_cosine"]

DOSE_COLUMNS = ("cell_key", "estimate", "step", "pair", "layer", "value", "ci_low", "ci_high", "n_units")
"""estimate: ``matched`` (each unit at its held-out behaviour-matched step; step: the median
chosen step), ``peak_crossfit`` (step chosen on the other half), ``peak_naive`` (chosen and
read on all units); value: mean cosine over units with a t interval over query blocks."""


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, None)
    q = np.clip(q, 1e-12, None)
    return (p * (np.log(p) - np.log(q))).sum(axis=-1)


def matched_steps(icl_probs: np.ndarray, step_probs: np.ndarray, sets: np.ndarray) -> np.ndarray:
    """Per unit, the index of the held-out behaviour-matched step.

    icl_probs: ``[n, C]``; step_probs: ``[n, S, C]`` (IT after each captured step); sets:
    ``[n]`` set ids. For unit i the step minimising the mean KL(ICL ‖ IT_step) over the other
    units of its set; a set of one unit uses its own (noted as not held out by the caller)."""
    kl = _kl(icl_probs[:, None, :], step_probs)  # [n, S]
    out = np.empty(len(sets), dtype=np.int64)
    for s in np.unique(sets):
        rows = np.flatnonzero(sets == s)
        total = kl[rows].sum(axis=0)
        for i in rows:
            others = (total - kl[i]) / (len(rows) - 1) if len(rows) > 1 else kl[i]
            out[i] = int(np.argmin(others))
    return out


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(-1)
    return num / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def dose_tables(
    states: Mapping[str, np.ndarray],
    outputs: pd.DataFrame,
    units: Units,
    labels: list[str],
    *,
    margin: Any = None,
    n_perm: int = 1000,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """``estimates`` (:data:`DOSE_COLUMNS` without cell_key) and ``matched_tests`` (the null
    tests of the matched-step IT arm) of one cell; empty frames without captured steps."""
    steps = sorted(int(n.split(":step")[1]) for n in states if n.startswith("it:step"))
    if not steps:
        return {"estimates": pd.DataFrame(), "matched_tests": pd.DataFrame()}
    icl, anchor = np.asarray(states["icl"], np.float64), np.asarray(states["anchor"], np.float64)
    by_step = np.stack([np.asarray(states[f"it:step{s}"], np.float64) for s in steps], axis=1)  # [n, S, L+1, d]
    blocks = units.block_ids()
    rows: list[dict[str, Any]] = []

    def add(estimate: str, step: float, pair: str, values: np.ndarray, groups: np.ndarray) -> None:
        lo, hi = stats.cluster_mean(values, groups).ci(0.95)
        for layer in range(values.shape[1]):
            rows.append(
                {
                    "estimate": estimate,
                    "step": step,
                    "pair": pair,
                    "layer": layer,
                    "value": float(np.nanmean(values[:, layer])),
                    "ci_low": float(lo[layer]),
                    "ci_high": float(hi[layer]),
                    "n_units": int(len(values)),
                }
            )

    icl_it = row_cosine(icl[:, None], by_step)  # [n, S, L+1]
    last = icl_it[:, :, -1]
    naive = int(np.argmax(last.mean(axis=0)))
    add("peak_naive", steps[naive], "icl_it", icl_it[:, naive], blocks)
    half = units.block % 2
    if len(np.unique(half)) == 2:
        picked = np.empty(len(half), dtype=np.int64)
        for h in (0, 1):
            picked[half == h] = int(np.argmax(last[half != h].mean(axis=0)))
        add(
            "peak_crossfit",
            float(np.median([steps[j] for j in picked])),
            "icl_it",
            icl_it[np.arange(len(picked)), picked],
            blocks,
        )
    tests = pd.DataFrame()
    probs = _probs(outputs, labels)
    if probs is not None and len(np.unique(units.set)) < len(units.set):
        icl_p, step_p = probs
        chosen = matched_steps(icl_p, step_p, units.set)
        it = by_step[np.arange(len(chosen)), chosen]
        median = float(np.median([steps[j] for j in chosen]))
        add("matched", median, "icl_it", row_cosine(icl, it), blocks)
        add("matched", median, "anchor_it", row_cosine(anchor, it), blocks)
        arms = {"anchor": anchor, "icl": icl, "it": it}
        if "icl_reordered" in states:  # the positive control of the ceiling rule's margin
            arms["icl_reordered"] = np.asarray(states["icl_reordered"], np.float64)
        tests = null_tests(arms, units, margin=margin, n_perm=n_perm, n_boot=n_boot, seed=seed).assign(step=median)
    return {"estimates": pd.DataFrame(rows), "matched_tests": tests}


def _probs(outputs: pd.DataFrame, labels: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(ICL ``[n, C]``, IT after each captured step ``[n, S, C]``) label distributions, or None."""
    if not labels or "label_probs" not in outputs.columns or "dose" not in outputs.columns:
        return None
    icl, steps = [], []
    for lp, d in zip(outputs["label_probs"], outputs["dose"], strict=True):
        if not isinstance(lp, Mapping) or not isinstance(d, Mapping) or "label_probs" not in d:
            return None
        icl.append([lp["icl"][label] for label in labels])
        steps.append(d["label_probs"])
    return np.asarray(icl, dtype=np.float64), np.asarray(steps, dtype=np.float64)
