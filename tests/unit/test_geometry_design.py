"""CKA / RSA nulls restricted to what a cell's design makes exchangeable."""

from __future__ import annotations

import numpy as np
import pytest

from iclit.analysis.cells import geometry
from iclit.analysis.nulls import Units
from iclit.analysis.permutations import design_permutations
from iclit.analysis.stats import cka_permutation_test, debiased_cka, pair_tests, permuted_inners, rsa_per_layer


def design(
    n_seeds: int = 1, n_blocks: int = 3, sets_per_block: int = 2, queries: int = 4, labels: bool = True
) -> Units:
    """A cell's units in state order: seed, set, query; each block's sets share its queries."""
    seed, sets, block, query, label = [], [], [], [], []
    for s in range(n_seeds):
        for b in range(n_blocks):
            for k in range(sets_per_block):
                for q in range(queries):
                    seed.append(s)
                    sets.append(b * sets_per_block + k)
                    block.append(b)
                    query.append(f"s{s}b{b}q{q}")
                    label.append(("pos", "neg")[q % 2] if labels else None)
    return Units(
        np.asarray(seed),
        np.asarray(sets),
        np.asarray(block),
        np.asarray(query, dtype=object),
        np.asarray(label, dtype=object),
    )


def test_design_permutations_keep_groups_and_move_a_querys_rows_together():
    units = design(n_seeds=2, n_blocks=3, sets_per_block=2, queries=6)
    perms = design_permutations(units, 200, seed=3)
    n = len(units)
    assert perms.shape == (200, n)
    assert (np.sort(perms, axis=1) == np.arange(n)).all()
    moved = False
    for pi in perms:
        # every item takes an item of the same seed, block, set and gold label
        for field in ("seed", "block", "set", "label"):
            values = getattr(units, field)
            assert (values[pi] == values).all(), field
        # a query's rows (one per set of its block) all take the rows of one other query
        for q in np.unique(units.query):
            rows = np.flatnonzero(units.query == q)
            assert len(set(units.query[pi[rows]])) == 1
        moved |= not (pi == np.arange(n)).all()
    assert moved
    # every within-group arrangement is reachable: 3! per (block, label) group of 3 queries
    rows = np.flatnonzero((units.seed == 0) & (units.block == 0) & (units.label == "pos") & (units.set == 0))
    seen = {tuple(units.query[perms[k, rows]]) for k in range(200)}
    assert len(seen) == 6


def test_design_permutations_edge_cases():
    one_query = design(queries=1, labels=False)  # one query read under the block's two sets
    assert design_permutations(one_query, 10).shape == (0, len(one_query))
    assert (design_permutations(one_query, 10, exact=False) == np.arange(len(one_query))).all()
    # one query per set and one set per block: the items share nothing, permuted within their label
    single = design(n_blocks=8, sets_per_block=1, queries=1)
    single = Units(single.seed, single.set, single.block, single.query, np.asarray(["pos", "neg"] * 4, dtype=object))
    perms = design_permutations(single, 1000)
    assert perms.shape == (4 * 3 * 2 * 4 * 3 * 2 - 1, 8)  # 4! × 4! arrangements but the identity
    assert all((single.label[p] == single.label).all() for p in perms)
    units = design(queries=2, labels=False)
    dup = Units(units.seed, units.set, units.block, np.asarray(["q"] * len(units), dtype=object), units.label)
    with pytest.raises(ValueError, match="twice"):
        design_permutations(dup, 5)
    # a query missing from one set is not exchanged with the queries read under both sets
    keep = np.ones(len(units), dtype=bool)
    keep[0] = False  # block 0, set 0, query 0
    part = Units(*(getattr(units, f)[keep] for f in ("seed", "set", "block", "query", "label")))
    perms = design_permutations(part, 50)
    alone = np.flatnonzero(part.query == "s0b0q0")
    assert (perms[:, alone] == alone).all()


def test_few_arrangements_are_enumerated_and_give_the_exact_p():
    units = design(n_blocks=2, queries=4)  # 2 blocks × 2 labels × 2 queries: 2^4 = 16 arrangements
    perms = design_permutations(units, 100)
    assert perms.shape == (15, len(units))
    assert len({tuple(p) for p in perms}) == 15 and not (perms == np.arange(len(units))).all(1).any()
    assert design_permutations(units, 14).shape == (14, len(units))  # more than n_perm: random draws
    rng = np.random.default_rng(3)
    x = rng.normal(size=(len(units), 1, 5))
    y = x + rng.normal(size=x.shape)
    got = cka_permutation_test(x, y, perms=perms)["p"][0]
    every = np.vstack([np.arange(len(units)), perms])
    values = [debiased_cka(x[:, 0], y[p, 0]) for p in every]  # the same items of y moved
    want = np.mean(np.asarray(values) >= values[0] - 1e-12)
    assert got == pytest.approx(want)


