"""Between-cell contrasts with query blocks as units (iclit.analysis.contrasts)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from iclit.analysis import contrasts
from iclit.analysis.contrasts import CONTRAST_COLUMNS, cell_contrasts, compare_blocks
from iclit.analysis.rundata import RunData
from iclit.analysis.stats import holm
from iclit.analysis.units import block_values, unit_values


def _blocks(values, queries=None, ids=None) -> pd.DataFrame:
    ids = ids if ids is not None else [f"0/{i}" for i in range(len(values))]
    queries = queries if queries is not None else [(f"q{i}a", f"q{i}b") for i in range(len(values))]
    return pd.DataFrame({"block_id": ids, "value": values, "queries": queries})


def _tost(diff_sample_a, b=None, margin=0.05):
    """TOST by scipy's one-sided t tests (paired when b is a paired sample, else Welch)."""
    if b is None:
        lo = sps.ttest_1samp(diff_sample_a, -margin, alternative="greater").pvalue
        hi = sps.ttest_1samp(diff_sample_a, margin, alternative="less").pvalue
    else:
        lo = sps.ttest_ind(diff_sample_a - (-margin), b, equal_var=False, alternative="greater").pvalue
        hi = sps.ttest_ind(diff_sample_a - margin, b, equal_var=False, alternative="less").pvalue
    return max(lo, hi)


def test_paired_contrast_matches_ttest_rel():
    rng = np.random.default_rng(0)
    a = rng.normal(0.5, 0.1, size=9)
    b = a - 0.03 + rng.normal(0, 0.02, size=9)
    got = compare_blocks(_blocks(a), _blocks(b), margin=0.05)
    want = sps.ttest_rel(a, b)
    ci = want.confidence_interval(0.95)
    assert got["paired"] and got["n_blocks_a"] == got["n_blocks_b"] == 9
    assert got["diff"] == pytest.approx(np.mean(a - b))
    assert got["p"] == pytest.approx(want.pvalue)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((ci.low, ci.high))
    ci90 = want.confidence_interval(0.90)
    assert (got["tost_low"], got["tost_high"]) == pytest.approx((ci90.low, ci90.high))
    assert got["p_tost"] == pytest.approx(_tost(a - b, margin=0.05))


def test_unpaired_contrast_matches_welch():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.5, 0.1, size=7), rng.normal(0.4, 0.3, size=11)
    qb = [(f"r{i}",) for i in range(11)]
    got = compare_blocks(_blocks(a), _blocks(b, qb), margin=0.1)
    want = sps.ttest_ind(a, b, equal_var=False)
    ci = want.confidence_interval(0.95)
    assert not got["paired"]
    assert got["diff"] == pytest.approx(a.mean() - b.mean())
    assert got["p"] == pytest.approx(want.pvalue)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert got["p_tost"] == pytest.approx(_tost(a, b, margin=0.1))
    # CI and p agree: the CI excludes 0 exactly when p < 0.05
    assert (got["p"] < 0.05) == (got["ci_low"] > 0 or got["ci_high"] < 0)


def test_paired_only_when_the_same_blocks_read_the_same_queries():
    a = _blocks([0.1, 0.2, 0.4])
    assert compare_blocks(a, _blocks([0.0, 0.3, 0.1]), margin=0.1)["paired"]
    other_queries = _blocks([0.0, 0.3, 0.1], queries=[("q0a", "q0b"), ("q1a", "x"), ("q2a", "q2b")])
    assert not compare_blocks(a, other_queries, margin=0.1)["paired"]
    fewer = _blocks([0.0, 0.3])
    assert not compare_blocks(a, fewer, margin=0.1)["paired"]
    one = compare_blocks(_blocks([0.1]), _blocks([0.2]), margin=0.1)
    assert np.isnan(one["p"]) and np.isnan(one["ci_low"])


def test_block_values_are_block_means():
    units = pd.DataFrame(
        {
            "cell_key": "c",
            "pair": "icl_it",
            "quantity": "cosine",
            "seed": [0, 0, 0, 0, 1, 1],
            "block": [0, 0, 1, 1, 0, 0],
            "query_id": ["a", "b", "c", "c", "a", np.nan],
            "value": [1.0, 3.0, 2.0, np.nan, 5.0, 7.0],
        }
    )
    got = block_values(units)
    assert got["value"].tolist() == [2.0, 2.0, 6.0]
    assert got["n_units"].tolist() == [2, 1, 2]
    assert got["queries"].iloc[0] == ("a", "b")


