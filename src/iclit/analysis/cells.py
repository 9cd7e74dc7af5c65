"""Whole-cell analyses from a run's stored states and outputs: the nulls' tests
(:mod:`iclit.analysis.nulls`), the geometry of each arm pair across all of a cell's queries
(debiased linear CKA and RSA, each with a permutation null), and behaviour beside every number
(each arm's score, and prediction agreement and label-distribution KL between arms, also
under each null).

Every cell is analysed over all its seeds together (units are (seed, set, query); the
bootstrap's top level is the (seed, query block)).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from iclit.analysis import stats
from iclit.analysis.dose import DOSE_COLUMNS, dose_tables, row_cosine
from iclit.analysis.margins import margin_for, margins
from iclit.analysis.nulls import (
    NULLS,
    TEST_COLUMNS,
    Units,
    adjust_family,
    links,
    null_tests,
    strata,
    unit_rows,
)
from iclit.analysis.permutations import design_permutations

__all__ = [
    "GEOMETRY_PAIRS",
    "GEOMETRY_COLUMNS",
    "GEOMETRY_NULLS",
    "BEHAVIOUR_COLUMNS",
    "SEED_COLUMNS",
    "cell_tables",
    "geometry",
    "behaviour",
    "seed_spread",
    "last_layer_rows",
]

GEOMETRY_PAIRS: dict[str, tuple[str, str]] = {
    "anchor_icl": ("anchor", "icl"),
    "anchor_it": ("anchor", "it"),
    "icl_it": ("icl", "it"),
}
GEOMETRY_COLUMNS = ("cell_key", "pair", "measure", "null", "layer", "value", "null_mean", "p", "p_adj", "n")
"""measure: ``cka`` (debiased linear CKA, unbiased HSIC) or ``rsa`` (Spearman between the
query × query cosine matrices of the two arms); null: the permutations of the second arm's
items, as the design allows (:func:`iclit.analysis.permutations.design_permutations`):
``query_swap``, a query block's queries within one gold label, the same permutation for all
the block's sets (every pair); ``demo_swap``, a block's sets, the same permutation for all its
queries (ICL–IT only: is the shared geometry specific to the demonstrations?); ``uniform``:
all items (states without a design); null_mean, p: that permutation null (RSA: Mantel),
one-sided (greater); p_adj: max-T over layers. Values are comparable only between cells of
the same design (S, Q, sets per block): see docs/statistics.md."""
GEOMETRY_NULLS: dict[str, tuple[str, ...]] = {
    "query_swap": ("anchor_icl", "anchor_it", "icl_it"),
    "demo_swap": ("icl_it",),
}
"""The geometry nulls and the pairs each is computed for (the anchor does not depend on the set)."""
BEHAVIOUR_COLUMNS = (
    "cell_key",
    "pair",
    "measure",
    "null",
    "observed",
    "null_mean",
    "diff",
    "se",
    "ci_low",
    "ci_high",
    "p",
    "p_holm",
    "q_bh",
    "p_min",
    "exact",
    "margin",
    "tost_low",
    "tost_high",
    "p_tost",
    "verdict",
    "n_units",
)
"""measure: ``agreement`` (same prediction) or ``kl`` (KL(first ‖ second) of the label
distributions, classification only); null ``none``: the arms' own value (diff = observed);
query_swap / demo_swap: as for the cosines (:mod:`iclit.analysis.nulls`), so a negative KL
diff means the matched arms' answers are closer than swapped ones. Intervals: t over query
blocks; margin: the declared ``agreement`` (a proportion) or ``kl`` (nats) margin. Holm/BH
over the cell's behaviour tests."""


def last_layer_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of each cell's own last layer (``cell_key``, ``layer`` columns): cells of
    different models have different depths, so not the table's largest layer."""
    if not len(df):
        return df
    if "cell_key" not in df.columns:
        return df[df["layer"] == df["layer"].max()]
    return df[df["layer"] == df.groupby("cell_key")["layer"].transform("max")]


