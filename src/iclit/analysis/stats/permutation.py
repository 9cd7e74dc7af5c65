"""Permutation tests: the matched-pairing test of the crossed design's nulls (exact by
enumeration where a design has few pairings, Monte Carlo otherwise, with its smallest
attainable p), and the permuted Gram inner products behind the CKA and RSA nulls.

References: the exact permutation mean and variance of a matched sum (Hoeffding 1951);
permutation p = (1 + hits) / (1 + B) for Monte Carlo draws (Phipson & Smyth 2010);
step-down max-T (Westfall & Young 1993)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from iclit.analysis.stats.arrays import BLOCK, TOL, as_float64
from iclit.analysis.stats.multiplicity import permutation_pvalues

__all__ = [
    "MAX_EXACT",
    "Alternative",
    "PairingResult",
    "count_patterns",
    "pairing_test",
    "permuted_inners",
    "random_perms",
    "smallest_p",
]

Alternative = Literal["two-sided", "greater", "less"]
_GATHER = 1 << 23  # gathered elements per block of permutations (64 MB of float64)


def random_perms(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform random permutations along the last axis (argsort of random keys)."""
    return np.argsort(rng.random(shape), axis=-1)


def permuted_inners(a_list: Sequence[np.ndarray], b: np.ndarray, perms: Any) -> np.ndarray:
    """``<A, B[pi][:, pi]>_F`` per layer for given item permutations: ``[len(a_list), P, L]``.

    Two paths, chosen by their cost: permutations that move items only within small orbits
    (a design's, :func:`iclit.analysis.permutations.design_permutations`) are summed through
    the orbits' distinct arrangements (:func:`_orbit_inners`); any others by gathering every
    permuted entry. Both give the same sums to float64 rounding (tested).

    Parameters
    ----------
    a_list
        Matrices ``[L, n, n]``.
    b
        Matrix ``[L, n, n]`` whose items are permuted (rows and columns together).
    perms
        ``[P, n]`` integer permutations (:func:`random_perms`, or those a design allows), one per draw,
        shared by every layer.

    Returns
    -------
    numpy.ndarray
        ``[len(a_list), P, L]`` float64.
    """
    import torch

    n_layers, n, _ = b.shape
    perms = np.asarray(perms, dtype=np.int64)
    if perms.ndim != 2 or perms.shape[1] != n:
        raise ValueError(f"perms must be [P, {n}] (one permutation of the {n} items per row), got {perms.shape}")
    if len(perms) and not (np.sort(perms, axis=1) == np.arange(n)).all():
        raise ValueError("every row of perms must be a permutation of 0..n-1")
    symmetric = np.array_equal(b, b.transpose(0, 2, 1)) and all(np.array_equal(a, a.transpose(0, 2, 1)) for a in a_list)
    m = n * (n + 1) // 2 if symmetric else n * n  # entries gathered per permutation and layer
    orbits = _orbits(perms)
    if orbits is not None and orbits.cost <= len(perms) * m and len(orbits.src) ** 2 <= _GATHER:
        return _orbit_inners(a_list, b, orbits)
    if symmetric:
        i, j = np.triu_indices(n)
        a_sel = np.stack([a[:, i, j] * np.where(i == j, 1.0, 2.0) for a in a_list])  # [A, L, m]
    else:
        i, j = (ix.ravel() for ix in np.indices((n, n)))
        a_sel = np.stack([a.reshape(n_layers, n * n) for a in a_list])
    a_t = torch.from_numpy(np.ascontiguousarray(a_sel, dtype=np.float64))
    b_t = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float64).reshape(n_layers, n * n))
    i_t, j_t = torch.from_numpy(i), torch.from_numpy(j)
    out = np.empty((len(a_list), len(perms), n_layers))
    block = max(1, _GATHER // (n_layers * m))
    step = n_layers if block > 1 else max(1, _GATHER // m)
    for b0 in range(0, len(perms), block):
        k = min(block, len(perms) - b0)
        pi = torch.from_numpy(perms[b0 : b0 + k])
        idx = pi[:, i_t] * n + pi[:, j_t]  # [k, m]
        for l0 in range(0, n_layers, step):
            bp = b_t[l0 : l0 + step][:, idx]  # [step, k, m]
            out[:, b0 : b0 + k, l0 : l0 + step] = torch.einsum("alm,lkm->akl", a_t[:, l0 : l0 + step], bp).numpy()
    return out


@dataclass(frozen=True)
class _Orbits:
    """The permutations ``[P, n]`` as arrangements of their orbits (the items each one moves
    among; every item is in one). Super-item u is one arrangement of one orbit: the orbit's
    items ``src`` go to ``dst`` (flattened, super-item after super-item, from ``starts[u]``);
    ``chosen[k, g]``: the super-item of orbit g that permutation k uses."""

    src: np.ndarray
    dst: np.ndarray
    starts: np.ndarray
    chosen: np.ndarray

    @property
    def cost(self) -> int:
        """Entries gathered and multiply-adds per layer, in units of one gathered entry."""
        n_sup, n_el = len(self.starts), len(self.src)
        return 2 * n_el * n_el + len(self.chosen) * n_sup * n_sup // 16


def _orbits(perms: np.ndarray) -> _Orbits | None:
    """:class:`_Orbits` of ``perms``, or None when they have none worth using (one orbit of every item)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n_perm, n = perms.shape
    if not n_perm:
        return None
    rows = np.broadcast_to(np.arange(n), perms.shape).ravel()
    n_orbits, label = connected_components(coo_matrix((np.ones(rows.size), (rows, perms.ravel())), shape=(n, n)))
    if n_orbits == 1 and n > 1:
        return None
    order = np.argsort(label, kind="stable")
    members = np.split(order, np.flatnonzero(np.diff(label[order])) + 1)
    src, dst, starts, chosen, at, sup = [], [], [], np.empty((n_perm, n_orbits), dtype=np.int64), 0, 0
    for g, items in enumerate(members):
        arrangements, which = np.unique(perms[:, items], axis=0, return_inverse=True)
        chosen[:, g] = sup + which.ravel()
        for arrangement in arrangements:
            src.append(items)
            dst.append(arrangement)
            starts.append(at)
            at += len(items)
        sup += len(arrangements)
    return _Orbits(np.concatenate(src), np.concatenate(dst), np.asarray(starts), chosen)


def _orbit_inners(a_list: Sequence[np.ndarray], b: np.ndarray, orbits: _Orbits) -> np.ndarray:
    """:func:`permuted_inners` through the orbits: with ``S[u, v] = sum A[src_u, src_v] *
    B[dst_u, dst_v]`` over the entries of super-items u and v, permutation k's sum is
    ``sum_{g, h} S[chosen[k, g], chosen[k, h]]`` (``x_k' S x_k`` for its one-hot choice x_k),
    one matrix product per layer for all permutations."""
    import torch

    n_perm, n_sup = len(orbits.chosen), len(orbits.starts)
    n = b.shape[-1]
    x = torch.zeros(n_perm, n_sup, dtype=torch.float64).scatter_(1, torch.from_numpy(orbits.chosen), 1.0)
    sup = torch.from_numpy(np.searchsorted(orbits.starts, np.arange(len(orbits.src)), side="right") - 1)
    src, dst = (torch.from_numpy(np.add.outer(ix * n, ix).ravel()) for ix in (orbits.src, orbits.dst))
    out = np.empty((len(a_list), n_perm, b.shape[0]))
    for layer in range(b.shape[0]):
        b_sel = _flat(b[layer]).index_select(0, dst)
        for which, a in enumerate(a_list):
            prod = (_flat(a[layer]).index_select(0, src) * b_sel).view(len(sup), len(sup))
            rows = torch.zeros(n_sup, len(sup), dtype=torch.float64).index_add_(0, sup, prod)
            s = torch.zeros(n_sup, n_sup, dtype=torch.float64).index_add_(1, sup, rows)
            out[which, :, layer] = ((x @ s) * x).sum(1).numpy()
    return out


def _flat(m: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(m, dtype=np.float64).ravel())


@dataclass(frozen=True, eq=False)
class PairingResult:
    """Matched vs swapped pairing, per layer (see :func:`pairing_test`).

    observed, null, diff, p, p_maxT, sd: ``[L]``; unit_diff ``[n_units, L]`` (diagonal minus
    the row's off-diagonal mean); unit_stratum, unit_item ``[n_units]``: each unit's stratum
    (its index in the list given) and row in that stratum, so the caller can map units back
    (items with NaN are removed) and form its own groups. Units are in input order.
    exact: every distinct pairing was enumerated (p = hits / patterns); n_perm: the pairings
    compared (all of them when exact, else the Monte Carlo draws); patterns: how many distinct
    pairings the design has (``inf`` when too many to count in a float); p_min: the smallest
    p this design and test can return whatever the data (:func:`smallest_p`). sd: the exact
    permutation SD of the matched mean (0: every pairing gives the same value, the test has
    nothing to say).
    """

    observed: np.ndarray
    null: np.ndarray
    diff: np.ndarray
    p: np.ndarray
    p_maxT: np.ndarray
    n_units: int
    n_strata: int
    unit_diff: np.ndarray
    unit_stratum: np.ndarray
    unit_item: np.ndarray
    exact: bool = False
    n_perm: int = 0
    patterns: float = float("nan")
    p_min: float = float("nan")
    sd: np.ndarray | None = None


def _clean_stratum(c: Any) -> tuple[np.ndarray, np.ndarray]:
    """``[m', m', L]`` float64 without NaN, and the items kept ``[m']``: items (row a with
    column a) are removed greedily, the one with most NaN entries first."""
    c = as_float64(c)
    c = c[..., None] if c.ndim == 2 else c
    if c.ndim != 3 or c.shape[0] != c.shape[1]:
        raise ValueError(f"a stratum must be [m, m, L] or [m, m], got shape {c.shape}")
    bad = np.isnan(c).any(-1)
    keep = np.ones(c.shape[0], dtype=bool)
    while (sub := bad[np.ix_(keep, keep)]).any():
        keep[np.flatnonzero(keep)[np.argmax(sub.sum(0) + sub.sum(1))]] = False
    return c[np.ix_(keep, keep)], np.flatnonzero(keep)


MAX_EXACT = 50_000
"""Designs with at most this many distinct pairings are tested exactly (every pairing
enumerated); larger ones by Monte Carlo."""


def count_patterns(group_sizes: Mapping[int, int]) -> float:
    """Distinct pairings of independent permutation groups: ``prod (m!)^count`` over
    ``{m: count}`` (``inf`` beyond a float's range)."""
    log = sum(count * math.lgamma(m + 1) for m, count in group_sizes.items())
    return float(math.prod(math.factorial(m) ** count for m, count in group_sizes.items())) if log < 700 else math.inf


def smallest_p(
    group_sizes: Mapping[int, int], *, n_perm: int, alternative: Alternative = "two-sided", max_exact: int = MAX_EXACT
) -> tuple[float, bool]:
    """The smallest p a pairing test can return on this design, whatever the data, and
    whether the test is exact.

    group_sizes: ``{m: count}``, the independent permutation groups (linked strata count once).
    Exact (at most ``max_exact`` pairings): 1 / patterns, or 2 / patterns two-sided when every
    group has two items (a sign flip: the identity and the all-swapped pattern reach the same
    |T - E|). Monte Carlo: at least 1 / (n_perm + 1), and never below the exact floor. With two
    sets per query block and G blocks, the demo-swap test is a sign flip of G block contrasts:
    its floor is 2 / 2^G two-sided (1/16 for 5 blocks), 1 / 2^G one-sided.
    """
    patterns = count_patterns(group_sizes)
    sym = 2.0 if alternative == "two-sided" and group_sizes and set(group_sizes) == {2} else 1.0
    floor = min(1.0, sym / patterns) if patterns > 0 else 1.0
    exact = patterns <= max_exact
    return (floor, True) if exact else (max(floor, 1.0 / (n_perm + 1)), False)


def _enumerated(
    perm_sets: Mapping[int, np.ndarray], n_groups: Mapping[int, int], start: int, stop: int
) -> dict[int, np.ndarray]:
    """Patterns ``start..stop`` of every combination of the groups' permutations (mixed radix,
    pattern 0 the identity): ``{m: [stop - start, n_groups[m], m]}``."""
    idx = np.arange(start, stop, dtype=np.int64)
    out = {}
    for m in sorted(n_groups):
        base = len(perm_sets[m])
        digits = np.empty((len(idx), n_groups[m]), dtype=np.int64)
        for g in range(n_groups[m]):
            digits[:, g] = idx % base
            idx = idx // base
        out[m] = perm_sets[m][digits]
    return out


def pairing_test(
    strata: Sequence[Any],
    *,
    n_perm: int = 2000,
    seed: int = 0,
    alternative: Alternative = "two-sided",
    links: Sequence[Any] | None = None,
    max_exact: int = MAX_EXACT,
) -> PairingResult:
    """Is the matched pairing more similar than the swapped ones? Per layer, with max-T.

    Parameters
    ----------
    strata : sequence of arrays ``[m_s, m_s, L]`` (``[m, m]`` is one layer)
        ``C[a, b, l]`` pairs item a's first arm with item b's second arm. Items with a NaN
        are removed (row and column together, the one with most NaN entries first); strata
        left with m_s < 2 are ignored, and with none left every number is NaN.
    n_perm : int
        Monte Carlo draws when the design has more than ``max_exact`` distinct pairings.
    seed : int
        Seed of the Monte Carlo draws.
    alternative : {"two-sided", "greater", "less"}
        Two-sided counts ``|T_pi - E| >= |T_obs - E|``, "greater" ``T_pi >= T_obs``, "less"
        ``T_pi <= T_obs``.
    links : sequence, optional
        One label per stratum; strata with the same label (and, after NaN removal, the same
        items) share one permutation per draw, for strata whose items are the same units seen
        again (the sets of a query block under demo-swap: one swap of whole sets for every
        query of the block). SD then counts the covariance of linked strata (Hoeffding's
        formula on their summed double-centred matrices). None: all independent.
    max_exact : int
        Enumerate every pairing when there are at most this many (:data:`MAX_EXACT`).

    Returns
    -------
    PairingResult
        ``observed[l]`` the mean diagonal over all units, ``null[l]`` the mean of each row's
        off-diagonal mean (every eligible partner averaged), ``diff = observed - null``. The
        statistic T is the mean of ``C[a, pi(a), l]`` against its exact permutation mean E and
        SD (Hoeffding 1951); one permutation serves every layer. ``p``: exact (hits / patterns,
        the identity included) or Monte Carlo ((1 + hits) / (1 + n_perm)); ``p_maxT``:
        step-down max-T over the layers on z = (T - E) / SD (Westfall & Young 1993);
        ``p_min``: the design's floor (:func:`smallest_p`).

    Examples
    --------
    Two sets of one block read by three queries, each stratum ``[2, 2]`` (linked: one swap of
    the sets for all three queries), so the test is exact over 2 patterns:

    >>> import numpy as np
    >>> c = np.array([[0.9, 0.1], [0.2, 0.8]])
    >>> res = pairing_test([c, c, c], links=[0, 0, 0])
    >>> bool(res.exact), res.n_perm, float(res.p_min), float(res.p[0])
    (True, 2, 1.0, 1.0)
    """
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be two-sided, greater or less, not {alternative!r}")
    cleaned, kept = zip(*(_clean_stratum(c) for c in strata), strict=True) if len(strata) else ((), ())
    n_layers = {c.shape[2] for c in cleaned}
    if len(n_layers) > 1:
        raise ValueError(f"strata disagree on the number of layers: {sorted(n_layers)}")
    n_l = n_layers.pop() if n_layers else 0
    used = [i for i, c in enumerate(cleaned) if c.shape[0] >= 2]
    if links is not None and len(links) != len(strata):
        raise ValueError(f"links has {len(links)} labels for {len(strata)} strata")
    if not used:
        nan = np.full(n_l, np.nan)
        none = np.empty(0, dtype=np.int64)
        return PairingResult(nan, nan, nan, nan, nan, 0, 0, np.empty((0, n_l)), none, none, sd=nan)

    unit_diff, unit_stratum, unit_null = [], [], []
    exp_sum = np.zeros(n_l)
    by_m: dict[int, list[np.ndarray]] = {}
    group_of: dict[int, list[int]] = {}  # per stratum size: each stratum's permutation group (0, 1, ...)
    numbering: dict[int, dict[Any, int]] = {}
    centred: dict[Any, np.ndarray] = {}  # permutation group -> its strata's summed double-centred C
    for i in used:
        c = cleaned[i]
        m = c.shape[0]
        diag = c[np.arange(m), np.arange(m)]  # [m, L]
        off = (c.sum(1) - diag) / (m - 1)
        unit_diff.append(diag - off)
        unit_null.append(off)
        unit_stratum.append(np.full(m, i, dtype=np.int64))
        exp_sum += c.sum((0, 1)) / m
        d = c - c.mean(1, keepdims=True) - c.mean(0, keepdims=True) + c.mean((0, 1), keepdims=True)
        group = (m, i) if links is None else (m, links[i], tuple(kept[i]))
        centred[group] = centred[group] + d if group in centred else d
        number = numbering.setdefault(m, {})
        group_of.setdefault(m, []).append(number.setdefault(group, len(number)))
        by_m.setdefault(m, []).append(c)
    var_sum = sum(((d**2).sum((0, 1)) / (g[0] - 1) for g, d in centred.items()), np.zeros(n_l))
    stacks = {m: np.stack(cs) for m, cs in by_m.items()}  # [K, m, m, L] per stratum size
    n_groups = {m: len(number) for m, number in numbering.items()}
    group_idx = {m: np.asarray(g) for m, g in group_of.items()}
    n_units = sum(len(u) for u in unit_diff)
    ud = np.concatenate(unit_diff)

    def matched_sum(perms: dict[int, np.ndarray]) -> np.ndarray:  # perms[m]: [B, K, m]
        total: Any = 0.0  # [B, L] once a stack is added
        for m, st in stacks.items():
            k_idx = np.arange(st.shape[0])[None, :, None]
            total = total + st[k_idx, np.arange(m)[None, None, :], perms[m]].sum((1, 2))
        return total / n_units  # [B, L]

    mean = exp_sum / n_units
    sd = np.sqrt(np.maximum(var_sum, 0.0)) / n_units
    ok = sd > TOL * np.maximum(1.0, np.abs(mean))  # SD 0: every pairing gives the same T
    sign = {"two-sided": 0.0, "greater": 1.0, "less": -1.0}[alternative]

    def z_of(t: np.ndarray) -> np.ndarray:
        z = np.where(ok, (t - mean) / np.where(ok, sd, 1.0), 0.0)
        return np.abs(z) if sign == 0.0 else sign * z

    ident = {m: np.broadcast_to(np.arange(m), (1, st.shape[0], m)) for m, st in stacks.items()}
    t_obs = matched_sum(ident)[0]
    p_min, exact = smallest_p(n_groups, n_perm=n_perm, alternative=alternative, max_exact=max_exact)
    patterns = count_patterns(n_groups)
    total = round(patterns) if exact else n_perm
    z_null = np.empty((total, n_l))
    block = max(1, BLOCK // max(1, n_units * n_l))
    if exact:
        perm_sets = {m: np.asarray(list(itertools.permutations(range(m))), dtype=np.int64) for m in stacks}
        for b0 in range(0, total, block):
            b1 = min(total, b0 + block)
            perms = {m: p[:, group_idx[m]] for m, p in _enumerated(perm_sets, n_groups, b0, b1).items()}
            z_null[b0:b1] = z_of(matched_sum(perms))
    else:
        rng = np.random.default_rng(seed)
        for b0 in range(0, total, block):
            b = min(block, total - b0)
            perms = {m: random_perms(rng, (b, n_groups[m], m))[:, group_idx[m]] for m in stacks}
            z_null[b0 : b0 + b] = z_of(matched_sum(perms))
    p, p_max = permutation_pvalues(z_of(t_obs), z_null, exact=exact)
    null = np.concatenate(unit_null).mean(0)
    return PairingResult(observed=t_obs, null=null, diff=ud.mean(0), p=p, p_maxT=p_max,
                         n_units=n_units, n_strata=len(used), unit_diff=ud,
                         unit_stratum=np.concatenate(unit_stratum),
                         unit_item=np.concatenate([kept[i] for i in used]), exact=exact, n_perm=total,
                         patterns=patterns, p_min=p_min, sd=sd)  # fmt: skip