def _synthetic_run(monkeypatch, *, shared: bool, effect: float = 0.0, n_blocks: int = 6, seed: int = 0):
    """A RunData of two factors (k: 1, 2; wrong_labels: 0, 1; grid) whose per-trial values
    come from a fake :func:`contrasts.unit_values`: value = block effect + level effect + noise."""
    rng = np.random.default_rng(seed)
    plan = {
        "factors": {"k": [1, 2], "wrong_labels": [0.0, 1.0]},
        "base": {"k": 2, "wrong_labels": 0.0},
        "design": "grid",
        "equivalence_margin": 0.05,
    }
    cells = [(k, w) for k in (1, 2) for w in (0.0, 1.0)]
    outputs = pd.DataFrame(
        {"cell_key": [f"c{k}{w}" for k, w in cells], "k": [k for k, _ in cells], "wrong_labels": [w for _, w in cells]}
    )
    block_effect = rng.normal(0, 0.2, size=n_blocks)
    rows = []
    for k, w in cells:
        for b in range(n_blocks):
            for q in range(4):
                query = f"b{b}q{q}" if shared else f"c{k}{w}b{b}q{q}"
                for pair, quantity in contrasts.DEFAULT_QUANTITIES:
                    rows.append(
                        {
                            "cell_key": f"c{k}{w}",
                            "trial_key": f"c{k}{w}/{b}/{q}",
                            "seed": 0,
                            "set": 2 * b,
                            "block": b,
                            "query_id": query,
                            "pair": pair,
                            "quantity": quantity,
                            "layer": 3,
                            "value": block_effect[b] + (effect if k == 1 else 0.0) + rng.normal(0, 0.05),
                        }
                    )
    units = pd.DataFrame(rows)
    monkeypatch.setattr(contrasts, "unit_values", lambda run, quantities, layer, **_: units)
    trials = outputs.assign(trial_key=outputs["cell_key"])
    return RunData(path=None, latest=None, plan=plan, frame=pd.DataFrame(), outputs=outputs, trials=trials), units


def test_cell_contrasts_on_a_synthetic_grid(monkeypatch):
    run, units = _synthetic_run(monkeypatch, shared=True, effect=0.3)
    table = cell_contrasts(run)
    assert list(table.columns) == list(CONTRAST_COLUMNS)
    # two factors × one non-reference level × three quantities: the Holm family is the whole table
    assert len(table) == 6
    np.testing.assert_allclose(table["p_holm"], holm(table["p"].to_numpy()))
    assert table["paired"].all()
    k = table[(table["factor"] == "k") & (table["pair"] == "icl_it") & (table["quantity"] == "cosine")].iloc[0]
    assert (k["level_a"], k["level_b"]) == ("1", "2")
    # the direct computation: per (seed, block), the mean over the level's trials (other factor averaged)
    u = units[(units["pair"] == "icl_it") & (units["quantity"] == "cosine")]
    u = u.assign(k=u["cell_key"].str[1].astype(int))
    means = u.groupby(["k", "block"])["value"].mean().unstack("block")
    want = sps.ttest_rel(means.loc[1], means.loc[2])
    assert k["p"] == pytest.approx(want.pvalue)
    assert k["diff"] == pytest.approx((means.loc[1] - means.loc[2]).mean())
    assert k["n_blocks_a"] == 6 and k["verdict"] == "above null"
    w = table[(table["factor"] == "wrong_labels") & (table["quantity"] == "cosine")].iloc[0]
    assert w["verdict"] in ("equivalent", "inconclusive")


def test_cell_contrasts_unpaired_when_the_cells_read_other_queries(monkeypatch):
    run, units = _synthetic_run(monkeypatch, shared=False, effect=0.0)
    table = cell_contrasts(run, factors=["k"])
    assert set(table["factor"]) == {"k"} and not table["paired"].any()
    u = units[(units["pair"] == "icl_it") & (units["quantity"] == "cosine")]
    u = u.assign(k=u["cell_key"].str[1].astype(int))
    means = u.groupby(["k", "block"])["value"].mean().unstack("block")
    want = sps.ttest_ind(means.loc[1], means.loc[2], equal_var=False)
    row = table[table["quantity"] == "cosine"].iloc[0]
    assert row["p"] == pytest.approx(want.pvalue)
    with pytest.raises(ValueError, match="not a factor"):
        cell_contrasts(run, factors=["model"])


def test_unknown_quantities_are_refused_with_the_known_ones():
    run = RunData(path=None, latest=None, plan={"factors": {}}, frame=pd.DataFrame(), outputs=pd.DataFrame())
    with pytest.raises(ValueError, match="no demo_swap null"):
        unit_values(run, [("anchor_icl", "demo_swap")])
    with pytest.raises(ValueError, match="known: cosine"):
        unit_values(run, [("icl_it", "kl")])
    with pytest.raises(ValueError, match="known: anchor_icl"):
        unit_values(run, [("icl", "cosine")])


