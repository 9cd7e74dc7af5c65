"""Power before compute: what a design can reject, and what effect it can detect.

Two questions, answered without a model:

* **Can this design reject at all?** A permutation test has a smallest attainable p
  (:func:`iclit.analysis.stats.permutation.smallest_p`), and Holm over a layer's family of m tests
  multiplies the smallest p by m. With two sets per query block the demo-swap test is a sign
  flip of G block contrasts: 2 / 2^G two-sided, so 5 blocks give 1/16 before any adjustment
  and no 5-block cell can reject demo-swap at 0.05. :func:`design_floors` states this per
  null from the spec's numbers, before anything is computed (``iclit run SPEC --check``,
  ``iclit compare … --show-spec``).
* **What effect would it detect?** From a pilot run's block-level standard errors,
  :func:`detectable_effect` gives the smallest excess a t test over G blocks detects with the
  asked power after Bonferroni over the family (the first, strictest step of Holm), and
  :func:`blocks_needed` the blocks for a given effect (``iclit power RUN``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from iclit.analysis.nulls import NULLS, TEST_PAIRS
from iclit.analysis.stats import MAX_EXACT, count_patterns, smallest_p

__all__ = [
    "DesignFloor",
    "family_size",
    "design_floors",
    "floors_frame",
    "detectable_effect",
    "blocks_needed",
    "power_table",
    "plan_floors",
]

_MAX_BLOCKS = 100_000


@dataclass(frozen=True)
class DesignFloor:
    """One null of one cell's design: ``blocks`` independent query blocks, the permutation
    groups' ``patterns``, whether the test is ``exact``, its smallest p ``p_min``, the
    ``family`` of tests Holm adjusts over at a layer, the smallest Holm p ``holm_floor`` =
    min(1, family × p_min), whether that is below alpha (``reachable``) and the smallest number
    of blocks that would make it so (``blocks_needed``; None when more permutations, not
    more blocks, are needed)."""

    null: str
    blocks: int
    group_size: int
    patterns: float
    exact: bool
    p_min: float
    family: int
    holm_floor: float
    reachable: bool
    blocks_needed: int | None


def family_size(n_centrings: int = 2) -> int:
    """Tests in one layer's Holm family of a cell: every pair × null of
    :data:`~iclit.analysis.nulls.TEST_PAIRS` under each centring, the update pair raw only."""
    return sum((1 if pair == "update" else n_centrings) * len(nulls) for pair, nulls in TEST_PAIRS.items())


def _groups(null: str, n_blocks: int, sets_per_block: int, queries_per_set: int, n_labels: int) -> dict[int, int]:
    """``{group size: count}`` of the independent permutation groups of a null."""
    if null == "demo_swap":
        return {sets_per_block: n_blocks} if sets_per_block >= 2 else {}
    per_label = queries_per_set // max(1, n_labels)
    return {per_label: n_blocks * max(1, n_labels)} if per_label >= 2 else {}


def design_floors(
    *,
    n_blocks: int,
    sets_per_block: int,
    queries_per_set: int,
    n_labels: int = 1,
    n_centrings: int = 2,
    n_perm: int = 1000,
    alpha: float = 0.05,
    max_exact: int = MAX_EXACT,
) -> list[DesignFloor]:
    """The smallest attainable p of each null of a cell, before and after Holm.

    Parameters
    ----------
    n_blocks : int
        Independent query blocks (seeds × sets / sets per block).
    sets_per_block : int
        Demonstration sets that share a block's queries (demo-swap permutes them).
    queries_per_set : int
        Queries read with each set; query-swap permutes them within a gold label.
    n_labels : int
        Gold labels the queries are balanced over (1 for generation tasks).
    n_centrings : int
        Centrings tested (raw and anchor: 2; with a reference mean: 3).
    n_perm : int
        Monte Carlo permutations of the analysis (``iclit results``: 1000).
    alpha : float
        The family-wise level.

    Returns
    -------
    list of DesignFloor
        One per null the design has.

    Examples
    --------
    >>> f = design_floors(n_blocks=5, sets_per_block=2, queries_per_set=30, n_labels=2)
    >>> [(x.null, x.p_min, x.reachable, x.blocks_needed) for x in f if x.null == "demo_swap"]
    [('demo_swap', 0.0625, False, 9)]
    """
    family = family_size(n_centrings)
    out = []
    for null in NULLS:
        groups = _groups(null, n_blocks, sets_per_block, queries_per_set, n_labels)
        if not groups:
            continue
        p_min, exact = smallest_p(groups, n_perm=n_perm, max_exact=max_exact)
        floor = min(1.0, family * p_min)
        needed = None
        if floor < alpha:
            needed = n_blocks
        elif family / (n_perm + 1) < alpha:  # more blocks help until the Monte Carlo floor binds
            for g in range(1, _MAX_BLOCKS):
                more = _groups(null, g, sets_per_block, queries_per_set, n_labels)
                if more and family * smallest_p(more, n_perm=n_perm, max_exact=max_exact)[0] < alpha:
                    needed = g
                    break
        out.append(
            DesignFloor(
                null,
                n_blocks,
                next(iter(groups)),
                count_patterns(groups),
                exact,
                p_min,
                family,
                floor,
                floor < alpha,
                needed,
            )
        )
    return out


def detectable_effect(block_sd: Any, n_blocks: int, *, alpha: float = 0.05, power: float = 0.8, family: int = 1) -> Any:
    """The smallest mean excess a two-sided t test over ``n_blocks`` block contrasts of SD
    ``block_sd`` detects with probability ``power`` at level alpha / family (Bonferroni: the
    first step of Holm), by the normal-theory formula
    ``(t(1 - alpha / (2 family), G - 1) + t(power, G - 1)) × sd / sqrt(G)``.

    Examples
    --------
    >>> round(float(detectable_effect(1.0, 20)), 3)
    0.661
    """
    if n_blocks < 2:
        return np.full(np.shape(block_sd), np.nan) if np.ndim(block_sd) else float("nan")
    df = n_blocks - 1
    mult = sps.t.ppf(1 - alpha / (2 * family), df) + sps.t.ppf(power, df)
    return (
        mult * np.asarray(block_sd, dtype=np.float64) / math.sqrt(n_blocks)
        if np.ndim(block_sd)
        else float(mult * block_sd / math.sqrt(n_blocks))
    )


def blocks_needed(
    effect: float,
    block_sd: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    family: int = 1,
    max_blocks: int = _MAX_BLOCKS,
) -> int | None:
    """The fewest blocks whose :func:`detectable_effect` is at most ``effect`` (None: none
    up to ``max_blocks``, or no effect / no variance to detect)."""
    if not (effect > 0 and block_sd > 0 and np.isfinite(effect) and np.isfinite(block_sd)):
        return None
    lo, hi = 2, 2
    while detectable_effect(block_sd, hi, alpha=alpha, power=power, family=family) > effect:
        if hi >= max_blocks:
            return None
        lo, hi = hi, min(max_blocks, hi * 2)
    while lo < hi:
        mid = (lo + hi) // 2
        if detectable_effect(block_sd, mid, alpha=alpha, power=power, family=family) > effect:
            lo = mid + 1
        else:
            hi = mid
    return hi


def power_table(
    tests: pd.DataFrame, *, blocks: int | None = None, alpha: float = 0.05, power: float = 0.8
) -> pd.DataFrame:
    """Power of every test of a pilot run at its own last layer.

    tests: a run's tests (:data:`iclit.analysis.nulls.TEST_COLUMNS`, with ``cell_key``);
    blocks: the design to plan (default: the pilot's own blocks). Per row of role ``test``:
    the SD of its block contrasts (se × sqrt(blocks)), the family it is adjusted in, the
    effect detectable with the pilot's blocks and with ``blocks``, and the blocks needed to
    detect an effect as large as the row's margin (so that "equivalent" and "an effect of one
    margin" can be told apart) and as large as its observed excess.
    """
    if not len(tests):
        return pd.DataFrame()
    t = tests[tests.get("role", "test") == "test"] if "role" in tests.columns else tests
    keys = ["cell_key"] if "cell_key" in t.columns else []
    last = t[t["layer"] == (t.groupby(keys)["layer"].transform("max") if keys else t["layer"].max())]
    rows = []
    for _, r in last.iterrows():
        family = int(((t["layer"] == r["layer"]) & ((t["cell_key"] == r["cell_key"]) if keys else True)).sum())
        g = int(r["n_blocks"])
        sd = float(r["se"]) * math.sqrt(g) if np.isfinite(r["se"]) else float("nan")
        target = blocks or g
        rows.append(
            {
                **({"cell_key": r["cell_key"]} if keys else {}),
                "pair": r["pair"],
                "centring": r["centring"],
                "null": r["null"],
                "layer": int(r["layer"]),
                "diff": float(r["diff"]),
                "block_sd": sd,
                "n_blocks": g,
                "family": family,
                "detectable": detectable_effect(sd, g, alpha=alpha, power=power, family=family),
                "blocks": target,
                "detectable_at_blocks": detectable_effect(sd, target, alpha=alpha, power=power, family=family),
                "margin": float(r["margin"]),
                "blocks_for_margin": blocks_needed(float(r["margin"]), sd, alpha=alpha, power=power, family=family),
                "blocks_for_diff": blocks_needed(abs(float(r["diff"])), sd, alpha=alpha, power=power, family=family),
            }
        )
    return pd.DataFrame(rows)


def floors_frame(floors: list[DesignFloor]) -> pd.DataFrame:
    """:func:`design_floors` as a table."""
    return pd.DataFrame([asdict(f) for f in floors])


def plan_floors(cells: list[dict[str, Any]], *, n_perm: int = 1000, alpha: float = 0.05) -> pd.DataFrame:
    """:func:`design_floors` of every cell of a plan, one row per cell × null.

    cells: one mapping per cell with ``cell`` (its name), ``n_blocks``, ``sets_per_block``,
    ``queries_per_set``, ``n_labels`` and ``n_centrings``."""
    rows = []
    for c in cells:
        floors = design_floors(
            n_blocks=c["n_blocks"],
            sets_per_block=c["sets_per_block"],
            queries_per_set=c["queries_per_set"],
            n_labels=c.get("n_labels", 1),
            n_centrings=c.get("n_centrings", 2),
            n_perm=n_perm,
            alpha=alpha,
        )
        rows += [{"cell": c["cell"], **asdict(f)} for f in floors]
    return pd.DataFrame(rows)


def plan_cells(plan: Any) -> list[dict[str, Any]]:
    """The inputs of :func:`plan_floors` from an :class:`iclit.experiments.plan.Plan`: each
    cell's blocks (seeds × sets / sets per block), labels and centrings (3 with the
    ``centered_reference`` baseline)."""
    spec = plan.spec
    centrings = 3 if "centered_reference" in tuple(spec.baselines) else 2
    out = []
    factors = list(plan.factor_names)
    for c in plan.cells:
        labels = len(c.task.labels or ()) if c.task.kind == "classification" else 1
        name = ", ".join(f"{k}={c.labels[k]}" for k in factors if k in c.labels) or "the cell"
        out.append(
            {
                "cell": name,
                "n_blocks": len(spec.seeds) * -(-spec.resamples // c.sets_per_query),
                "sets_per_block": c.sets_per_query,
                "queries_per_set": c.queries_per_set,
                "n_labels": labels,
                "n_centrings": centrings,
            }
        )
    return out
