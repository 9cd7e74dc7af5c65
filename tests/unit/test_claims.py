"""The replication's summary table (iclit.report.claims) on a small stored suite: every number
in it is what the package's own tests and contrasts compute on the same runs, and every number
the Markdown prints is one of them."""

from __future__ import annotations

import numpy as np
import pytest

from iclit.analysis import load_run
from iclit.analysis.cells import last_layer_rows
from iclit.analysis.contrasts import ANCHOR_COMPARISONS, cell_contrasts, within_cell_contrasts
from iclit.experiments import parse_spec, run_experiment
from iclit.report.claims import CLAIMS, Claim, claim_rows, claims_markdown

TINY, CONTROL = "tiny-random-llama", "tiny-random-llama@random"
BASE = {
    "model": TINY,
    "task": "sentiment",
    "k": 2,
    "resamples": 8,
    "queries_per_set": 3,
    "seeds": [0],
    "arms": ["anchor", "icl", "it", "icl_reordered"],
    "recipe": {"epochs": 3},
    "baselines": ["centered", "update"],
}
SPECS = {
    "main": {
        "it_seeds": 2,
        "baselines": ["centered", "update", "noise_ceiling"],
        "factors": {"model": [TINY, CONTROL]},
    },
    "label_control": {"it_seeds": 2, "block_sets": "flipped", "baselines": ["centered", "update", "noise_ceiling"]},
    "n_demos": {"factors": {"k": [1, 2]}},
}
TEST_CLAIMS = (
    Claim("main", "1", "anchors", "0.9", "main", "anchors", {"model": TINY}),
    Claim("specific", "1", "demo-swap", "–", "main", "demo_swap", {"model": TINY}),
    Claim("query", "1", "query-swap, control model", "–", "main", "query_swap", {"model": CONTROL}),
    Claim("label_control", "2", "flipped", "–", "label_control", "demo_swap", {"model": TINY}),
    Claim("n_demos", "5", "k", "–", "n_demos", "factor", factor="k", level="1"),
    Claim("size", "12", "not run here", "–", "ladder", "factor", factor="model", level="x"),
    Claim("k8", "5", "a level not stored (yet)", "–", "n_demos", "factor", factor="k", level="8"),
)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    for name, extra in SPECS.items():
        run_experiment(parse_spec({"name": name, **BASE, **extra}), root / name)
    return root


@pytest.fixture(scope="module")
def rows(suite):
    return claim_rows(suite, TEST_CLAIMS).set_index("key")


def _cell(run, **labels):
    o = run.outputs.drop_duplicates("cell_key")
    for k, v in labels.items():
        o = o[o[k].astype(str) == v]
    return o["cell_key"].item()


def test_null_rows_are_the_runs_tests(suite, rows):
    for key, run_name, model, null in (
        ("specific", "main", TINY, "demo_swap"),
        ("query", "main", CONTROL, "query_swap"),
        ("label_control", "label_control", TINY, "demo_swap"),
    ):
        run = load_run(suite / run_name)
        tests = last_layer_rows(run.tests)
        cell = tests[(tests["cell_key"] == _cell(run, model=model)) & (tests["centring"] == "raw")]
        want = cell[(cell["pair"] == "icl_it") & (cell["null"] == null)].iloc[0]
        control = cell[(cell["pair"] == "ceiling_it") & (cell["null"] == null)].iloc[0]
        got = rows.loc[key]
        for col in ("diff", "ci_low", "ci_high", "p_holm", "margin", "verdict", "fraction", "p_min"):
            assert got[col] == want[col] or (np.isnan(got[col]) and np.isnan(want[col])), (key, col)
        assert (got["control"], got["control_diff"], got["control_verdict"]) == (
            "ceiling_it",
            control["diff"],
            control["verdict"],
        )
        assert got["can_tell"] == bool(want["p_min"] < 0.05 and control["verdict"] == "above null")
        assert got["family"] == int(((tests["cell_key"] == want["cell_key"]) & (tests["role"] == "test")).sum())


