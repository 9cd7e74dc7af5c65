"""Unit tests for iclit.analysis.stats, mostly against scipy.stats references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats as sps

from iclit.analysis.stats import (
    PairingResult,
    bh,
    cka_permutation_test,
    debiased_cka,
    debiased_cka_per_layer,
    hierarchical_bootstrap,
    hierarchical_bootstrap_means,
    holm,
    pairing_test,
    rsa,
    rsa_per_layer,
    tost,
)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosines of every row of a [m, ..., d] with every row of b: [m, m, ...]."""
    na = a / np.linalg.norm(a, axis=-1, keepdims=True)
    nb = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.einsum("a...d,b...d->ab...", na, nb)


def _orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# ---------------------------------------------------------------- Holm / BH


def test_holm_known_example_and_formula():
    p = np.array([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*.005=.02, 3*.01=.03, 2*.03=.06, 1*.04 -> max(.06,.04)
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02])
    rng = np.random.default_rng(0)
    q = rng.uniform(0, 0.3, size=12)
    m, order = q.size, np.argsort(q)
    direct = np.empty(m)
    for i, idx in enumerate(order):
        direct[idx] = min(1.0, max((m - j) * q[order[j]] for j in range(i + 1)))
    np.testing.assert_allclose(holm(q), direct)
    assert np.all(holm(q) >= q) and np.all(holm(q) <= 1)


def test_bh_matches_scipy():
    rng = np.random.default_rng(1)
    p = np.concatenate([rng.uniform(0, 0.01, 5), rng.uniform(size=20)])
    np.testing.assert_allclose(bh(p), sps.false_discovery_control(p))
    # ordering of the q-values follows the p-values, and q >= p
    q = bh(p)
    assert np.all(np.diff(q[np.argsort(p)]) >= 0) and np.all(q >= p)


@pytest.mark.parametrize("fn", [holm, bh])
def test_adjustments_pass_nan_and_keep_shape(fn):
    p = np.array([[0.01, np.nan], [0.04, 0.02]])
    out = fn(p)
    assert out.shape == p.shape and np.isnan(out[0, 1])
    np.testing.assert_allclose(out[~np.isnan(p)], fn(p[~np.isnan(p)]))
    assert fn(np.array([np.nan])).shape == (1,) and fn(np.array([])).size == 0


# ---------------------------------------------------------------- hierarchical bootstrap


def test_one_group_per_unit_is_the_ordinary_bootstrap():
    x = np.random.default_rng(2).normal(size=40)
    lo, hi = hierarchical_bootstrap(x, np.arange(40), n_boot=50_000, seed=3)
    ref = sps.bootstrap((x,), np.mean, n_resamples=50_000, method="percentile", random_state=4).confidence_interval
    assert abs(lo - ref.low) < 0.01 and abs(hi - ref.high) < 0.01


def test_two_stage_variance_matches_its_formula():
    rng = np.random.default_rng(5)
    n_groups, per = 8, 6
    groups = np.repeat([f"set{i}" for i in range(n_groups)], per)
    x = np.repeat(rng.normal(size=n_groups), per) + rng.normal(scale=0.5, size=n_groups * per)
    draws = hierarchical_bootstrap_means(x, groups, n_boot=40_000, seed=0)
    g = x.reshape(n_groups, per)
    # groups drawn, then units within: Var = (var_between + mean within var / n_g) / G (ddof 0)
    expected = (g.mean(1).var() + g.var(1).mean() / per) / n_groups
    assert draws.var() == pytest.approx(expected, rel=0.05)
    assert draws.mean() == pytest.approx(x.mean(), abs=0.01)
    # clustering widens the interval beyond the ordinary bootstrap's
    lo, hi = hierarchical_bootstrap(x, groups, n_boot=4000)
    lo0, hi0 = hierarchical_bootstrap(x, np.arange(x.size), n_boot=4000)
    assert hi - lo > 1.5 * (hi0 - lo0)


