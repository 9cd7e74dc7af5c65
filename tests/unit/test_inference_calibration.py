"""Inference a reviewer can quote: exact tests and their floors, step-down max-T, block-level
intervals with nominal coverage, the unbiased update null, margins, positive controls and
the power check. Every simulation is seeded and small (the whole file runs in well under a
minute); binomial bands are 99% intervals."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from iclit.analysis.margins import margin_for, margins, verdict
from iclit.analysis.nulls import Units, null_tests
from iclit.analysis.power import blocks_needed, design_floors, detectable_effect, family_size, power_table
from iclit.analysis.stats import cluster_mean, pairing_test, ratio_ci, smallest_p, tost

# ---------------------------------------------------------------- simulated designs


def _demo_strata(rng, n_blocks, n_q, *, effect=0.0, set_sd=0.0, cluster_sd=0.0, noise=1.0):
    """Demo-swap strata ``[2, 2, 1]`` of n_blocks blocks of two sets, n_q queries each.

    C[a, b] = effect·[a == b] + s_a + t_b + (cluster effect of the block)·[a == b] + noise:
    s, t are set main effects (how a set's ICL or IT states sit, in own and swapped pairings
    alike), the cluster effect varies the block's own-vs-other contrast between blocks."""
    out, blocks = [], []
    for b in range(n_blocks):
        s, t = set_sd * rng.normal(size=(2, 1)), set_sd * rng.normal(size=(1, 2))
        own = effect + cluster_sd * rng.normal()
        for _ in range(n_q):
            c = s + t + own * np.eye(2) + noise * rng.normal(size=(2, 2))
            out.append(c[:, :, None])
            blocks.append(b)
    return out, np.asarray(blocks)


def _block_contrasts(strata, blocks):
    own = np.array(
        [sum(c[0, 0, 0] + c[1, 1, 0] for c, g in zip(strata, blocks, strict=True) if g == b) for b in np.unique(blocks)]
    )
    other = np.array(
        [sum(c[0, 1, 0] + c[1, 0, 0] for c, g in zip(strata, blocks, strict=True) if g == b) for b in np.unique(blocks)]
    )
    return own, other


# ---------------------------------------------------------------- exact tests


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_the_demo_swap_test_is_the_exact_sign_flip_test(alternative):
    """With two sets per block, linked swaps enumerate all 2^G sign patterns: scipy's exact
    paired permutation test on the block sums, to rounding."""
    rng = np.random.default_rng(1)
    strata, blocks = _demo_strata(rng, 7, 3, effect=0.3, set_sd=1.0)
    res = pairing_test(strata, links=blocks.tolist(), alternative=alternative)
    own, other = _block_contrasts(strata, blocks)
    ref = sps.permutation_test(
        (own, other),
        lambda x, y: np.mean(x - y),
        permutation_type="samples",
        alternative=alternative,
        n_resamples=np.inf,
    )
    assert res.exact and res.n_perm == 2**7
    assert res.p[0] == pytest.approx(ref.pvalue, abs=1e-12)
    assert res.p_min == (2 / 2**7 if alternative == "two-sided" else 1 / 2**7)


def test_exact_p_equals_brute_force_enumeration_of_mixed_strata():
    """Independent strata of sizes 3 and 2 (3! · 2! · 2! = 24 pairings): p counted by hand."""
    rng = np.random.default_rng(2)
    strata = [rng.normal(size=(3, 3, 2)), rng.normal(size=(2, 2, 2)), rng.normal(size=(2, 2, 2))]
    res = pairing_test(strata)
    assert res.exact and res.n_perm == 24
    n = 7
    mean = sum(c.sum((0, 1)) / c.shape[0] for c in strata) / n
    ts = []
    for p0 in itertools.permutations(range(3)):
        for p1 in itertools.permutations(range(2)):
            for p2 in itertools.permutations(range(2)):
                ts.append(
                    sum(c[np.arange(len(p)), list(p)].sum(0) for c, p in zip(strata, (p0, p1, p2), strict=True)) / n
                )
    ts = np.asarray(ts)
    t_obs = sum(np.trace(c) for c in strata) / n
    expected = (np.abs(ts - mean) >= np.abs(t_obs - mean) - 1e-12).mean(0)
    np.testing.assert_allclose(res.p, expected)
    assert res.p_min == pytest.approx(1 / 24)  # mixed sizes: no guaranteed two-sided tie


