"""The causal analyses' tables (``iclit results RUN --metric patch`` / ``--metric steer``),
from the records the engine stored per trial (:mod:`iclit.engine.causal`); no model.

Per run r (a patched or steered run, or an unpatched one) of a unit (one (query, set) trial):

* classification: ``kl_icl`` = KL(P_ICL ‖ P_r) and ``kl_it`` = KL(P_IT ‖ P_r) over the task's
  labels (P_ICL, P_IT: the query's own unpatched ICL and IT runs), ``accuracy`` = the arg-max
  label is the gold one;
* generation: ``logp`` = log P(gold answer's first token), full vocabulary.

**Fractions.** A patch goes into a run B — the anchor run (``icl_into_anchor``,
``it_into_anchor``, steering), the tuned model's query run (``icl_into_it``) or the ICL run
(``it_into_icl``) — and ``frac_X`` is the share of the distance from B to arm X's behaviour
that it closes, as a ratio of means over the cell's units::

    classification:  frac_X = 1 − mean KL(P_X ‖ P_r) / mean KL(P_X ‖ P_B)
    generation:      frac_X = (mean logp_r − mean logp_B) / (mean logp_X − mean logp_B)

1: the run behaves as X does; 0: no closer to X than B was; negative: further away. So
``it_into_anchor``'s ``frac_icl`` at layer ℓ is *the fraction of ICL's behaviour (its move
away from the anchor) that the IT state at ℓ carries*, beside ``icl_into_anchor``'s
``frac_icl`` (the ICL state's own; 1 at the last state index). A ratio of means, not a mean
of ratios: a unit on which ICL barely moves the anchor would make its own ratio explode. A
fraction towards B itself (``icl_into_it``'s ``frac_it``, ``it_into_icl``'s ``frac_icl``)
has no distance to close and is left out.

**Intervals and tests.** Every value is a mean over units (or a ratio of means) with a 95%
percentile CI from a bootstrap of query blocks
(:func:`iclit.analysis.stats.hierarchical_bootstrap_means` with ``within=False``): the
blocks (the sets that share their queries, :class:`iclit.analysis.nulls.Units`; with one
query per set, the sets) are the independent units and are resampled whole, so a block's
units stay balanced over its sets and queries as the design made them (a ratio of means has
no t interval); cells pool their seeds.
Steering adds the contrasts ``it-random_it`` and ``icl-random_icl``: per unit, the vector's
measure minus the mean over its random draws of the same norm, with the CI and a two-sided
sign-flip p that flips whole blocks (exact when there are at most 2^13 flips); ``p_holm``:
Holm over the family of one cell × contrast × measure, i.e. over its steer layers × scales.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from iclit.analysis import stats
from iclit.analysis.nulls import Units
from iclit.analysis.registry import register_metric
from iclit.analysis.rundata import RunData

__all__ = [
    "PATCH_COLUMNS",
    "STEER_COLUMNS",
    "BASE_OF",
    "CONTRASTS",
    "patch_table",
    "steer_table",
    "cluster_sign_flip",
    "has_causal",
]

PATCH_COLUMNS = ("cell_key", "kind", "layer", "measure", "value", "ci_low", "ci_high", "n_units", "n_blocks")
"""kind: a patch (:data:`iclit.engine.causal.PATCH_KINDS`) or an unpatched run (``anchor_run``,
``icl_run``, ``it_run``: layer <NA>); measure: kl_icl, kl_it, accuracy, frac_icl, frac_it
(classification) or logp, frac_icl, frac_it (generation)."""
STEER_COLUMNS = (
    "cell_key",
    "vector",
    "layer",
    "scale",
    "measure",
    "value",
    "ci_low",
    "ci_high",
    "p",
    "p_holm",
    "n_units",
    "n_blocks",
)
"""vector: icl, it, random_icl, random_it (the random draws of a unit averaged first), the
contrasts it-random_it and icl-random_icl (value: the mean difference; p, p_holm), or an
unpatched run (anchor_run, icl_run — the ceiling —, it_run: layer and scale <NA>)."""
BASE_OF = {"icl_into_anchor": "anchor", "it_into_anchor": "anchor", "icl_into_it": "it", "it_into_icl": "icl"}
"""The run each patch goes into (B of the fractions)."""
CONTRASTS = {"it-random_it": ("it", "random_it"), "icl-random_icl": ("icl", "random_icl")}
N_BOOT = 1000
N_FLIPS = 10000


def has_causal(outputs: pd.DataFrame) -> bool:
    """Whether any trial of ``outputs`` carries a causal record."""
    return "causal" in outputs.columns and bool(outputs["causal"].map(lambda c: isinstance(c, Mapping)).any())


# ------------------------------------------------------------------ per-unit measures


def _logp(x: Any) -> np.ndarray:
    """Stored values → float64 log-probabilities renormalised over the last axis."""
    a = np.asarray(x, dtype=np.float64)
    m = a.max(axis=-1, keepdims=True)
    return a - (m + np.log(np.exp(a - m).sum(axis=-1, keepdims=True)))


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(P ‖ Q) of log-probabilities over the last axis (broadcast)."""
    prob = np.exp(p)
    return np.where(prob > 0, prob * (p - q), 0.0).sum(axis=-1).clip(min=0.0)