def test_hierarchical_bootstrap_unequal_groups_columns_and_nan():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(30, 3))
    groups = [("a", 1)] * 3 + [("b", 2)] * 12 + [("c", 3)] * 15  # tuples, unequal sizes
    lo, hi = hierarchical_bootstrap(x, groups, n_boot=500, seed=1)
    assert lo.shape == hi.shape == (3,) and np.all(lo < hi)
    for col in range(3):  # the same draws for every column
        lo1, hi1 = hierarchical_bootstrap(x[:, col], groups, n_boot=500, seed=1)
        assert lo1 == pytest.approx(lo[col]) and hi1 == pytest.approx(hi[col])
    # a NaN unit is dropped
    xn = np.concatenate([x[:, 0], [np.nan]])
    assert hierarchical_bootstrap(xn, groups + [("d", 4)], n_boot=500, seed=1) == pytest.approx(
        hierarchical_bootstrap(x[:, 0], groups, n_boot=500, seed=1)
    )
    assert all(np.isnan(hierarchical_bootstrap(np.array([np.nan]), [0], n_boot=10)))
    assert hierarchical_bootstrap(np.array([2.0]), [0], n_boot=10) == (2.0, 2.0)


# ---------------------------------------------------------------- pairing test


def test_pairing_matches_scipy_permutation_test_single_stratum():
    rng = np.random.default_rng(7)
    m, d = 7, 5
    u = rng.normal(size=(m, d))
    x, y = u + rng.normal(size=(m, d)), 0.4 * u + rng.normal(size=(m, d))
    c = _cos(x, y)[..., None]
    e = c.mean()  # exact permutation mean of the mean matched cosine

    def stat(idx, axis=-1):
        return _cos(x, y)[np.arange(m), idx].mean(axis)

    def stat_abs(idx, axis=-1):
        return np.abs(stat(idx, axis) - e)

    n_perm = 4000
    for alt, fn, scipy_alt in [
        ("greater", stat, "greater"),
        ("less", stat, "less"),
        ("two-sided", stat_abs, "greater"),  # our two-sided: |T - E| >= |T_obs - E|
    ]:
        ref = sps.permutation_test(
            (np.arange(m),),
            fn,
            permutation_type="pairings",
            alternative=scipy_alt,
            n_resamples=np.inf,
            vectorized=True,
        ).pvalue  # exact over all 7! pairings
        res = pairing_test([c], n_perm=n_perm, seed=1, alternative=alt)
        assert res.p[0] == pytest.approx(ref, abs=0.03), alt
    res = pairing_test([c], n_perm=10)
    assert isinstance(res, PairingResult)
    np.testing.assert_allclose(res.observed, np.diag(c[..., 0]).mean())
    off = (c[..., 0].sum(1) - np.diag(c[..., 0])) / (m - 1)
    np.testing.assert_allclose(res.null, off.mean())
    np.testing.assert_allclose(res.diff, res.observed - res.null)


def test_pairing_max_t_is_conservative_and_exact_for_identical_layers():
    rng = np.random.default_rng(8)
    strata = [rng.normal(size=(m, m, 5)) for m in (3, 4, 4, 6)]
    for alt in ("two-sided", "greater", "less"):
        res = pairing_test(strata, n_perm=300, alternative=alt)
        assert np.all(res.p_maxT >= res.p - 1e-12)
    same = [np.repeat(s[..., :1], 4, axis=-1) for s in strata]
    res = pairing_test(same, n_perm=300)
    np.testing.assert_array_equal(res.p_maxT, res.p)
    assert np.all(res.p == res.p[0])