def test_a_single_stratum_matches_scipy_exactly():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    xu, yu = x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)
    c = xu @ yu.T
    ref = sps.permutation_test(
        (np.arange(6),),
        lambda idx, axis=-1: c[np.arange(6), idx].mean(axis),
        permutation_type="pairings",
        alternative="greater",
        n_resamples=np.inf,
        vectorized=True,
    ).pvalue
    assert pairing_test([c], alternative="greater").p[0] == pytest.approx(ref, abs=1e-12)


def test_five_blocks_cannot_reject_demo_swap_even_with_a_huge_effect():
    """The floor of a two-sided sign flip over 5 blocks is 2/32 = 1/16: a planted +0.5
    own-set effect in every block gives exactly that, above 0.05."""
    strata, blocks = _demo_strata(np.random.default_rng(4), 5, 10, effect=0.5, noise=0.01)
    res = pairing_test(strata, links=blocks.tolist())
    assert res.exact and res.p_min == 1 / 16 and res.p[0] == 1 / 16
    assert smallest_p({2: 5}, n_perm=1000) == (1 / 16, True)
    assert smallest_p({2: 20}, n_perm=1000) == (1 / 1001, False)  # 2^20 pairings: Monte Carlo


def test_monte_carlo_beyond_the_exact_limit_uses_the_plus_one_estimator():
    strata, blocks = _demo_strata(np.random.default_rng(5), 6, 2, effect=5.0, noise=0.01)
    res = pairing_test(strata, links=blocks.tolist(), max_exact=10, n_perm=99, alternative="greater")
    assert not res.exact and res.n_perm == 99
    assert res.p_min == pytest.approx(1 / 64)  # one-sided floor 1/2^6 is above 1/100
    assert res.p[0] >= 1 / 100


def test_step_down_max_t_matches_its_definition_and_is_between_p_and_single_step():
    rng = np.random.default_rng(6)
    strata = [rng.normal(size=(4, 4, 5)) + 0.4 * np.eye(4)[:, :, None] * np.arange(5) for _ in range(3)]
    res = pairing_test(strata)  # (4!)^3 = 13824 pairings: exact
    assert res.exact
    # brute force: z of every pairing per layer, then Westfall-Young's step-down by hand
    n = 12
    mean = sum(c.sum((0, 1)) / 4 for c in strata) / n
    d = [c - c.mean(1, keepdims=True) - c.mean(0, keepdims=True) + c.mean((0, 1), keepdims=True) for c in strata]
    sd = np.sqrt(sum((x**2).sum((0, 1)) / 3 for x in d)) / n
    perms = list(itertools.permutations(range(4)))
    z = np.asarray(
        [
            np.abs(sum(c[np.arange(4), list(p)].sum(0) for c, p in zip(strata, combo, strict=True)) / n - mean) / sd
            for combo in itertools.product(perms, repeat=3)
        ]
    )
    z_obs = np.abs(sum(np.trace(c) for c in strata) / n - mean) / sd
    order = np.argsort(-z_obs)
    step = [((z[:, order[j:]].max(1)) >= z_obs[order[j]] - 1e-9).mean() for j in range(5)]
    expected = np.empty(5)
    expected[order] = np.maximum.accumulate(step)
    np.testing.assert_allclose(res.p_maxT, expected)
    single = (z.max(1)[:, None] >= z_obs[None] - 1e-9).mean(0)
    assert np.all(res.p_maxT <= single + 1e-12) and np.all(res.p_maxT >= res.p - 1e-12)


# ---------------------------------------------------------------- block-level intervals