class _Cell:
    """One cell's records as arrays: ``ref[arm]`` [n, v]; ``classification``; gold label index."""

    def __init__(self, rows: pd.DataFrame) -> None:
        recs = list(rows["causal"])
        self.recs = recs
        self.classification = recs[0].get("measure") == "labels"
        self.ref = {
            a: _logp([r[a] for r in recs]) if self.classification else np.asarray([r[a][0] for r in recs], float)
            for a in ("anchor", "icl", "it")
        }
        if self.classification:
            labels = [list(r["labels"]) for r in recs]
            self.gold = np.asarray(
                [lab.index(g) if g in lab else -1 for lab, g in zip(labels, rows["gold"], strict=True)]
            )

    def runs(self, values: Any) -> np.ndarray:
        """Stored values [n, …, v] → log-probabilities [n, …, v] (classification) or logp [n, …]."""
        return _logp(values) if self.classification else np.asarray(values, dtype=np.float64)[..., 0]

    def measures(self, lp: np.ndarray) -> dict[str, np.ndarray]:
        """Per-unit measures of runs ``lp`` [n, …(, v)] → name → [n, …]."""
        if not self.classification:
            return {"logp": lp}
        extra = (None,) * (lp.ndim - 2)
        icl, it = self.ref["icl"][(slice(None), *extra)], self.ref["it"][(slice(None), *extra)]
        gold = self.gold.reshape(-1, *([1] * (lp.ndim - 2)))
        return {
            "kl_icl": _kl(icl, lp),
            "kl_it": _kl(it, lp),
            "accuracy": (lp.argmax(axis=-1) == gold).astype(np.float64),
        }

    def fraction_parts(self, base: str) -> dict[str, np.ndarray]:
        """The per-unit columns the fractions towards icl and it from run ``base`` need."""
        if self.classification:
            return {f"den_{x}": _kl(self.ref[x], self.ref[base]) for x in ("icl", "it")}
        return {"logp_base": self.ref[base], "logp_icl": self.ref["icl"], "logp_it": self.ref["it"]}


def _fraction_within(
    mean: Callable[[str], np.ndarray], classification: bool, base: str, run: str, x: str
) -> np.ndarray:
    """:func:`_fraction` of ``run`` when the per-arm columns are stored under ``base/``."""
    return _fraction(classification, lambda name: mean(name if ":" in name else f"{base}/{name}"), run, x)


