"""The crossed design's tests, from a cell's stored states: is the match between two arms
specific to the query, and to the demonstrations?

A cell reads ``S`` demonstration sets with ``Q`` queries each (:func:`iclit.tasks.draw_sets`);
consecutive sets of one *query block* share their queries. A *unit* is one (query, set)
trial. For a pair of arms (x, y) — anchor–ICL, anchor–IT, ICL–IT, or the update pair
(ICL − anchor, IT − anchor) — the observed similarity of a unit is cos(x(q, A), y(q, A)).

* **query-swap**: within one set A (and one gold label, so the swap is label-matched),
  cos(x(q, A), y(q', A)) for every other query q' — is the match specific to the query?
* **demo-swap**: for one query q read under the sets A, B… of its block,
  cos(x(q, A), y(q, B)) — is it specific to the demonstrations? (The paper's claim: ICL acts
  like tuning on *those* demonstrations.) Anchor pairs have no demo-swap (the anchor does
  not depend on the set).

Both arms of a raw pair read the query, so their states share its anchor: a raw pair's
query-swap excess is expected and says little; the update pair's (ICL − anchor vs
IT − anchor) removes that shared part and asks whether ICL and IT move *this* query the same
way. Each null's effect is the mean over units of (observed − mean over every eligible
partner); its p-value permutes the pairing inside each stratum (a set × label, or a query's
sets) with the same permutation at every layer, and max-T over layers gives the family-wise
p (:func:`iclit.analysis.inference.pairing_test`). Strata that see the same units again
share their permutation (:func:`links`): query-swap permutes a block's queries once for all
the block's sets, demo-swap swaps whole sets of a block for all its queries. The queries of
a block share its demonstration sets and are not independent, so permuting each query's sets
on its own was anti-conservative; swapping whole sets is the exact test at the level of the
sets (with two sets per block, 2^blocks distinct permutations: a smallest p near 1 /
2^blocks). CIs: a hierarchical bootstrap over query blocks (the independent units: with one
query per set, the sets), then units within blocks.
The equivalence test (TOST) is against the spec's ``equivalence_margin``.

Centrings (anisotropy corrections, applied to every state before the cosine):
``raw``; ``anchor``: subtract the per-layer mean of the cell's own anchor states (the
component every state of this task's template shares); ``arm``: subtract each arm's own
mean; ``reference``: the mean over unrelated sentences (stored with ``centered_reference``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from iclit.analysis import inference

__all__ = ["NULLS", "TEST_PAIRS", "CENTRINGS", "TEST_COLUMNS", "Units", "pair_states", "strata", "links", "null_tests",
           "unit_rows", "verdict", "adjust_family"]

NULLS = ("query_swap", "demo_swap")
TEST_PAIRS: dict[str, tuple[str, ...]] = {
    "anchor_icl": ("query_swap",),
    "anchor_it": ("query_swap",),
    "icl_it": ("query_swap", "demo_swap"),
    "update": ("query_swap", "demo_swap"),
}
"""The pairs tested, and the nulls each has."""
CENTRINGS = ("raw", "anchor", "arm", "reference")
TEST_COLUMNS = ("pair", "centring", "layer", "null", "observed", "null_mean", "diff", "ci_low", "ci_high", "p",
                "p_adj", "p_holm", "q_bh", "tost_low", "tost_high", "p_tost", "verdict", "n_units", "n_strata",
                "n_blocks")
"""One row per pair × centring × layer × null. diff = observed − null_mean (CI: 95%
hierarchical bootstrap); p: the pairing permutation test at that layer; p_adj: max-T over the
layers of the same pair × centring × null; p_holm, q_bh: Holm and Benjamini–Hochberg over the
cell's tests at that layer (every pair × centring × null); tost_low/high: the 90% CI of the
TOST; p_tost: its p against ±margin; verdict: :func:`verdict`."""


@dataclass(frozen=True)
class Units:
    """Where each of a cell's n trials sits in the design (arrays ``[n]``): seed, set, query
    block (sets sharing their queries), query id and gold label (None without labels)."""

    seed: np.ndarray
    set: np.ndarray
    block: np.ndarray
    query: np.ndarray
    label: np.ndarray

    @classmethod
    def from_trials(cls, trials: pd.DataFrame, settings: Mapping[str, Any], golds: Sequence[Any] | None = None) -> "Units":
        """trials: a cell's rows (seed, resample, query_id) in state order; settings: the
        cell's (``queries_per_set``, ``sets_per_query``); golds: each trial's gold label
        (classification) or None."""
        q = int(settings.get("queries_per_set", 1))
        m = int(settings.get("sets_per_query", 1))
        resample = trials["resample"].to_numpy(dtype=np.int64)
        sets = resample // q
        label = np.asarray(list(golds) if golds is not None else [None] * len(trials), dtype=object)
        return cls(trials["seed"].to_numpy(dtype=np.int64), sets, sets // m,
                   trials["query_id"].to_numpy(dtype=object), label)

    def __len__(self) -> int:
        return len(self.set)

    def block_ids(self) -> np.ndarray:
        """The bootstrap's top level: (seed, block) as one label per unit."""
        return np.asarray([f"{s}/{b}" for s, b in zip(self.seed, self.block)], dtype=object)