@pytest.mark.parametrize("n_blocks", [5, 15, 40])
@pytest.mark.parametrize("set_sd,cluster_sd", [(0.0, 0.0), (1.0, 0.3)])
def test_block_intervals_cover_at_nominal_rate(n_blocks, set_sd, cluster_sd):
    """The 95% t interval over blocks of the demo-swap excess covers the true effect at 95%,
    within binomial error, with and without set main effects and cluster noise."""
    rng = np.random.default_rng(100 + n_blocks)
    reps, effect, covered = 300, 0.2, 0
    for _ in range(reps):
        strata, blocks = _demo_strata(rng, n_blocks, 4, effect=effect, set_sd=set_sd, cluster_sd=cluster_sd)
        res = pairing_test(strata, links=blocks.tolist(), max_exact=1, n_perm=1)
        lo, hi = cluster_mean(res.unit_diff[:, 0], blocks[res.unit_stratum]).ci(0.95)
        covered += lo <= effect <= hi
    lo_b, hi_b = sps.binom.interval(0.99, reps, 0.95)
    assert lo_b <= covered <= hi_b, covered


def test_a_set_main_effect_cancels_in_the_block_contrast():
    """Set main effects move own and swapped pairings alike: the block interval does not widen."""
    rng = np.random.default_rng(7)
    widths = []
    for set_sd in (0.0, 5.0):
        strata, blocks = _demo_strata(np.random.default_rng(8), 15, 10, set_sd=set_sd)
        res = pairing_test(strata, links=blocks.tolist(), max_exact=1, n_perm=1)
        lo, hi = cluster_mean(res.unit_diff[:, 0], blocks[res.unit_stratum]).ci(0.95)
        widths.append(hi - lo)
    assert widths[1] == pytest.approx(widths[0], rel=0.05)
    del rng


def test_the_exact_demo_swap_test_keeps_its_size():
    rng = np.random.default_rng(9)
    reps, rejected = 300, 0
    for _ in range(reps):
        strata, blocks = _demo_strata(rng, 8, 3, set_sd=1.0, cluster_sd=0.5)
        rejected += pairing_test(strata, links=blocks.tolist()).p[0] <= 0.05
    assert rejected <= sps.binom.interval(0.99, reps, 0.05)[1]


def test_planted_specificity_is_found_with_20_blocks_and_not_with_5():
    """Power: an own-set effect of 0.75 block SDs (the detectable effect at 20 blocks, 80%
    power, alpha 0.05, times 1.15) is rejected in at least 80% of runs with 20 blocks; with 5
    blocks (floor 1/16) never, even at three times that effect."""
    rng = np.random.default_rng(10)
    noise, n_q = 1.0, 4
    block_sd = noise * np.sqrt(2 * 2 / (2 * n_q))  # SD of a block's mean own-minus-other contrast
    effect = 1.15 * detectable_effect(block_sd, 20)
    assert effect / block_sd == pytest.approx(0.76, abs=0.02)
    reps = 100
    hits20 = sum(
        pairing_test(
            _demo_strata(rng, 20, n_q, effect=effect)[0],
            links=np.repeat(np.arange(20), n_q).tolist(),
            n_perm=999,
            seed=r,
        ).p[0]
        <= 0.05
        for r in range(reps)
    )
    hits5 = sum(
        pairing_test(_demo_strata(rng, 5, n_q, effect=3 * effect)[0], links=np.repeat(np.arange(5), n_q).tolist()).p[0]
        <= 0.05
        for _ in range(reps)
    )
    assert hits20 >= 80 and hits5 == 0


# ---------------------------------------------------------------- the update null


def _design(n_sets, q, m=2):
    sets = np.repeat(np.arange(n_sets), q)
    block = sets // m
    query = np.asarray([f"b{b}q{i}" for b, i in zip(block, np.tile(np.arange(q), n_sets), strict=True)], dtype=object)
    label = np.asarray(["pos" if i % 2 else "neg" for i in np.tile(np.arange(q), n_sets)], dtype=object)
    return Units(np.zeros(n_sets * q, dtype=np.int64), sets, block, query, label)