def test_a_stored_run_through_results_contrasts_and_the_report(tmp_path):
    """A tiny crossed run with a k factor → `iclit results --contrasts -f csv` → the same
    table as the package computes, and a contrasts table in the HTML report."""
    from typer.testing import CliRunner

    from iclit.analysis import load_run
    from iclit.cli import app
    from iclit.experiments import parse_spec, run_experiment
    from iclit.report.html import render_report

    spec = parse_spec(
        {
            "name": "contrasts",
            "model": "tiny-random-llama",
            "task": "sentiment",
            "k": 2,
            "resamples": 6,
            "queries_per_set": 2,
            "chunk_size": 2,
            "recipe": {"epochs": 1},
            "factors": {"k": [1, 2]},
        }
    )
    out = tmp_path / "run"
    run_experiment(spec, out)
    result = CliRunner().invoke(app, ["results", str(out), "--contrasts", "-f", "csv"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.output))
    assert list(table.columns) == list(CONTRAST_COLUMNS)
    assert len(table) == len(contrasts.DEFAULT_QUANTITIES)
    assert set(table["factor"]) == {"k"} and (table["level_a"] == 1).all() and (table["level_b"] == 2).all()
    assert table["paired"].all()  # the k cells read the same queries in the same blocks
    assert (table["n_blocks_a"] == 3).all()  # 6 sets of 2 queries, 2 sets per block
    run = load_run(out)
    direct = cell_contrasts(run)
    np.testing.assert_allclose(table["p"], direct["p"], rtol=1e-6)
    # the per-trial demo-swap excess is the nulls' unit difference: its mean is the tests' diff
    units = unit_values(run, [("icl_it", "demo_swap")])
    tests = run.tests[
        (run.tests["pair"] == "icl_it") & (run.tests["centring"] == "raw") & (run.tests["null"] == "demo_swap")
    ]
    for cell, sub in units.groupby("cell_key"):
        t = tests[tests["cell_key"] == cell]
        t = t[t["layer"] == t["layer"].max()]
        assert sub["layer"].iloc[0] == t["layer"].iloc[0]
        assert sub["value"].mean() == pytest.approx(float(t["diff"].iloc[0]), abs=1e-9)
    np.testing.assert_allclose(table["p_holm"], holm(table["p"].to_numpy()), rtol=1e-6)
    html = render_report(out)
    assert "Between-cell contrasts" in html
    bad = CliRunner().invoke(app, ["results", str(out), "--contrasts", "--tests"])
    assert bad.exit_code != 0


def test_within_cell_contrasts_are_paired_t_tests_over_the_cells_blocks(monkeypatch):
    run, units = _synthetic_run(monkeypatch, shared=True, effect=0.1)
    comparisons = [(("icl_it", "cosine"), ("icl_it", "demo_swap")), (("icl_it", "cosine"), ("update", "demo_swap"))]
    table = contrasts.within_cell_contrasts(run, comparisons)
    assert list(table.columns) == list(contrasts.WITHIN_COLUMNS)
    assert len(table) == 4 * 2 and table["paired"].all()  # 4 cells × 2 comparisons: one Holm family
    np.testing.assert_allclose(table["p_holm"], holm(table["p"].to_numpy()))
    row = table[(table["cell_key"] == "c10.0") & (table["pair_b"] == "update")].iloc[0]
    u = units[units["cell_key"] == "c10.0"]
    a = u[(u["pair"] == "icl_it") & (u["quantity"] == "cosine")].groupby("block")["value"].mean()
    b = u[(u["pair"] == "update") & (u["quantity"] == "demo_swap")].groupby("block")["value"].mean()
    want = sps.ttest_rel(a, b)
    assert row["p"] == pytest.approx(want.pvalue)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(want.confidence_interval()))


def test_contrast_margin_reads_a_number_or_the_between_entry_of_a_mapping():
    assert contrasts.contrast_margin(0.02, "icl_it") == 0.02
    declared = {"raw": "ceiling", "update": "ceiling", "between": 0.04}
    assert contrasts.contrast_margin(declared, "update") == contrasts.contrast_margin(declared, "icl_it") == 0.04
    # a mapping stored before `between` existed: a numeric cosine entry as before, else the default
    assert contrasts.contrast_margin({"raw": 0.03, "update": 0.1}, "update") == 0.1
    assert contrasts.contrast_margin({"raw": 0.03, "update": "ceiling"}, "icl_it") == 0.03
    assert contrasts.contrast_margin({"raw": 0.03, "update": "ceiling"}, "update") == 0.02
    assert np.isnan(contrasts.contrast_margin(None, "icl_it"))
    got = compare_blocks(_blocks([0.1, 0.2, 0.4]), _blocks([0.1, 0.25, 0.3]), margin=float("nan"))
    assert np.isnan(got["p_tost"]) and np.isfinite(got["p"])