def geometry(
    states: Mapping[str, np.ndarray], units: Units | None = None, *, n_perm: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Debiased CKA and RSA of each arm pair across all the cell's trials, per layer.

    Parameters
    ----------
    states
        arm → ``[n, L+1, d]`` (``anchor``, ``icl``, ``it``), rows as ``units``.
    units
        The trials' place in the design. Given, each null permutes only what the design
        makes exchangeable (:data:`GEOMETRY_NULLS`,
        :func:`iclit.analysis.permutations.design_permutations`); trials with a NaN state in
        any arm are left out. None: one null, uniform permutations
        of the items (``null`` = ``uniform``).
    n_perm, seed
        Permutations drawn (every arrangement once when there are fewer) and their seed.

    Returns
    -------
    pandas.DataFrame
        :data:`GEOMETRY_COLUMNS` without ``cell_key``; null_mean and p are NaN where the
        design allows no permutation (e.g. one query of each label per block).
    """
    if units is None:
        nulls: dict[str, tuple[Any, tuple[str, ...]]] = {"uniform": (None, tuple(GEOMETRY_PAIRS))}
    else:
        arrays = {a: np.asarray(states[a], dtype=np.float64) for a in ("anchor", "icl", "it")}
        keep = ~np.logical_or.reduce([np.isnan(x.reshape(len(x), -1)).any(1) for x in arrays.values()])
        states = {a: x[keep] for a, x in arrays.items()}
        kept = Units(units.seed[keep], units.set[keep], units.block[keep], units.query[keep], units.label[keep])
        nulls = {
            null: (design_permutations(kept, n_perm, seed, swap=swap), GEOMETRY_NULLS[null])
            for null, swap in (("query_swap", "queries"), ("demo_swap", "sets"))
        }
    n = len(states["anchor"])
    if n < 4:
        return pd.DataFrame()
    rows = []
    for null, (perms, pairs) in nulls.items():
        found = stats.pair_tests(states, {p: GEOMETRY_PAIRS[p] for p in pairs}, n_perm=n_perm, seed=seed, perms=perms)
        for pair in pairs:
            for measure in ("cka", "rsa"):
                res = found[pair, measure]
                mean = res.get("null_mean", np.full(len(res["value"]), np.nan))
                rows += [
                    {
                        "pair": pair,
                        "measure": measure,
                        "null": null,
                        "layer": layer,
                        "value": float(v),
                        "null_mean": float(m),
                        "p": float(p),
                        "p_adj": float(q),
                        "n": n,
                    }
                    for layer, (v, m, p, q) in enumerate(zip(res["value"], mean, res["p"], res["p_maxT"], strict=True))
                ]
    return pd.DataFrame(rows)


def _label_probs(outputs: pd.DataFrame, arm: str, labels: list[str]) -> np.ndarray | None:
    if "label_probs" not in outputs.columns:
        return None
    probs = [(row or {}).get(arm) if isinstance(row, Mapping) else None for row in outputs["label_probs"]]
    present = [p for p in probs if p is not None]
    if len(present) < len(probs):
        return None
    return np.asarray([[p[label] for label in labels] for p in present], dtype=np.float64)


def behaviour(
    outputs: pd.DataFrame, units: Units, *, margin: Any = None, n_perm: int = 1000, n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Agreement and KL between arms (outputs: the cell's rows in ``units`` order); margin:
    the declared margins (:func:`iclit.analysis.margins.margins`: ``agreement``, ``kl``).
    Intervals are t intervals over query blocks, as for the cosines (n_boot is unused)."""
    from iclit.analysis.outputs import kl_divergence

    del n_boot
    declared = margins(margin)
    arms = [a for a in ("anchor", "icl", "it") if f"prediction_{a}" in outputs.columns]
    labels = None
    if "label_probs" in outputs.columns and isinstance(outputs["label_probs"].iloc[0], Mapping):
        labels = sorted(next(iter(outputs["label_probs"].iloc[0].values())))
    blocks = units.block_ids()
    rows: list[dict[str, Any]] = []
    for a, b in (("anchor", "icl"), ("anchor", "it"), ("icl", "it")):
        if a not in arms or b not in arms:
            continue
        pa, pb = outputs[f"prediction_{a}"].to_numpy(dtype=object), outputs[f"prediction_{b}"].to_numpy(dtype=object)
        measures = {"agreement": lambda i, j, pa=pa, pb=pb: (pa[i][:, None] == pb[j][None, :]).astype(np.float64)}
        qa, qb = (_label_probs(outputs, a, labels), _label_probs(outputs, b, labels)) if labels else (None, None)
        if qa is not None and qb is not None:
            measures["kl"] = lambda i, j, qa=qa, qb=qb: kl_divergence(qa[i][:, None, :], qb[j][None, :, :])
        for measure, fn in measures.items():
            every = np.arange(len(units))
            own = np.diag(fn(every, every))
            cm = stats.cluster_mean(own, blocks)
            lo, hi = cm.ci(0.95)
            rows.append(
                {
                    "pair": f"{a}_{b}",
                    "measure": measure,
                    "null": "none",
                    "observed": float(own.mean()),
                    "null_mean": np.nan,
                    "diff": float(own.mean()),
                    "se": cm.se,
                    "ci_low": lo,
                    "ci_high": hi,
                    "p": np.nan,
                    "p_min": np.nan,
                    "exact": False,
                    "margin": np.nan,
                    "n_units": len(own),
                    "p_tost": np.nan,
                }
            )
            marg = float(margin_for(declared, measure))
            for null in NULLS:
                if a == "anchor" and null == "demo_swap":
                    continue
                groups = strata(units, null)
                if not groups:
                    continue
                res = stats.pairing_test(
                    [fn(g, g)[:, :, None] for g in groups], n_perm=n_perm, seed=seed, links=links(units, null, groups)
                )
                order = unit_rows(groups, res)
                d = res.unit_diff[:, 0]
                cm = stats.cluster_mean(d, blocks[order])
                lo, hi = cm.ci(0.95)
                tost = stats.tost(d, blocks[order], marg)
                rows.append(
                    {
                        "pair": f"{a}_{b}",
                        "measure": measure,
                        "null": null,
                        "observed": float(res.observed[0]),
                        "null_mean": float(res.null[0]),
                        "diff": float(res.diff[0]),
                        "se": cm.se,
                        "ci_low": lo,
                        "ci_high": hi,
                        "p": float(res.p[0]),
                        "p_min": float(res.p_min),
                        "exact": bool(res.exact),
                        "margin": marg,
                        "tost_low": float(tost.ci_low),
                        "tost_high": float(tost.ci_high),
                        "p_tost": float(tost.p),
                        "n_units": int(res.n_units),
                    }
                )
    if not rows:
        return pd.DataFrame(columns=[c for c in BEHAVIOUR_COLUMNS if c != "cell_key"])
    df = pd.DataFrame(rows)
    df["ci_low"], df["ci_high"] = df["ci_low"].astype(float), df["ci_high"].astype(float)
    tested = df["null"] != "none"
    adjusted = adjust_family(df[tested].assign(_family=0), by=("_family",))
    for col in ("p_holm", "q_bh", "verdict"):
        df[col] = adjusted[col] if col != "verdict" else adjusted[col].astype(object).reindex(df.index).fillna("")
    return df


SEED_COLUMNS = ("cell_key", "pair", "layer", "seed1", "seed2", "unit_sd", "mean_abs_diff", "n_units")
"""The IT seed noise, where the cell has ``it_seed2`` states: a pair with IT (anchor–IT, ICL–IT)
with the first and with the second tuning seed (mean cosines), the per-unit between-seed SD
(|diff| / √2, averaged) and the mean |diff|. No effect smaller than this is a finding."""


def seed_spread(states: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """:data:`SEED_COLUMNS` (without cell_key) of one cell; empty without ``it_seed2``."""
    if "it_seed2" not in states:
        return pd.DataFrame()
    rows = []
    for pair, other in (("anchor_it", "anchor"), ("icl_it", "icl")):
        x = np.asarray(states[other], np.float64)
        a = row_cosine(x, np.asarray(states["it"], np.float64))
        b = row_cosine(x, np.asarray(states["it_seed2"], np.float64))
        diff = np.abs(a - b)
        rows += [
            {
                "pair": pair,
                "layer": layer,
                "seed1": float(a[:, layer].mean()),
                "seed2": float(b[:, layer].mean()),
                "unit_sd": float((diff[:, layer] / np.sqrt(2)).mean()),
                "mean_abs_diff": float(diff[:, layer].mean()),
                "n_units": len(x),
            }
            for layer in range(a.shape[1])
        ]
    return pd.DataFrame(rows)


def cell_tables(
    run_dir: str | Path,
    trials: pd.DataFrame,
    outputs: pd.DataFrame,
    settings: Mapping[str, Mapping[str, Any]],
    *,
    margin: Any = None,
    n_perm: int = 1000,
    n_boot: int = 1000,
    seed: int = 0,
    cache: bool | None = None,
) -> dict[str, pd.DataFrame]:
    """``tests`` (:data:`iclit.analysis.nulls.TEST_COLUMNS`), ``geometry``
    (:data:`GEOMETRY_COLUMNS`), ``behaviour`` (:data:`BEHAVIOUR_COLUMNS`), and for recipes with
    ``capture_steps`` ``dose`` (:data:`iclit.analysis.dose.DOSE_COLUMNS`) and ``dose_tests``
    (the nulls at the behaviour-matched step), and with ``it_seed2`` states ``seeds``
    (:data:`SEED_COLUMNS`, the IT seed noise) of every cell of ``trials`` (rows with stored
    states), each with a leading ``cell_key`` column.

    cache: keep each cell's tables under ``run_dir/analysis/`` and read them back when
    nothing they depend on changed (:mod:`iclit.analysis.cache`; None: unless
    ``ICLIT_ANALYSIS_CACHE=0``)."""
    from iclit.analysis import cache as cache_

    use_cache = cache_.enabled() if cache is None else cache
    params = {"margin": margins(margin), "n_perm": n_perm, "n_boot": n_boot, "seed": seed}
    parts: dict[str, list[pd.DataFrame]] = {name: [] for name in _TABLES}
    for cell, sub in trials.groupby("cell_key", sort=True):
        sub = sub.sort_values(["seed", "resample"], kind="stable")
        cell_settings = settings.get(cell, {})
        key = cache_.entry_key(cell, sub["trial_key"].tolist(), cell_settings, params) if use_cache else None
        found = cache_.load(run_dir, key) if key else None
        if found is None:
            out = outputs.set_index("trial_key").loc[sub["trial_key"]].reset_index()
            found = _one_cell(
                run_dir, cell, sub, out, cell_settings, margin=margin, n_perm=n_perm, n_boot=n_boot, seed=seed
            )
            if key:
                cache_.save(run_dir, key, found)
        for name, df in found.items():
            if len(df):
                parts[name].append(df.assign(cell_key=cell))
    return {
        name: (
            pd.concat(dfs, ignore_index=True).reindex(columns=list(_TABLES[name]))
            if dfs
            else pd.DataFrame(columns=list(_TABLES[name]))
        )
        for name, dfs in parts.items()
    }


_TABLES = {
    "tests": ("cell_key", *TEST_COLUMNS),
    "geometry": GEOMETRY_COLUMNS,
    "behaviour": BEHAVIOUR_COLUMNS,
    "dose": DOSE_COLUMNS,
    "dose_tests": ("cell_key", "step", *TEST_COLUMNS),
    "seeds": SEED_COLUMNS,
}


def _one_cell(
    run_dir: str | Path,
    cell: str,
    sub: pd.DataFrame,
    out: pd.DataFrame,
    cell_settings: Mapping[str, Any],
    *,
    margin: Any,
    n_perm: int,
    n_boot: int,
    seed: int,
) -> dict[str, pd.DataFrame]:
    """The tables of one cell (``sub``: its trials in state order, ``out``: their outputs), without cell_key."""
    from iclit.analysis.states import read_states

    kind = (cell_settings.get("task") or {}).get("kind")
    units = Units.from_trials(sub, cell_settings, out["gold"].tolist() if kind == "classification" else None)
    states = read_states(run_dir, sub)
    arrays = {a: states[a] for a in ("anchor", "icl", "it", "it_seed2", "icl_reordered") if a in states}
    labels = []
    if kind == "classification" and "label_probs" in out.columns and isinstance(out["label_probs"].iloc[0], Mapping):
        labels = list(out["label_probs"].iloc[0]["icl"])  # the task's label order (the dose lists follow it)
    reference = states.reference.get(cell)
    centrings = ("raw", "anchor", "reference") if reference is not None else ("raw", "anchor")
    found = {
        "tests": null_tests(
            arrays,
            units,
            margin=margin,
            centrings=centrings,
            reference=reference,
            n_perm=n_perm,
            n_boot=n_boot,
            seed=seed,
        ),
        "geometry": geometry(arrays, units, n_perm=n_perm, seed=seed) if len(sub) >= 4 else pd.DataFrame(),
        "behaviour": behaviour(out, units, margin=margin, n_perm=n_perm, n_boot=n_boot, seed=seed),
    }
    dose = dose_tables(
        {n: states[n] for n in states}, out, units, labels, margin=margin, n_perm=n_perm, n_boot=n_boot, seed=seed
    )
    found["dose"], found["dose_tests"] = dose["estimates"], dose["matched_tests"]
    found["seeds"] = seed_spread({n: states[n] for n in ("anchor", "icl", "it", "it_seed2") if n in states})
    return found