def strata(units: Units, null: str) -> list[np.ndarray]:
    """The rows of each stratum of ``null``, in row order: query-swap, the trials of one
    (seed, set, label); demo-swap, the trials of one (seed, block, query). Strata with one
    row have no partner and are left out."""
    if null == "query_swap":
        keys = zip(units.seed, units.set, units.label)
    elif null == "demo_swap":
        keys = zip(units.seed, units.block, units.query)
    else:
        raise ValueError(f"unknown null {null!r}; known: {NULLS}")
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return [np.asarray(rows) for rows in groups.values() if len(rows) >= 2]


def links(units: Units, null: str, groups: list[np.ndarray]) -> list[tuple[Any, ...]]:
    """One label per stratum of :func:`strata`; strata with the same label hold the same items
    in the same order and share one permutation (:func:`iclit.analysis.inference.pairing_test`):
    query-swap, the strata of one (seed, block, label) with the same queries (a block's sets read
    the same queries); demo-swap, the strata of one (seed, block) with the same sets."""
    if null == "query_swap":
        return [(units.seed[g[0]], units.block[g[0]], units.label[g[0]], tuple(units.query[g])) for g in groups]
    if null == "demo_swap":
        return [(units.seed[g[0]], units.block[g[0]], tuple(units.set[g])) for g in groups]
    raise ValueError(f"unknown null {null!r}; known: {NULLS}")


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def pair_states(states: Mapping[str, np.ndarray], pair: str, centring: str = "raw",
                reference: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) ``[n, L+1, d]`` float64 of a tested pair under a centring (module docstring);
    states: arm → ``[n, L+1, d]``; reference: ``[L+1, d]`` for the ``reference`` centring."""
    arm = {k: np.asarray(states[k], dtype=np.float64) for k in ("anchor", "icl", "it")}
    if pair == "update":
        return arm["icl"] - arm["anchor"], arm["it"] - arm["anchor"]
    left, right = pair.split("_")
    x, y = arm[left], arm[right]
    if centring == "raw":
        return x, y
    if centring == "anchor":
        mean = arm["anchor"].mean(axis=0)
        return x - mean, y - mean
    if centring == "arm":
        return x - x.mean(axis=0), y - y.mean(axis=0)
    if centring == "reference":
        if reference is None:
            raise ValueError("the reference centring needs the reference mean (baseline centered_reference)")
        return x - reference, y - reference
    raise ValueError(f"unknown centring {centring!r}; known: {CENTRINGS}")


def _blocks(x: np.ndarray, y: np.ndarray, rows: list[np.ndarray]) -> list[np.ndarray]:
    """Per stratum ``[m, m, L+1]``: C[a, b, l] = cos(x[rows[a], l], y[rows[b], l])."""
    xu, yu = _unit(x), _unit(y)
    return [np.einsum("ald,bld->abl", xu[r], yu[r]) for r in rows]


def unit_rows(groups: list[np.ndarray], res: "inference.PairingResult") -> np.ndarray:
    """The trial row of each unit of a pairing test over the strata ``groups``."""
    return np.asarray([groups[s][i] for s, i in zip(res.unit_stratum, res.unit_item)], dtype=np.int64)


def verdict(diff_low: float, diff_high: float, p: float, equivalent: bool, alpha: float = 0.05) -> str:
    """``above null`` / ``below null`` when the adjusted p is below alpha and the CI excludes
    0; ``equivalent`` when the TOST's CI lies inside ±margin; otherwise ``inconclusive``."""
    if np.isfinite(p) and p < alpha and (diff_low > 0 or diff_high < 0):
        return "above null" if diff_low > 0 else "below null"
    if equivalent:
        return "equivalent"
    return "inconclusive"