def _fraction(classification: bool, mean: Callable[[str], np.ndarray], run: str, x: str) -> np.ndarray:
    """frac_x of the run whose column means are ``mean(f"{run}:<measure>")`` (module docstring)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if classification:
            return 1.0 - mean(f"{run}:kl_{x}") / mean(f"den_{x}")
        return (mean(f"{run}:logp") - mean("logp_base")) / (mean(f"logp_{x}") - mean("logp_base"))


class _Estimates:
    """Means (and derived ratios) of named per-unit columns with CIs from one set of draws of
    a bootstrap of query blocks."""

    def __init__(self, columns: Mapping[str, np.ndarray], blocks: np.ndarray, *, seed: int) -> None:
        self.names = list(columns)
        matrix = np.column_stack([np.asarray(columns[c], dtype=np.float64) for c in self.names])
        keep = ~np.isnan(matrix).any(axis=1)
        self.index = {c: j for j, c in enumerate(self.names)}
        self.point = matrix[keep].mean(axis=0) if keep.any() else np.full(len(self.names), np.nan)
        self.draws = stats.hierarchical_bootstrap_means(matrix, blocks, n_boot=N_BOOT, seed=seed, within=False)
        self.n_units, self.n_blocks = int(keep.sum()), int(len(set(blocks[keep])))

    def of(self, fn: Callable[[Callable[[str], np.ndarray]], np.ndarray]) -> tuple[float, float, float]:
        """(value, ci_low, ci_high) of ``fn(mean)``, ``mean(name)`` the column's mean."""
        value = fn(lambda c: self.point[self.index[c]])
        drawn = fn(lambda c: self.draws[:, self.index[c]])
        ok = np.isfinite(drawn)
        if not np.isfinite(value) or not ok.any():
            return float(value), np.nan, np.nan
        lo, hi = np.quantile(drawn[ok], [0.025, 0.975])
        return float(value), float(lo), float(hi)

    def mean(self, name: str) -> tuple[float, float, float]:
        return self.of(lambda m: m(name))


def _cells(run: RunData) -> list[tuple[str, pd.DataFrame, Units]]:
    """(cell_key, its trials with a causal record in (seed, resample) order, their units)."""
    o = run.outputs
    if not has_causal(o):
        return []
    o = o[o["causal"].map(lambda c: isinstance(c, Mapping))]
    out = []
    for cell, sub in o.groupby("cell_key", sort=True):
        sub = sub.sort_values(["seed", "resample"], kind="stable").reset_index(drop=True)
        out.append((cell, sub, Units.from_trials(sub, run.settings.get(cell, {}))))
    return out


def _row(cell: str, est: _Estimates, value: tuple[float, float, float], **keys: Any) -> dict[str, Any]:
    return {
        "cell_key": cell,
        **keys,
        "value": value[0],
        "ci_low": value[1],
        "ci_high": value[2],
        "n_units": est.n_units,
        "n_blocks": est.n_blocks,
    }


def _references(c: _Cell) -> dict[str, np.ndarray]:
    """The unpatched runs' per-unit measures, as columns ``anchor:kl_icl`` …"""
    return {
        f"{arm}:{m}": v[:, 0] for arm in ("anchor", "icl", "it") for m, v in c.measures(c.ref[arm][:, None]).items()
    }


def _finish(rows: list[dict[str, Any]], columns: Sequence[str], run: RunData) -> pd.DataFrame:
    from iclit.analysis.tables import with_labels

    df = pd.DataFrame(rows, columns=list(columns))
    for col in ("layer",):
        df[col] = df[col].astype("Int64")
    return with_labels(df, run) if len(df) else df


# ------------------------------------------------------------------ patching


def patch_table(run: RunData, *, seed: int = 0) -> pd.DataFrame:
    """Per cell × patch kind × layer × measure (:data:`PATCH_COLUMNS`), and the unpatched runs."""
    rows: list[dict[str, Any]] = []
    for cell, sub, units in _cells(run):
        c = _Cell(sub)
        if not all("patch" in r for r in c.recs):
            continue
        layers = list(c.recs[0]["patch"]["layers"])
        blocks = units.block_ids()
        cols = _references(c)
        for kind in BASE_OF:
            lp = c.runs([r["patch"][kind] for r in c.recs])  # [n, P(, v)]
            for m, v in c.measures(lp).items():
                cols.update({f"{kind}@{li}:{m}": v[:, j] for j, li in enumerate(layers)})
        for base in ("anchor", "it", "icl"):
            parts = c.fraction_parts(base)
            cols.update({f"{base}/{k}": v for k, v in parts.items()})
        est = _Estimates(cols, blocks, seed=seed)
        measures = ["kl_icl", "kl_it", "accuracy"] if c.classification else ["logp"]
        for arm in ("anchor", "icl", "it"):
            for m in measures:
                rows.append(_row(cell, est, est.mean(f"{arm}:{m}"), kind=f"{arm}_run", layer=None, measure=m))
        for kind, base in BASE_OF.items():
            for li in layers:
                for m in measures:
                    rows.append(_row(cell, est, est.mean(f"{kind}@{li}:{m}"), kind=kind, layer=li, measure=m))
                for x in ("icl", "it"):
                    if x == base:
                        continue
                    fn = functools.partial(
                        _fraction_within, classification=c.classification, base=base, run=f"{kind}@{li}", x=x
                    )
                    rows.append(_row(cell, est, est.of(fn), kind=kind, layer=li, measure=f"frac_{x}"))
    return _finish(rows, PATCH_COLUMNS, run)