def test_pairing_units_strata_and_nan_handling():
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=(4, 4, 2)), rng.normal(size=(3, 3, 2))
    bn = b.copy()
    bn[2, :, 1] = np.nan  # item 2 of this stratum is removed (row and column)
    res = pairing_test([rng.normal(size=(1, 1, 2)), a, bn], n_perm=50)
    assert (res.n_units, res.n_strata) == (6, 2)
    np.testing.assert_array_equal(res.unit_stratum, [1, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(res.unit_item, [0, 1, 2, 3, 0, 1])
    np.testing.assert_allclose(res.unit_diff.mean(0), res.diff)
    ref = pairing_test([a, b[:2, :2]], n_perm=50)
    np.testing.assert_allclose(res.diff, ref.diff)
    bc = b.copy()
    bc[:, 0, 0] = np.nan  # a broken second-arm state: column 0 is NaN, item 0 goes
    ref = pairing_test([b[1:, 1:]], n_perm=5)
    np.testing.assert_allclose(pairing_test([bc], n_perm=5).diff, ref.diff)
    # no stratum with m >= 2: NaN
    empty = pairing_test([rng.normal(size=(1, 1, 3))], n_perm=10)
    assert empty.n_units == 0 and empty.p.shape == (3,) and np.all(np.isnan(empty.p))
    assert np.all(np.isnan(pairing_test([], n_perm=10).p))
    # additive C[a, b] = f(a) + g(b): every pairing gives the same T, so p = 1
    f, g = rng.normal(size=(5, 1, 1)), rng.normal(size=(1, 5, 1))
    assert pairing_test([f + g], n_perm=50).p[0] == 1.0
    with pytest.raises(ValueError):
        pairing_test([a], alternative="bigger")


def _crossed_cosines(rng, n_sets, n_q, n_layers, d, query_effect):
    """Query-swap strata of a simulated cell: one per set, [Q, Q, L]."""
    set_part = rng.normal(size=(n_sets, 1, 1, d))
    u = query_effect * rng.normal(size=(1, n_q, 1, d))  # query-specific, shared by both arms
    icl = set_part + u + rng.normal(size=(n_sets, n_q, n_layers, d))
    it = set_part + u + rng.normal(size=(n_sets, n_q, n_layers, d))
    return [_cos(icl[s], it[s]) for s in range(n_sets)]


def test_pairing_detects_a_planted_query_effect():
    strata = _crossed_cosines(np.random.default_rng(10), 5, 8, 3, 16, query_effect=1.0)
    res = pairing_test(strata, n_perm=999, alternative="greater")
    assert np.all(res.diff > 0.1)
    assert np.all(res.p <= 0.002) and np.all(res.p_maxT <= 0.002)


def test_pairing_null_rejection_rate_is_nominal():
    rng = np.random.default_rng(11)
    n_rep, n_perm = 200, 199
    lo, hi = sps.binom.interval(0.99, n_rep, 0.05)
    rej_layer = rej_family = 0
    for rep in range(n_rep):
        strata = _crossed_cosines(rng, 4, 4, 3, 8, query_effect=0.0)
        res = pairing_test(strata, n_perm=n_perm, seed=rep)
        # with n_perm = 199 the event p <= 0.05 has probability exactly 10/200 under H0
        rej_layer += bool(res.p[0] <= 0.05)
        rej_family += bool(res.p_maxT.min() <= 0.05)
    assert lo <= rej_layer <= hi
    assert lo <= rej_family <= hi


def _demo_swap_strata(rng, n_blocks, n_q, set_sd):
    """Demo-swap strata [2, 2, 1] of n_blocks blocks of two sets with n_q queries each, under H0:
    C[a, b] = u[a, b] + query noise, where u (how set a's ICL states happen to sit against set
    b's IT states) is shared by every query of the block and the matched (a, a) is not special."""
    out = []
    for _ in range(n_blocks):
        u = set_sd * rng.normal(size=(2, 2))
        out += [(u + rng.normal(size=(2, 2)))[:, :, None] for _ in range(n_q)]
    return out, [b for b in range(n_blocks) for _ in range(n_q)]


def test_unique_links_are_independent_strata():
    strata = _crossed_cosines(np.random.default_rng(20), 4, 5, 3, 8, query_effect=0.5)
    ref = pairing_test(strata, n_perm=300, seed=4)
    res = pairing_test(strata, n_perm=300, seed=4, links=[("s", i) for i in range(len(strata))])
    for field in ("observed", "null", "diff", "p", "p_maxT"):
        np.testing.assert_array_equal(getattr(ref, field), getattr(res, field))
    with pytest.raises(ValueError, match="links has 1 labels for 4 strata"):
        pairing_test(strata, links=[0])


def test_linked_swaps_are_the_exact_block_sign_flip_test():
    """With two sets per block, swapping whole sets of a block for all its queries flips the sign
    of the block's summed (own − swapped) difference: scipy's exact paired permutation test."""
    rng = np.random.default_rng(21)
    strata, blocks = _demo_swap_strata(rng, 7, 4, set_sd=1.0)
    for alt in ("two-sided", "greater", "less"):
        res = pairing_test(strata, n_perm=20000, seed=1, alternative=alt, links=blocks)
        own = np.array(
            [sum(c[0, 0, 0] + c[1, 1, 0] for c, g in zip(strata, blocks, strict=True) if g == b) for b in range(7)]
        )
        swapped = np.array(
            [sum(c[0, 1, 0] + c[1, 0, 0] for c, g in zip(strata, blocks, strict=True) if g == b) for b in range(7)]
        )
        ref = sps.permutation_test(
            (own, swapped), lambda x, y: np.mean(x - y), permutation_type="samples", alternative=alt, n_resamples=np.inf
        )
        assert abs(res.p[0] - ref.pvalue) < 0.015, (alt, res.p[0], ref.pvalue)


def test_linked_demo_swap_keeps_its_rate_where_per_query_swaps_do_not():
    """A set-level match shared by a block's queries is not evidence that ICL is specific to
    its own demonstrations: swapping each query's sets on its own rejects far too often, swapping
    whole sets keeps the nominal rate."""
    rng = np.random.default_rng(22)
    n_rep, n_perm = 200, 199
    lo, hi = sps.binom.interval(0.99, n_rep, 0.05)
    linked = per_query = 0
    for rep in range(n_rep):
        strata, blocks = _demo_swap_strata(rng, 10, 8, set_sd=1.0)
        linked += bool(pairing_test(strata, n_perm=n_perm, seed=rep, links=blocks).p[0] <= 0.05)
        per_query += bool(pairing_test(strata, n_perm=n_perm, seed=rep).p[0] <= 0.05)
    assert lo <= linked <= hi
    assert per_query > 2 * hi


# ---------------------------------------------------------------- TOST


def test_tost_matches_one_sided_t_tests_on_group_means():
    rng = np.random.default_rng(12)
    groups = np.repeat(np.arange(6), 5)
    x = 0.02 + 0.05 * rng.normal(size=(30, 2))
    x[0, 1] = np.nan  # ignored within its group
    res = tost(x, groups, margin=0.1)
    for col in range(2):
        gm = np.array([np.nanmean(x[groups == g, col]) for g in range(6)])
        low = sps.ttest_1samp(gm, -0.1, alternative="greater").pvalue
        up = sps.ttest_1samp(gm, 0.1, alternative="less").pvalue
        assert res.p_lower[col] == pytest.approx(low) and res.p_upper[col] == pytest.approx(up)
        assert res.p[col] == pytest.approx(max(low, up))
        ci = sps.ttest_1samp(gm, 0.0).confidence_interval(0.90)
        assert (res.ci_low[col], res.ci_high[col]) == pytest.approx((ci.low, ci.high))
        assert res.mean[col] == pytest.approx(gm.mean())
    np.testing.assert_array_equal(res.n_groups, [6, 6])
    inside = (res.ci_low > -0.1) & (res.ci_high < 0.1)
    np.testing.assert_array_equal(res.equivalent, inside)


def test_tost_scalar_fields_and_edge_cases():
    rng = np.random.default_rng(13)
    x = rng.normal(size=40)
    groups = list("abcd") * 10
    wide = tost(x, groups, margin=5.0)
    narrow = tost(x, groups, margin=0.01)
    assert isinstance(wide.p, float) and isinstance(wide.equivalent, bool)
    assert wide.equivalent and not narrow.equivalent and wide.n_groups == 4
    one = tost(x, ["a"] * 40, margin=1.0)
    assert np.isnan(one.p) and not one.equivalent
    with pytest.raises(ValueError):
        tost(x, groups, margin=0.0)


# ---------------------------------------------------------------- debiased CKA


def _hsic_u_loop(k: np.ndarray, m: np.ndarray) -> float:
    n = k.shape[0]
    k, m = k.copy(), m.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(m, 0.0)
    one = np.ones(n)
    tr = sum(k[i, j] * m[j, i] for i in range(n) for j in range(n))
    return (tr + (one @ k @ one) * (one @ m @ one) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (one @ k @ m @ one)) / (
        n * (n - 3)
    )


def _cka_loop(x: np.ndarray, y: np.ndarray) -> float:
    k, m = x @ x.T, y @ y.T
    return _hsic_u_loop(k, m) / np.sqrt(_hsic_u_loop(k, k) * _hsic_u_loop(m, m))


def test_debiased_cka_matches_the_formula_and_invariances():
    rng = np.random.default_rng(14)
    x = rng.normal(size=(12, 3, 6))
    y = x @ rng.normal(size=(6, 9)) * 0.3 + rng.normal(size=(12, 3, 9))
    per = debiased_cka_per_layer(x, y)
    for layer in range(3):
        assert per[layer] == pytest.approx(_cka_loop(x[:, layer], y[:, layer]), rel=1e-10)
    q = _orthogonal(9, rng)
    assert debiased_cka(x[:, 0], 3.0 * y[:, 0] @ q + 1.5) == pytest.approx(per[0], rel=1e-10)
    assert debiased_cka(x[:, 0], x[:, 0] @ _orthogonal(6, rng)) == pytest.approx(1.0)
    # NaN rows dropped; n < 4 and constant states give NaN
    yn = y.copy()
    yn[0, 1, 0] = np.nan
    np.testing.assert_allclose(debiased_cka_per_layer(x, yn), debiased_cka_per_layer(x[1:], y[1:]))
    assert np.isnan(debiased_cka(x[:3, 0], y[:3, 0]))
    assert np.isnan(debiased_cka(x[:, 0], np.ones((12, 9))))


def test_debiased_cka_removes_the_small_n_bias():
    rng = np.random.default_rng(15)
    n, d = 20, 640
    spectrum = np.arange(1, d + 1) ** -0.5  # anisotropic, like LM states
    x = rng.normal(size=(n, 1, d)) * spectrum
    y = rng.normal(size=(n, 1, d)) * spectrum

    def biased(a, b):
        a, b = a - a.mean(0), b - b.mean(0)
        k, m = a @ a.T, b @ b.T
        return (k * m).sum() / np.sqrt((k * k).sum() * (m * m).sum())

    # thresholds leave room for other seeds: biased 0.5-0.75, debiased SD about 0.08 here
    assert biased(x[:, 0], y[:, 0]) > 0.45
    res = cka_permutation_test(x, y, n_perm=500, seed=1)
    assert abs(res["value"][0]) < 0.25 and res["p"][0] > 0.01
    assert abs(res["null_mean"][0]) < 0.02


def test_cka_permutation_test_related_states_and_max_t():
    rng = np.random.default_rng(16)
    x = rng.normal(size=(25, 4, 30))
    y = np.concatenate([x[:, :2] @ _orthogonal(30, rng), rng.normal(size=(25, 2, 30))], axis=1)
    res = cka_permutation_test(x, y, n_perm=300)
    np.testing.assert_allclose(res["value"][:2], 1.0)
    np.testing.assert_allclose(res["value"], debiased_cka_per_layer(x, y))
    assert np.all(res["p"][:2] == 1 / 301) and np.all(res["p"][2:] > 0.05)
    assert np.all(res["p_maxT"] >= res["p"] - 1e-12) and res["n"] == 25
    assert np.all(np.isnan(cka_permutation_test(x[:3], y[:3], n_perm=10)["p"]))


# ---------------------------------------------------------------- RSA


def test_rsa_matches_spearman_on_upper_triangles():
    rng = np.random.default_rng(17)
    x = rng.normal(size=(15, 8))
    y = x @ rng.normal(size=(8, 8)) + rng.normal(size=(15, 8))
    i, j = np.triu_indices(15, 1)
    ref = sps.spearmanr(_cos(x, x)[i, j], _cos(y, y)[i, j]).statistic
    assert rsa(x, y) == pytest.approx(ref, rel=1e-10)
    per = rsa_per_layer(np.stack([x, y], 1), np.stack([y, x], 1), n_perm=10)
    np.testing.assert_allclose(per["value"], [ref, ref])
    assert np.isnan(rsa(x[:2], y[:2]))


def test_rsa_mantel_null():
    rng = np.random.default_rng(18)
    x = rng.normal(size=(20, 2, 10))
    y = np.concatenate([x[:, :1] + 0.1 * rng.normal(size=(20, 1, 10)), rng.normal(size=(20, 1, 10))], axis=1)
    res = rsa_per_layer(x, y, n_perm=500, seed=2)
    assert res["value"][0] > 0.8 and res["p"][0] == 1 / 501
    assert res["p"][1] > 0.05 and abs(res["value"][1]) < 0.2
    assert np.all(res["p_maxT"] >= res["p"] - 1e-12)


def test_mantel_matches_brute_force_for_tiny_n():
    """n = 5: the Monte Carlo p approaches the exact p over all 120 item permutations."""
    rng = np.random.default_rng(19)
    x, y = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    obs = rsa(x, y)
    exact = np.mean([rsa(x, y[list(p)]) >= obs - 1e-12 for p in itertools.permutations(range(5))])
    res = rsa_per_layer(x[:, None], y[:, None], n_perm=4000, seed=3)
    assert res["p"][0] == pytest.approx(exact, abs=0.03)


@pytest.mark.parametrize("symmetric", [True, False])
def test_permuted_inner_matches_a_direct_loop(symmetric, monkeypatch):
    """The vectorised permutation sums (upper triangle only when both matrices are symmetric)
    equal <A, B[pi][:, pi]> computed one permutation and layer at a time, with the same
    permutations, also when the blocks of permutations and of layers are small."""
    from iclit.analysis.stats import permutation

    rng = np.random.default_rng(23)
    a, b = rng.normal(size=(2, 3, 7, 7))
    if symmetric:
        a, b = a + a.transpose(0, 2, 1), b + b.transpose(0, 2, 1)
    perms = permutation.random_perms(np.random.default_rng(5), (11, 7))
    want = np.array([[np.sum(a[layer] * b[layer][p][:, p]) for layer in range(3)] for p in perms])
    np.testing.assert_allclose(permutation.permuted_inners([a], b, perms)[0], want, rtol=1e-12)
    monkeypatch.setattr(permutation, "_GATHER", 40)  # one permutation and one layer per block
    np.testing.assert_allclose(permutation.permuted_inners([a], b, perms)[0], want, rtol=1e-12)


@pytest.mark.parametrize("nan_row", [False, True])
def test_pair_tests_equal_the_pair_by_pair_tests(nan_row):
    """All arm pairs at once (each arm's Gram and rank matrix once, each second arm's permuted
    entries gathered once) give the pair-by-pair numbers; with a NaN row, each pair drops its own."""
    from iclit.analysis.stats import pair_tests

    rng = np.random.default_rng(24)
    base = rng.normal(size=(16, 3, 12))
    states = {arm: base + rng.normal(size=(16, 3, 12)) for arm in ("anchor", "icl", "it")}
    if nan_row:
        states["icl"][2, 1, 0] = np.nan
    pairs = {"anchor_icl": ("anchor", "icl"), "anchor_it": ("anchor", "it"), "icl_it": ("icl", "it")}
    got = pair_tests(states, pairs, n_perm=150, seed=7)
    assert set(got) == {(p, m) for p in pairs for m in ("cka", "rsa")}
    for (pair, measure), res in got.items():
        a, b = pairs[pair]
        want = (cka_permutation_test if measure == "cka" else rsa_per_layer)(states[a], states[b], n_perm=150, seed=7)
        assert res.keys() == want.keys()
        for key in want:
            np.testing.assert_allclose(
                res[key], want[key], rtol=1e-12, equal_nan=True, err_msg=f"{pair} {measure} {key}"
            )
