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

What each null's excess can mean. Both arms of a raw pair read the query, so their states
share its anchor: a raw pair's query-swap excess is expected of any two functions of the
query (a random-weight model shows it) and says little about ICL and IT. The update pair
compares ICL − anchor with IT − anchor: the two updates share the −anchor term by
construction, so its swapped partner is taken against the partner's own anchor on both sides,
cos(ICL(q) − anchor(q'), IT(q') − anchor(q')), which keeps that shared term (independent
Gaussian states give an excess of 0; a null that subtracts each query's own anchor on each
side gives +0.5). A query-swap excess of the update pair says ICL and IT move *this* query's
state the same way beyond what subtracting a common anchor explains; it does not say the
movement is caused by the demonstrations' content — that is the demo-swap question.

Each null's effect is the mean over units of (observed − mean over every eligible partner);
its p-value permutes the pairing inside each stratum (a set × label, or a query's sets) with
the same permutation at every layer, step-down max-T over layers gives the family-wise p
(:func:`iclit.analysis.stats.pairing_test`), exact when the design has at most
:data:`~iclit.analysis.stats.MAX_EXACT` distinct pairings. Strata that see the same units
again share their permutation (:func:`links`): query-swap permutes a block's queries once for
all the block's sets, demo-swap swaps whole sets of a block for all its queries — with two
sets per block a sign flip of the G block contrasts, exact over 2^G patterns, smallest
two-sided p 2 / 2^G (1/16 with 5 blocks: such a cell cannot reject at 0.05). CIs are t
intervals over query blocks, the independent units (:func:`iclit.analysis.stats.cluster_mean`),
with the same standard error as the equivalence test (TOST) beside them. The query-swap p is
a randomisation test conditional on the blocks (queries exchangeable within a block and
label), the CI generalises over blocks: a verdict needs both.

Positive controls. Where the cell has the states, the same contrasts are computed for two
ceilings (:data:`CEILINGS`): IT seed 1 against IT seed 2 (``it_seed2``), and ICL against ICL
with its demonstrations reordered (``icl_reordered``). Under demo-swap they show the
specificity to the demonstration set that must exist (an adapter tuned on set A is closer to
another adapter tuned on A than to one tuned on B); ICL–IT specificity is reported as a
fraction of it. Equivalence margins are declared per quantity (:func:`iclit.analysis.margins.margin_for`); the
default rule is a quarter of the ceiling's excess at the same null, centring and layer.

Centrings (anisotropy corrections, applied to every state before the cosine):
``raw``; ``anchor``: subtract the per-layer mean of the cell's own anchor states (the
component every state of this task's template shares); ``arm``: subtract each arm's own
mean; ``reference``: the mean over unrelated sentences (stored with ``centered_reference``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from iclit.analysis import stats
from iclit.analysis.margins import margin_for, margins, quantity, verdict

__all__ = [
    "NULLS",
    "TEST_PAIRS",
    "CEILINGS",
    "PAIR_NAMES",
    "CENTRINGS",
    "TEST_COLUMNS",
    "Units",
    "centre",
    "pair_states",
    "stratum_matrices",
    "strata",
    "links",
    "null_tests",
    "unit_rows",
    "adjust_family",
]

NULLS = ("query_swap", "demo_swap")
TEST_PAIRS: dict[str, tuple[str, ...]] = {
    "anchor_icl": ("query_swap",),
    "anchor_it": ("query_swap",),
    "icl_it": ("query_swap", "demo_swap"),
    "update": ("query_swap", "demo_swap"),
}
"""The pairs tested, and the nulls each has."""
CEILINGS: dict[str, tuple[str, str]] = {"ceiling_it": ("it", "it_seed2"), "ceiling_icl": ("icl", "icl_reordered")}
"""The positive controls: two arms that must share what their demonstration set gave them.
``ceiling_it`` is preferred as the reference of the margin rule and the fraction."""
PAIR_NAMES: dict[str, str] = {
    "anchor_icl": "anchor–ICL",
    "anchor_it": "anchor–IT",
    "icl_it": "ICL–IT",
    "update": "update",
    "ceiling_it": "IT–IT′",
    "update_ceiling_it": "update IT–IT′",
    "ceiling_icl": "ICL–ICL reordered",
    "update_ceiling_icl": "update ICL–ICL′",
}
"""Display names of :data:`TEST_PAIRS` and of the ceilings (with their updates), the one
spelling every table uses."""
CENTRINGS = ("raw", "anchor", "arm", "reference")
TEST_COLUMNS = (
    "pair",
    "centring",
    "layer",
    "null",
    "role",
    "observed",
    "null_mean",
    "diff",
    "se",
    "ci_low",
    "ci_high",
    "p",
    "p_adj",
    "p_holm",
    "q_bh",
    "p_min",
    "exact",
    "n_perm",
    "margin",
    "tost_low",
    "tost_high",
    "p_tost",
    "ceiling",
    "ceiling_diff",
    "ceiling_p",
    "fraction",
    "fraction_low",
    "fraction_high",
    "verdict",
    "n_units",
    "n_strata",
    "n_blocks",
)
"""One row per pair × centring × layer × null. role: ``test`` (the pairs of
:data:`TEST_PAIRS`) or ``control`` (the ceilings of :data:`CEILINGS`). diff = observed −
null_mean, se its standard error over query blocks, ci_low/high the 95% t interval; p: the
pairing permutation test at that layer, exact (``exact``, every pairing of ``n_perm``
enumerated) or Monte Carlo; p_min: the smallest p this design can give; p_adj: step-down
max-T over the layers of the same pair × centring × null; p_holm, q_bh: Holm and
Benjamini–Hochberg over the cell's tests of the same role at that layer (every pair ×
centring × null); margin: the equivalence margin of the row's quantity (NaN: none declared
and no ceiling); tost_low/high: the 90% t interval of the TOST (the same se), p_tost its p;
ceiling, ceiling_diff, ceiling_p: the positive control of a test row (same null, centring and
layer); fraction (low, high): diff / ceiling_diff with a 95% delta-method interval over blocks;
verdict: :func:`verdict`."""


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
    def from_trials(
        cls, trials: pd.DataFrame, settings: Mapping[str, Any], golds: Sequence[Any] | None = None
    ) -> Units:
        """trials: a cell's rows (seed, resample, query_id) in state order; settings: the
        cell's (``queries_per_set``, ``sets_per_query``); golds: each trial's gold label
        (classification) or None."""
        q = int(settings.get("queries_per_set", 1))
        m = int(settings.get("sets_per_query", 1))
        resample = trials["resample"].to_numpy(dtype=np.int64)
        sets = resample // q
        label = np.asarray(list(golds) if golds is not None else [None] * len(trials), dtype=object)
        return cls(
            trials["seed"].to_numpy(dtype=np.int64), sets, sets // m, trials["query_id"].to_numpy(dtype=object), label
        )

    def __len__(self) -> int:
        return len(self.set)

    def block_ids(self) -> np.ndarray:
        """The independent units: (seed, block) as one label per unit."""
        return np.asarray([f"{s}/{b}" for s, b in zip(self.seed, self.block, strict=True)], dtype=object)


def strata(units: Units, null: str) -> list[np.ndarray]:
    """The rows of each stratum of ``null``, in row order: query-swap, the trials of one
    (seed, set, label); demo-swap, the trials of one (seed, block, query). Strata with one
    row have no partner and are left out."""
    if null == "query_swap":
        keys = zip(units.seed, units.set, units.label, strict=True)
    elif null == "demo_swap":
        keys = zip(units.seed, units.block, units.query, strict=True)
    else:
        raise ValueError(f"unknown null {null!r}; known: {NULLS}")
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return [np.asarray(rows) for rows in groups.values() if len(rows) >= 2]


def links(units: Units, null: str, groups: list[np.ndarray]) -> list[tuple[Any, ...]]:
    """One label per stratum of :func:`strata`; strata with the same label hold the same items
    in the same order and share one permutation (:func:`iclit.analysis.stats.pairing_test`):
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


def centre(
    x: np.ndarray, y: np.ndarray, centring: str, anchor: np.ndarray | None = None, reference: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Two arms' states ``[n, L+1, d]`` under a centring (module docstring); anchor: the
    cell's anchor states (``anchor`` centring), reference: ``[L+1, d]``."""
    if centring == "raw":
        return x, y
    if centring == "anchor":
        if anchor is None:
            raise ValueError("the anchor centring needs the cell's anchor states")
        mean = anchor.mean(axis=0)
        return x - mean, y - mean
    if centring == "arm":
        return x - x.mean(axis=0), y - y.mean(axis=0)
    if centring == "reference":
        if reference is None:
            raise ValueError("the reference centring needs the reference mean (baseline centered_reference)")
        return x - reference, y - reference
    raise ValueError(f"unknown centring {centring!r}; known: {CENTRINGS}")


def pair_states(
    states: Mapping[str, np.ndarray], pair: str, centring: str = "raw", reference: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) ``[n, L+1, d]`` float64 of a tested pair under a centring (module docstring);
    states: arm → ``[n, L+1, d]``; reference: ``[L+1, d]`` for the ``reference`` centring.
    The update pair is (ICL − anchor, IT − anchor), each unit against its own anchor (its
    nulls use :func:`stratum_matrices`, which keeps the shared anchor in swapped partners)."""
    arm = {k: np.asarray(states[k], dtype=np.float64) for k in ("anchor", "icl", "it")}
    if pair == "update":
        return arm["icl"] - arm["anchor"], arm["it"] - arm["anchor"]
    left, right = pair.split("_")
    return centre(arm[left], arm[right], centring, arm["anchor"], reference)


def stratum_matrices(
    x: np.ndarray, y: np.ndarray, rows: list[np.ndarray], anchor: np.ndarray | None = None
) -> list[np.ndarray]:
    """Per stratum ``[m, m, L+1]``: ``C[a, b, l] = cos(x[a], y[b])`` at layer l, rows a, b of
    the stratum. With ``anchor`` (an update pair), ``C[a, b] = cos(x[a] − anchor[b],
    y[b] − anchor[b])``: every partner's update is taken against the partner's own anchor on
    both sides, so the matched pairing (a = b) and the swapped ones share the −anchor term
    alike."""
    if anchor is None:
        xu, yu = _unit(x), _unit(y)
        return [np.einsum("ald,bld->abl", xu[r], yu[r]) for r in rows]
    out = []
    for r in rows:
        xs, a = x[r], anchor[r]
        ys = y[r] - a
        num = np.einsum("ald,bld->abl", xs, ys) - np.einsum("bld,bld->bl", a, ys)[None]
        nx = (xs**2).sum(-1)[:, None] - 2 * np.einsum("ald,bld->abl", xs, a) + (a**2).sum(-1)[None]
        ny = np.linalg.norm(ys, axis=-1)[None]
        out.append(num / np.maximum(np.sqrt(np.maximum(nx, 0.0)) * ny, 1e-12))
    return out


def unit_rows(groups: list[np.ndarray], res: stats.PairingResult) -> np.ndarray:
    """The trial row of each unit of a pairing test over the strata ``groups``."""
    return np.asarray([groups[s][i] for s, i in zip(res.unit_stratum, res.unit_item, strict=True)], dtype=np.int64)


def adjust_family(df: pd.DataFrame, by: Sequence[str] = ("layer",)) -> pd.DataFrame:
    """Holm p and BH q over each family (the rows sharing ``by``, and ``role`` where the table
    has it: tests and controls are separate families), then the verdicts."""
    df = df.copy()
    df["p_holm"] = np.nan
    df["q_bh"] = np.nan
    keys = list(by) + (["role"] if "role" in df.columns and "role" not in by else [])
    for _, idx in df.groupby(keys if len(keys) > 1 else keys[0], sort=False).groups.items():
        df.loc[idx, "p_holm"] = stats.holm(df.loc[idx, "p"].to_numpy(dtype=float))
        df.loc[idx, "q_bh"] = stats.bh(df.loc[idx, "p"].to_numpy(dtype=float))
    se = df["se"] if "se" in df.columns else pd.Series(1.0, index=df.index)
    margin = df["margin"] if "margin" in df.columns else pd.Series(np.nan, index=df.index)
    df["verdict"] = [
        verdict(lo, hi, p, eq, se=s, margin=m)
        for lo, hi, p, eq, s, m in zip(
            df["ci_low"], df["ci_high"], df["p_holm"], df["p_tost"] < 0.05, se, margin, strict=True
        )
    ]
    return df


@dataclass(frozen=True)
class _Tested:
    """One pairing test with its block-level summaries, per layer."""

    res: stats.PairingResult
    cm: stats.ClusterMean
    unit_blocks: np.ndarray
    unit_order: np.ndarray


def _run_pair(
    x: np.ndarray,
    y: np.ndarray,
    groups: list[np.ndarray],
    linked: list[Any],
    blocks: np.ndarray,
    anchor: np.ndarray | None,
    n_perm: int,
    seed: int,
) -> _Tested:
    res = stats.pairing_test(stratum_matrices(x, y, groups, anchor), n_perm=n_perm, seed=seed, links=linked)
    order = unit_rows(groups, res)
    return _Tested(res, stats.cluster_mean(res.unit_diff, blocks[order]), blocks[order], order)


def _rows(t: _Tested, base: dict[str, Any], margin: Any, control: _Tested | None, control_name: str) -> list[dict]:
    res, cm = t.res, t.cm
    lo, hi = cm.ci(0.95)
    marg = np.broadcast_to(np.asarray(margin, dtype=np.float64), res.diff.shape)
    tost = stats.tost(res.unit_diff, t.unit_blocks, np.where(np.isfinite(marg), marg, np.nan))
    frac = (np.full(res.diff.shape, np.nan),) * 3
    if control is not None and np.array_equal(control.unit_order, t.unit_order):
        frac = stats.ratio_ci(res.unit_diff, control.res.unit_diff, t.unit_blocks)
    rows = []
    for layer in range(len(res.diff)):
        rows.append(
            base
            | {
                "layer": layer,
                "observed": float(res.observed[layer]),
                "null_mean": float(res.null[layer]),
                "diff": float(res.diff[layer]),
                "se": float(cm.se[layer]),
                "ci_low": float(lo[layer]),
                "ci_high": float(hi[layer]),
                "p": float(res.p[layer]),
                "p_adj": float(res.p_maxT[layer]),
                "p_min": float(res.p_min),
                "exact": bool(res.exact),
                "n_perm": int(res.n_perm),
                "margin": float(marg[layer]),
                "tost_low": float(tost.ci_low[layer]),
                "tost_high": float(tost.ci_high[layer]),
                "p_tost": float(tost.p[layer]),
                "ceiling": control_name if control is not None else "",
                "ceiling_diff": float(control.res.diff[layer]) if control is not None else np.nan,
                "ceiling_p": float(control.res.p[layer]) if control is not None else np.nan,
                "fraction": float(frac[0][layer]),
                "fraction_low": float(frac[1][layer]),
                "fraction_high": float(frac[2][layer]),
                "n_units": int(res.n_units),
                "n_strata": int(res.n_strata),
                "n_blocks": int(len(set(t.unit_blocks))),
            }
        )
    return rows


def null_tests(
    states: Mapping[str, np.ndarray],
    units: Units,
    *,
    margin: Any = None,
    centrings: Sequence[str] = ("raw", "anchor"),
    reference: np.ndarray | None = None,
    n_perm: int = 1000,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """The tests of one cell (:data:`TEST_COLUMNS`), from its states (arm → ``[n, L+1, d]``,
    rows as ``units``), with the ceilings of :data:`CEILINGS` where their arms are stored.

    margin: the declared equivalence margins (:func:`margins`: a number, a mapping per
    quantity, or None for :data:`iclit.analysis.margins.DEFAULT_MARGINS`). Families for p_holm / q_bh: one layer's
    tests of the cell, and separately its controls. n_boot is unused (intervals are t
    intervals over blocks) and kept so that callers' analysis settings stay one mapping."""
    del n_boot
    declared = margins(margin)
    arm = {k: np.asarray(v, dtype=np.float64) for k, v in states.items()}
    anchor = arm["anchor"]
    rows: list[dict[str, Any]] = []
    blocks = units.block_ids()
    ceilings = {name: pair for name, pair in CEILINGS.items() if all(a in arm for a in pair)}
    for null in NULLS:
        groups = strata(units, null)
        if not groups:
            continue
        linked = links(units, null, groups)

        def run(
            x: np.ndarray, y: np.ndarray, with_anchor: bool = False, groups: Any = groups, linked: Any = linked
        ) -> _Tested:
            return _run_pair(x, y, groups, linked, blocks, anchor if with_anchor else None, n_perm, seed)

        for centring in centrings:
            controls = {
                name: run(*centre(arm[a], arm[b], centring, anchor, reference)) for name, (a, b) in ceilings.items()
            }
            if centring == "raw":
                controls |= {
                    f"update_{name}": run(arm[a], arm[b], with_anchor=True) for name, (a, b) in ceilings.items()
                }
            for name, t in controls.items():
                rows += _rows(
                    t,
                    {"pair": name, "centring": centring, "null": null, "role": "control"},
                    margin_for(declared, quantity(name, centring), np.full(t.res.diff.shape, np.nan)),
                    None,
                    "",
                )
            for pair, nulls in TEST_PAIRS.items():
                if null not in nulls or (pair == "update" and centring != "raw"):
                    continue
                prefix = "update_" if pair == "update" else ""
                name = next((prefix + c for c in CEILINGS if prefix + c in controls), "")
                control = controls.get(name)
                if pair == "update":
                    t = run(arm["icl"], arm["it"], with_anchor=True)
                else:
                    t = run(*pair_states(arm, pair, centring, reference))
                ceiling = control.res.diff if control is not None else np.full(t.res.diff.shape, np.nan)
                rows += _rows(
                    t,
                    {"pair": pair, "centring": centring, "null": null, "role": "test"},
                    margin_for(declared, quantity(pair, centring), ceiling),
                    control,
                    name,
                )
    if not rows:
        return pd.DataFrame(columns=list(TEST_COLUMNS))
    return adjust_family(pd.DataFrame(rows))[list(TEST_COLUMNS)]