# ------------------------------------------------------------------ steering


def cluster_sign_flip(values: np.ndarray, groups: np.ndarray, *, n_flips: int = N_FLIPS, seed: int = 0) -> np.ndarray:
    """Two-sided sign-flip p of mean(values) = 0 per column, flipping whole groups.

    values ``[n, C]`` (or ``[n]``): per-unit differences; groups ``[n]``: the clusters. Under
    the null each cluster's differences are symmetric about 0, so the sum of each cluster
    keeps or flips its sign together. Exact (every sign vector) when 2^G ≤ ``n_flips``, else
    (1 + hits) / (1 + n_flips) over random flips. NaN for a column without units."""
    v = np.asarray(values, dtype=np.float64)
    one_d = v.ndim == 1
    v = v[:, None] if one_d else v
    keep = ~np.isnan(v).any(axis=1)
    v, g = v[keep], np.asarray(groups, dtype=object)[keep]
    if not len(v):
        out = np.full(v.shape[1], np.nan)
        return out[0] if one_d else out
    codes = pd.factorize(pd.Series(list(g), dtype=object))[0]
    sums = np.zeros((codes.max() + 1, v.shape[1]))
    np.add.at(sums, codes, v)
    n_groups = sums.shape[0]
    observed = np.abs(sums.sum(axis=0))
    tol = 1e-12 * np.maximum(1.0, observed)
    if 2**n_groups <= n_flips:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n_groups)))
        p = (np.abs(signs @ sums) >= observed - tol).mean(axis=0)
    else:
        rng = np.random.default_rng(seed)
        signs = rng.choice((1.0, -1.0), size=(n_flips, n_groups))
        p = (1.0 + (np.abs(signs @ sums) >= observed - tol).sum(axis=0)) / (1.0 + n_flips)
    return p[0] if one_d else p