def test_anchor_rows_are_the_within_cell_contrasts(suite, rows):
    run = load_run(suite / "main")
    key = _cell(run, model=TINY)
    want = within_cell_contrasts(run, ANCHOR_COMPARISONS, cells=[key])
    got = rows.loc["main"]
    first = want.iloc[0]
    assert (got["diff"], got["ci_low"], got["ci_high"], got["p_holm"], got["verdict"]) == (
        first["diff"],
        first["ci_low"],
        first["ci_high"],
        first["p_holm"],
        first["verdict"],
    )
    assert got["value"] == pytest.approx(first["mean_a"])  # the cosine's mean over blocks
    assert got["value_low"] < got["value"] < got["value_high"]
    tests = last_layer_rows(run.tests)
    seed = tests[(tests["cell_key"] == key) & (tests["pair"] == "ceiling_it") & (tests["centring"] == "raw")]
    assert got["control_diff"] == seed["observed"].iloc[0]
    assert got["margin"] == 0.02  # the default between-cell margin


def test_factor_rows_are_the_cell_contrasts(suite, rows):
    run = load_run(suite / "n_demos")
    table = cell_contrasts(run, [("icl_it", "cosine"), ("icl_it", "demo_swap")], factors=["k"])
    want = table[(table["level_a"] == "1") & (table["quantity"] == "cosine")].iloc[0]
    got = rows.loc["n_demos"]
    for col in ("diff", "ci_low", "ci_high", "p_holm", "margin", "verdict"):
        assert got[col] == want[col], col
    assert got["family"] == len(table)
    rejected = want["verdict"] in ("above null", "below null")
    assert got["can_tell"] == (rejected or bool(got["detectable"] < got["margin"]))


def test_the_markdown_prints_those_numbers(rows):
    md = claims_markdown(rows.reset_index())
    assert md.count("\n") == 2 + len(TEST_CLAIMS)
    r = rows.loc["specific"]
    assert f"{r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]" in md
    assert f"{r['control_diff']:+.3f}" in md and r["verdict"] in md
    n = rows.loc["n_demos"]
    assert f"{n['diff']:+.3f} [{n['ci_low']:+.3f}, {n['ci_high']:+.3f}]" in md
    assert rows.loc["size", "iclit"] == "not run" and np.isnan(rows.loc["size", "diff"])
    assert rows.loc["k8", "iclit"] == "not run" and np.isnan(rows.loc["k8", "diff"])  # a run under way


def test_the_paper_claims_name_runs_of_the_suite():
    from pathlib import Path

    specs = {p.stem for p in (Path(__file__).resolve().parents[2] / "configs" / "paper").glob("*.yaml")}
    assert {c.run for c in CLAIMS} <= specs
    assert len({c.key for c in CLAIMS}) == len(CLAIMS)


def test_the_claims_block_of_a_page_is_replaced_and_nothing_else():
    from iclit.report.claims import BEGIN, END, with_claims

    page = f"# Results\n\nintro\n\n{BEGIN}\nold table\n{END}\n\nmore\n"
    out = with_claims(page, "| a |\n| --- |\n")
    assert out == f"# Results\n\nintro\n\n{BEGIN}\n| a |\n| --- |\n{END}\n\nmore\n"
    assert with_claims(out, "| a |\n| --- |\n") == out
    with pytest.raises(ValueError, match="no claims block"):
        with_claims("# no block\n", "| a |")


def test_the_replication_page_puts_the_claims_table_first():
    """docs/replication.md is a results page: the claims block (one row per claim, as
    claims_markdown writes it) before the experiments, the experiments before the methods."""
    from pathlib import Path

    from iclit.report.claims import BEGIN, END

    page = (Path(__file__).resolve().parents[2] / "docs" / "replication.md").read_text(encoding="utf-8")
    assert page.index(BEGIN) < page.index(END) < page.index("## The experiments") < page.index("## Methods")
    block = page.split(BEGIN)[1].split(END)[0].strip().splitlines()
    assert block[0].startswith("| experiment | claim | paper | iclit")
    assert len(block) == 2 + len(CLAIMS)