def adjust_family(df: pd.DataFrame, by: Sequence[str] = ("layer",)) -> pd.DataFrame:
    """Holm p and BH q over each family (the rows sharing ``by``), then the verdicts."""
    df = df.copy()
    df["p_holm"] = np.nan
    df["q_bh"] = np.nan
    for _, idx in df.groupby(list(by) if len(by) > 1 else by[0], sort=False).groups.items():
        df.loc[idx, "p_holm"] = inference.holm(df.loc[idx, "p"].to_numpy(dtype=float))
        df.loc[idx, "q_bh"] = inference.bh(df.loc[idx, "p"].to_numpy(dtype=float))
    df["verdict"] = [verdict(lo, hi, p, eq) for lo, hi, p, eq in
                     zip(df["ci_low"], df["ci_high"], df["p_holm"], df["p_tost"] < 0.05)]
    return df


def null_tests(states: Mapping[str, np.ndarray], units: Units, *, margin: float, centrings: Sequence[str] = ("raw", "anchor"),
               reference: np.ndarray | None = None, n_perm: int = 1000, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The tests of one cell (:data:`TEST_COLUMNS`), from its states (arm → ``[n, L+1, d]``,
    rows as ``units``). Families for p_holm / q_bh: one layer's tests of the cell."""
    rows: list[dict[str, Any]] = []
    blocks = units.block_ids()
    for null in NULLS:
        groups = strata(units, null)
        if not groups:
            continue
        linked = links(units, null, groups)
        for pair, nulls in TEST_PAIRS.items():
            if null not in nulls:
                continue
            for centring in (("raw",) if pair == "update" else centrings):
                x, y = pair_states(states, pair, centring, reference)
                res = inference.pairing_test(_blocks(x, y, groups), n_perm=n_perm, seed=seed, links=linked)
                order = unit_rows(groups, res)
                lo, hi = inference.hierarchical_bootstrap(res.unit_diff, blocks[order], n_boot=n_boot, seed=seed)
                tost = inference.tost(res.unit_diff, blocks[order], margin)
                for layer in range(len(res.diff)):
                    rows.append({
                        "pair": pair, "centring": centring, "layer": layer, "null": null,
                        "observed": float(res.observed[layer]), "null_mean": float(res.null[layer]),
                        "diff": float(res.diff[layer]), "ci_low": float(lo[layer]), "ci_high": float(hi[layer]),
                        "p": float(res.p[layer]), "p_adj": float(res.p_maxT[layer]),
                        "tost_low": float(np.asarray(tost.ci_low)[layer]), "tost_high": float(np.asarray(tost.ci_high)[layer]),
                        "p_tost": float(np.asarray(tost.p)[layer]), "n_units": int(res.n_units),
                        "n_strata": int(res.n_strata), "n_blocks": int(len(set(blocks[order]))),
                    })
    if not rows:
        return pd.DataFrame(columns=list(TEST_COLUMNS))
    return adjust_family(pd.DataFrame(rows))[list(TEST_COLUMNS)]