def test_permuted_inners_match_a_direct_loop():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 7, 7))
    a = a + a.transpose(0, 2, 1)
    b = rng.normal(size=(2, 7, 7))
    b = b + b.transpose(0, 2, 1)
    perms = np.stack([rng.permutation(7) for _ in range(5)])
    got = permuted_inners([a, 2 * a], b, perms)
    want = np.array([[np.einsum("lij,lij->l", a, b[:, p][:, :, p]) for p in perms]])
    np.testing.assert_allclose(got[0], want[0])
    np.testing.assert_allclose(got[1], 2 * want[0])
    with pytest.raises(ValueError, match="permutation"):
        permuted_inners([a], b, np.zeros((2, 7), dtype=int))


@pytest.mark.parametrize("swap", ["queries", "sets"])
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_permuted_inners_through_orbits_equal_the_gathered_sums(swap, exact, symmetric, monkeypatch):
    """A design's permutations move items within small orbits: the sums taken through the
    orbits' arrangements equal those of the gather path and of a direct loop, with fixed items,
    orbits of unequal sizes (three queries of one label, one of the other) and several seeds."""
    from iclit.analysis.stats import permutation

    units = design(n_seeds=2, n_blocks=3, sets_per_block=3 if swap == "sets" else 2, queries=4)
    units = Units(*(np.delete(getattr(units, f), [0]) for f in ("seed", "set", "block", "query", "label")))
    perms = design_permutations(units, 60, seed=1, swap=swap, exact=exact)
    n = len(units)
    assert len(perms) and (perms != np.arange(n)).any()
    rng = np.random.default_rng(11)
    a, b = rng.normal(size=(2, 3, n, n))
    if symmetric:
        a, b = a + a.transpose(0, 2, 1), b + b.transpose(0, 2, 1)
    orbits = permutation._orbits(perms)
    assert orbits is not None and len(orbits.chosen[0]) < n  # some items share an orbit
    got = permutation._orbit_inners([a, -a], b, orbits)
    want = np.array([[np.sum(a[layer] * b[layer][p][:, p]) for layer in range(3)] for p in perms])
    np.testing.assert_allclose(got[0], want, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(got[1], -want, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(permuted_inners([a, -a], b, perms), got, rtol=1e-12, atol=1e-10)  # either path
    monkeypatch.setattr(permutation, "_orbits", lambda perms: None)
    np.testing.assert_allclose(permuted_inners([a, -a], b, perms), got, rtol=1e-12, atol=1e-10)


def test_orbits_of_uniform_permutations_are_one_and_not_used():
    """Uniform permutations of all items join them into one orbit: the gather path sums them."""
    from iclit.analysis.stats import permutation

    perms = permutation.random_perms(np.random.default_rng(2), (50, 9))
    assert permutation._orbits(perms) is None
    identity = np.tile(np.arange(4), (3, 1))  # every item its own orbit, one arrangement each
    orbits = permutation._orbits(identity)
    assert orbits is not None and len(orbits.starts) == 4 and (orbits.chosen == np.arange(4)).all()


def _query_states(units: Units, rng: np.random.Generator, d: int = 24, dup: bool = False) -> np.ndarray:
    """A state per item: a per-query component (copied across the block's sets) plus item noise
    (none with ``dup``: the anchor's rows are copies)."""
    names = {q: i for i, q in enumerate(np.unique(units.query))}
    per_query = rng.normal(size=(len(names), d)) * 2.0
    x = per_query[[names[q] for q in units.query]]
    return x if dup else x + rng.normal(size=x.shape)


def test_restricted_null_has_nominal_rate_where_the_uniform_null_does_not():
    """Two arms that each carry their own component per query, otherwise independent: the
    only thing they share is which items read the same query. The uniform null rejects
    almost always; the design's null at its nominal rate."""
    units = design(n_blocks=4, sets_per_block=2, queries=4, labels=False)
    rng = np.random.default_rng(11)
    alpha, n_sim = 0.1, 120
    uniform = restricted = 0
    for sim in range(n_sim):
        x = _query_states(units, rng, dup=sim % 2 == 0)[:, None]  # half like the anchor: exact copies
        y = _query_states(units, rng)[:, None]
        perms = design_permutations(units, 99, seed=sim)
        uniform += cka_permutation_test(x, y, n_perm=99, seed=sim)["p"][0] <= alpha
        restricted += cka_permutation_test(x, y, perms=perms)["p"][0] <= alpha
    # binomial(120, 0.1): sd 3.3; 99% upper bound about 21
    assert 3 <= restricted <= 21
    assert uniform >= 0.9 * n_sim


def test_set_swaps_keep_each_query_and_block_and_test_what_is_specific_to_the_set():
    """The demonstration null: a block's sets are exchanged, every query stays itself. Arms
    that share their query component (the same a_q in both, as both arms read the query) are
    at the nominal rate under it; the query null and the uniform null find the shared query."""
    units = design(n_blocks=7, sets_per_block=2, queries=3, labels=False)
    perms = design_permutations(units, 500, seed=1, swap="sets")
    assert perms.shape == (2**7 - 1, len(units))  # every arrangement of 7 blocks of two sets, exactly
    for pi in perms:
        assert (units.query[pi] == units.query).all() and (units.block[pi] == units.block).all()
        for s in np.unique(units.set):  # a set's rows move together, onto one set
            assert len(set(units.set[pi[units.set == s]])) == 1
    rng = np.random.default_rng(4)
    alpha, n_sim = 0.1, 100
    rejected = {"uniform": 0, "queries": 0, "sets": 0}
    names = {q: i for i, q in enumerate(np.unique(units.query))}
    for sim in range(n_sim):
        shared = rng.normal(size=(len(names), 16))[[names[q] for q in units.query]]
        x = (shared + rng.normal(size=shared.shape))[:, None]
        y = (shared + rng.normal(size=shared.shape))[:, None]
        rejected["uniform"] += cka_permutation_test(x, y, n_perm=99, seed=sim)["p"][0] <= alpha
        for swap in ("queries", "sets"):
            p = design_permutations(units, 99, seed=sim, swap=swap)
            rejected[swap] += cka_permutation_test(x, y, perms=p)["p"][0] <= alpha
    assert rejected["uniform"] >= 0.9 * n_sim and rejected["queries"] >= 0.9 * n_sim
    assert 2 <= rejected["sets"] <= 19  # binomial(100, 0.1): 99% interval about 3..19
    with pytest.raises(ValueError, match="swap"):
        design_permutations(units, 5, swap="labels")


def test_restricted_null_still_detects_a_shared_query_geometry():
    units = design(n_blocks=4, sets_per_block=2, queries=6, labels=False)
    rng = np.random.default_rng(5)
    x = _query_states(units, rng)
    y = x @ rng.normal(size=(24, 24)) + rng.normal(size=x.shape)  # same query geometry in both arms
    perms = design_permutations(units, 199, seed=0)
    assert cka_permutation_test(x[:, None], y[:, None], perms=perms)["p"][0] <= 0.01
    assert rsa_per_layer(x[:, None], y[:, None], perms=perms)["p"][0] <= 0.01


def test_pair_tests_with_perms_equal_the_pair_by_pair_tests_and_cells_geometry_uses_them():
    units = design(n_blocks=3, queries=4)
    rng = np.random.default_rng(2)
    states = {a: rng.normal(size=(len(units), 3, 8)) for a in ("anchor", "icl", "it")}
    perms = design_permutations(units, 60, seed=4)
    pairs = {"anchor_icl": ("anchor", "icl"), "icl_it": ("icl", "it")}
    got = pair_tests(states, pairs, perms=perms)
    for name, (a, b) in pairs.items():
        want = cka_permutation_test(states[a], states[b], perms=perms)
        np.testing.assert_allclose(got[name, "cka"]["p"], want["p"])
        np.testing.assert_allclose(got[name, "cka"]["null_mean"], want["null_mean"])
        np.testing.assert_allclose(got[name, "rsa"]["p"], rsa_per_layer(states[a], states[b], perms=perms)["p"])
    table = geometry(states, units, n_perm=60, seed=4)
    assert set(zip(table["pair"], table["null"], strict=True)) == {
        ("anchor_icl", "query_swap"),
        ("anchor_it", "query_swap"),
        ("icl_it", "query_swap"),
        ("icl_it", "demo_swap"),
    }
    for null, swap in (("query_swap", "queries"), ("demo_swap", "sets")):
        row = table[(table["pair"] == "icl_it") & (table["measure"] == "cka") & (table["null"] == null)]
        want = cka_permutation_test(
            states["icl"], states["it"], perms=design_permutations(units, 60, seed=4, swap=swap)
        )
        np.testing.assert_allclose(row.sort_values("layer")["p"], want["p"])
    assert set(geometry(states, n_perm=10)["null"]) == {"uniform"}
    # a NaN trial is left out of the states and of the design
    states["it"][0, 1] = np.nan
    table = geometry(states, units, n_perm=20)
    assert (table["n"] == len(units) - 1).all()
    with pytest.raises(ValueError, match="NaN"):
        cka_permutation_test(states["icl"], states["it"], perms=perms)


def test_no_exchangeable_item_gives_a_nan_null():
    units = design(n_blocks=5, queries=1, labels=False)  # each block: one query under two sets
    rng = np.random.default_rng(0)
    states = {a: rng.normal(size=(len(units), 2, 6)) for a in ("anchor", "icl", "it")}
    table = geometry(states, units, n_perm=20)
    query = table[table["null"] == "query_swap"]
    assert query["p"].isna().all() and query["null_mean"].isna().all() and query["value"].notna().all()
    assert table.loc[table["null"] == "demo_swap", "p"].notna().all()  # its sets can still be swapped


def test_orbit_sums_benchmark_runs_and_agrees():
    """benchmarks/orbit_sums.py on a small cell: both paths give the same sums for both nulls."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "orbit_sums.py"
    args = ["--blocks", "3", "--queries", "4", "--layers", "2", "--perms", "50", "--reps", "1"]
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, check=True).stdout
    ratios = [line for line in out.splitlines() if line.startswith("RATIO name=orbit_sums_")]
    assert len(ratios) == 2 and all(line.endswith("agree=true") for line in ratios), out