def test_independent_states_give_no_update_excess():
    """Anchor, ICL and IT independent Gaussians (d = 640): the update pair shares −anchor by
    construction (matched cosine ≈ 0.5); its query-swap null keeps that term, so the excess is
    0 within error, where subtracting each query's own anchor on each side gives +0.5."""
    rng = np.random.default_rng(11)
    units = _design(8, 6)
    a = {qid: rng.normal(size=(1, 640)) for qid in set(units.query)}
    anchor = np.stack([a[qid] for qid in units.query])
    states = {"anchor": anchor, "icl": rng.normal(size=anchor.shape), "it": rng.normal(size=anchor.shape)}
    df = null_tests(states, units, n_perm=199)
    row = df[(df["pair"] == "update") & (df["null"] == "query_swap")].iloc[0]
    assert row["observed"] == pytest.approx(0.5, abs=0.03)
    assert abs(row["diff"]) < 3 * row["se"] + 1e-3 and row["verdict"] != "above null"
    x, y = states["icl"] - anchor, states["it"] - anchor  # each side against its own query's anchor
    xu, yu = (
        x[:, 0] / np.linalg.norm(x[:, 0], axis=1, keepdims=True),
        y[:, 0] / np.linalg.norm(y[:, 0], axis=1, keepdims=True),
    )
    same_set = units.set[:, None] == units.set[None, :]
    old = (xu @ yu.T)[same_set & ~np.eye(len(units), dtype=bool)].mean()
    assert row["observed"] - old == pytest.approx(0.5, abs=0.03)


# ---------------------------------------------------------------- margins, verdicts, controls


def test_margins_are_declared_per_quantity_with_a_ceiling_rule():
    assert margins(None)["raw"] == "ceiling" and margins(0.03)["update"] == 0.03 and margins(0.03)["kl"] == 0.05
    declared = margins({"centred": 0.01, "ceiling_fraction": 0.5})
    assert margin_for(declared, "centred", np.array([0.4])) == pytest.approx([0.01])
    np.testing.assert_allclose(margin_for(declared, "raw", np.array([0.4, -0.1, np.nan])), [0.2, np.nan, np.nan])
    with pytest.raises(ValueError, match="unknown margin quantities"):
        margins({"cosine": 0.1})


def test_verdicts_never_say_zero_and_zero_variance_is_undefined():
    assert verdict(0.01, 0.02, 0.001, False, se=0.1) == "above null"
    assert verdict(-0.02, -0.01, 0.001, False, se=0.1) == "below null"
    assert verdict(-0.05, 0.05, 0.5, True, se=0.1, margin=0.02) == "equivalent within ±0.02"
    assert verdict(-0.05, 0.05, 0.5, False, se=0.1) == "inconclusive"
    assert verdict(0.0, 0.0, 1.0, True, se=0.0) == "undefined"
    res = tost(np.zeros(12), np.repeat(np.arange(4), 3), 0.02)  # no variation: no evidence either way
    assert np.isnan(res.p) and not res.equivalent


def test_the_tost_interval_and_the_ci_share_one_standard_error():
    rng = np.random.default_rng(12)
    x, groups = rng.normal(size=60), np.repeat(np.arange(12), 5)
    cm, t = cluster_mean(x, groups), tost(x, groups, 0.5)
    gm = pd.Series(x).groupby(groups).mean()
    ci95 = sps.ttest_1samp(gm, 0.0).confidence_interval(0.95)
    assert cm.ci(0.95) == pytest.approx((ci95.low, ci95.high))
    assert t.se == pytest.approx(cm.se) and (t.ci_low, t.ci_high) == pytest.approx(cm.ci(0.90))