def steer_table(run: RunData, *, seed: int = 0) -> pd.DataFrame:
    """Per cell × vector × layer × scale × measure (:data:`STEER_COLUMNS`), the contrasts
    against the random vectors of the same norm, and the unpatched runs."""
    rows: list[dict[str, Any]] = []
    for cell, sub, units in _cells(run):
        c = _Cell(sub)
        if not all("steer" in r for r in c.recs):
            continue
        first = c.recs[0]["steer"]
        layers, scales = list(first["layers"]), [float(a) for a in first["scales"]]
        blocks = units.block_ids()
        cols = _references(c)
        cols.update({f"anchor/{k}": v for k, v in c.fraction_parts("anchor").items()})
        per: dict[str, dict[str, np.ndarray]] = {}
        for vector in ("icl", "it", "random_icl", "random_it"):
            lp = c.runs([r["steer"][vector] for r in c.recs])  # [n, S, A(, D)(, v)]
            found = c.measures(lp)
            if vector.startswith("random"):
                found = {m: x.mean(axis=-1) for m, x in found.items()}  # the unit's draws averaged
            per[vector] = found
            for m, x in found.items():
                cols.update(
                    {f"{vector}@{li},{a}:{m}": x[:, s, t] for s, li in enumerate(layers) for t, a in enumerate(scales)}
                )
        diffs: dict[str, np.ndarray] = {}
        for name, (vec, null) in CONTRASTS.items():
            for m in per[vec]:
                for s, li in enumerate(layers):
                    for t, a in enumerate(scales):
                        diffs[f"{name}@{li},{a}:{m}"] = per[vec][m][:, s, t] - per[null][m][:, s, t]
        cols.update(diffs)
        est = _Estimates(cols, blocks, seed=seed)
        names = list(diffs)
        p = (
            dict(
                zip(
                    names, cluster_sign_flip(np.column_stack([diffs[k] for k in names]), blocks, seed=seed), strict=True
                )
            )
            if names
            else {}
        )
        measures = ["kl_icl", "kl_it", "accuracy"] if c.classification else ["logp"]
        for arm in ("anchor", "icl", "it"):
            for m in measures:
                rows.append(
                    _row(
                        cell,
                        est,
                        est.mean(f"{arm}:{m}"),
                        vector=f"{arm}_run",
                        layer=None,
                        scale=np.nan,
                        measure=m,
                        p=np.nan,
                    )
                )
        for vector in ("icl", "it", "random_icl", "random_it", *CONTRASTS):
            for li in layers:
                for a in scales:
                    key = f"{vector}@{li},{a}"
                    for m in measures:
                        rows.append(
                            _row(
                                cell,
                                est,
                                est.mean(f"{key}:{m}"),
                                vector=vector,
                                layer=li,
                                scale=a,
                                measure=m,
                                p=p.get(f"{key}:{m}", np.nan),
                            )
                        )
                    if vector in CONTRASTS:
                        continue
                    for arm in ("icl", "it"):
                        fn = functools.partial(
                            _fraction_within, classification=c.classification, base="anchor", run=key, x=arm
                        )
                        rows.append(
                            _row(
                                cell, est, est.of(fn), vector=vector, layer=li, scale=a, measure=f"frac_{arm}", p=np.nan
                            )
                        )
    df = pd.DataFrame(rows, columns=[c for c in STEER_COLUMNS if c != "p_holm"])
    df["p_holm"] = np.nan
    tested = df["vector"].isin(list(CONTRASTS))
    for _, idx in df[tested].groupby(["cell_key", "vector", "measure"], sort=False).groups.items():
        df.loc[idx, "p_holm"] = stats.holm(df.loc[idx, "p"].to_numpy(dtype=float))
    return _finish(df[list(STEER_COLUMNS)].to_dict("records"), STEER_COLUMNS, run)


# ------------------------------------------------------------------ the metrics


@register_metric(
    "patch",
    "per cell × patch (ICL or IT state into the anchor run, ICL state into the tuned model's, "
    "IT state into the ICL run) × layer: KL to the ICL and the IT distribution, accuracy (generation: "
    "log p of the gold's first token) and frac_icl / frac_it, the share of the distance to that arm's "
    "behaviour the patch closes (ratio of means); 95% hierarchical-bootstrap CIs over query blocks, "
    "then (query, set) units",
)
def patch(run: RunData) -> pd.DataFrame:
    _require(run, "patch")
    return patch_table(run)


@register_metric(
    "steer",
    "per cell × vector (mean ICL or IT update of the set's other queries, added × scale to the "
    "anchor run; random directions of the same norm) × layer × scale: KL to ICL / IT, accuracy, fractions, "
    "with hierarchical-bootstrap CIs; contrasts it-random_it and icl-random_icl with a block sign-flip p, "
    "Holm over the layers × scales of one cell, contrast and measure",
)
def steer(run: RunData) -> pd.DataFrame:
    _require(run, "steer")
    return steer_table(run)


def _require(run: RunData, analysis: str) -> None:
    """ValueError unless some stored trial ran ``analysis``."""
    recs = run.outputs["causal"] if "causal" in run.outputs.columns else pd.Series(dtype=object)
    if not recs.map(lambda c: isinstance(c, Mapping) and analysis in c).any():
        raise ValueError(
            f"no causal analyses of kind {analysis!r} stored: add `analyses: [{analysis}]` to the spec "
            "and run it (iclit.engine.causal)"
        )