def test_ratio_interval_is_the_delta_method_over_groups():
    rng = np.random.default_rng(13)
    groups = np.repeat(np.arange(30), 4)
    den = 1.0 + 0.2 * rng.normal(size=120)
    num = 0.3 * den + 0.1 * rng.normal(size=120)
    r, lo, hi = ratio_ci(num, den, groups)
    ga, gb = pd.Series(num).groupby(groups).mean().to_numpy(), pd.Series(den).groupby(groups).mean().to_numpy()
    assert r == pytest.approx(ga.mean() / gb.mean())
    se = ((ga - r * gb) / gb.mean()).std(ddof=1) / np.sqrt(30)
    assert (lo, hi) == pytest.approx((r - sps.t.ppf(0.975, 29) * se, r + sps.t.ppf(0.975, 29) * se))
    assert np.isnan(ratio_ci(num, rng.normal(size=120) * 0.01, groups)[1])  # a denominator near 0: no interval


def test_the_positive_control_detects_set_specificity_and_sets_the_margin():
    """IT seed 1 and seed 2 tuned on the same set share a set component; ICL does not: the
    ceiling's demo-swap excess is above null, ICL–IT's is a small fraction of it, and the
    default margin is a quarter of the ceiling."""
    rng = np.random.default_rng(14)
    units = _design(24, 4)
    n, d = len(units), 32
    per_query = {qid: rng.normal(size=(1, d)) for qid in sorted(set(units.query))}
    anchor = np.stack([per_query[qid] for qid in units.query])
    set_part = rng.normal(size=(24, 1, d))[units.set]
    states = {
        "anchor": anchor,
        "icl": anchor + rng.normal(size=(n, 1, d)),
        "it": anchor + set_part + rng.normal(size=(n, 1, d)),
        "it_seed2": anchor + set_part + rng.normal(size=(n, 1, d)),
    }
    df = null_tests(states, units, n_perm=199)
    ceiling = df[(df["pair"] == "ceiling_it") & (df["null"] == "demo_swap") & (df["centring"] == "raw")].iloc[0]
    assert ceiling["role"] == "control" and ceiling["verdict"] == "above null"
    row = df[(df["pair"] == "icl_it") & (df["null"] == "demo_swap") & (df["centring"] == "raw")].iloc[0]
    assert row["ceiling"] == "ceiling_it" and row["ceiling_diff"] == pytest.approx(ceiling["diff"])
    assert row["margin"] == pytest.approx(0.25 * ceiling["diff"])
    assert row["fraction_low"] < row["fraction"] < row["fraction_high"] and abs(row["fraction"]) < 0.3
    assert row["verdict"].startswith("equivalent within ±")
    # tests and controls are separate Holm families
    layer = df[df["layer"] == 0]
    assert layer.groupby("role").size().to_dict() == {"control": 6, "test": 10}


# ---------------------------------------------------------------- power


def test_design_floors_agree_with_the_tests_own_floor():
    for g in (5, 9, 15):
        strata, blocks = _demo_strata(np.random.default_rng(g), g, 2)
        res = pairing_test(strata, links=blocks.tolist(), n_perm=1000)
        floor = next(
            f
            for f in design_floors(n_blocks=g, sets_per_block=2, queries_per_set=4, n_labels=2)
            if f.null == "demo_swap"
        )
        assert floor.p_min == res.p_min and floor.exact == res.exact
        assert floor.holm_floor == pytest.approx(min(1.0, family_size() * res.p_min))
    five = [
        f for f in design_floors(n_blocks=5, sets_per_block=2, queries_per_set=4, n_labels=2) if f.null == "demo_swap"
    ][0]
    assert not five.reachable and five.blocks_needed == 9  # 10 · 2/2^9 = 0.039 < 0.05 ≤ 10 · 2/2^8
    assert not design_floors(n_blocks=40, sets_per_block=2, queries_per_set=4, n_perm=100)[1].reachable  # 10/101
    assert design_floors(n_blocks=40, sets_per_block=2, queries_per_set=4, n_perm=100)[1].blocks_needed is None


def test_detectable_effect_and_blocks_needed_invert_each_other():
    d = detectable_effect(0.1, 20, family=10)
    assert blocks_needed(d, 0.1, family=10) == 20
    assert blocks_needed(d * 1.001, 0.1, family=10) <= 20 < blocks_needed(d * 0.95, 0.1, family=10)
    assert blocks_needed(0.0, 0.1) is None and np.isnan(detectable_effect(0.1, 1))


def test_power_table_from_a_pilot():
    tests = pd.DataFrame(
        {
            "cell_key": "c",
            "pair": ["icl_it", "icl_it"],
            "centring": "raw",
            "null": "demo_swap",
            "role": "test",
            "layer": [0, 1],
            "diff": [0.01, 0.002],
            "se": [0.01, 0.004],
            "n_blocks": 16,
            "margin": [0.02, 0.02],
        }
    )
    out = power_table(tests, blocks=40)
    assert len(out) == 1 and out.iloc[0]["layer"] == 1 and out.iloc[0]["block_sd"] == pytest.approx(0.016)
    assert out.iloc[0]["detectable"] == pytest.approx(detectable_effect(0.016, 16, family=1))
    assert out.iloc[0]["blocks_for_margin"] == blocks_needed(0.02, 0.016)


def test_check_warns_for_a_five_block_cell(tmp_path):
    from typer.testing import CliRunner

    from iclit.cli import app

    spec = tmp_path / "five.yaml"
    spec.write_text("name: five\nmodel: tiny-random-llama\ntask: sentiment\nk: 2\nresamples: 10\nqueries_per_set: 4\n")
    res = CliRunner().invoke(app, ["run", str(spec), "--out", str(tmp_path / "run"), "--check"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "demo-swap test cannot reject at 0.05" in text and "at least 9 query blocks" in text
    res = CliRunner().invoke(app, ["run", str(spec), "--out", str(tmp_path / "run"), "--check", "--strict"])
    assert res.exit_code == 2 and not (tmp_path / "run").exists()
    spec.write_text(spec.read_text().replace("resamples: 10", "resamples: 18"))
    res = CliRunner().invoke(app, ["run", str(spec), "--out", str(tmp_path / "run"), "--check", "--strict"])
    assert res.exit_code == 0 and "cannot reject" not in res.output


def test_the_bootstrap_of_blocks_keeps_every_unit_of_a_drawn_block():
    from iclit.analysis.stats import hierarchical_bootstrap_means

    x = np.array([1.0, 3.0, 10.0, 30.0, 100.0])
    groups = ["a", "a", "b", "b", "c"]
    draws = hierarchical_bootstrap_means(x, groups, n_boot=400, seed=1, within=False)
    # a draw of 3 groups is a multiset of whole blocks: its sum of units is a sum of block sums
    block_sums, sizes = {"a": 4.0, "b": 40.0, "c": 100.0}, {"a": 2, "b": 2, "c": 1}
    possible = {
        round(sum(block_sums[g] for g in c) / sum(sizes[g] for g in c), 9)
        for c in itertools.combinations_with_replacement("abc", 3)
    }
    assert {round(v, 9) for v in draws} <= possible
    assert len({round(v, 9) for v in draws}) > 3


def test_summaries_of_a_crossed_cell_use_blocks_as_units():
    from iclit.analysis.stats import summarize, summarize_layers

    rng = np.random.default_rng(15)
    blocks = np.repeat(np.arange(6), 8)
    x = rng.normal(size=6)[blocks] + 0.1 * rng.normal(size=48)
    s = summarize(x, blocks)
    ci = sps.ttest_1samp(pd.Series(x).groupby(blocks).mean(), 0.0).confidence_interval(0.95)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((ci.low, ci.high)) and s["n"] == 48
    assert summarize(x)["ci_high"] - summarize(x)["ci_low"] < 0.5 * (ci.high - ci.low)  # trials as units: too narrow
    table = summarize_layers({"icl_it": np.column_stack([x, x])}, blocks)
    assert table["ci_low"].tolist() == pytest.approx([ci.low, ci.low])
