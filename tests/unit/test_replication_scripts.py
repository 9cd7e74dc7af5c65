"""scripts/replication_tables.py and replication_nulls.py call the package for every contrast,
family and verdict, and print their sections from tiny stored runs."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest
from exp_helpers import REPO

SCRIPTS = REPO / "scripts"


@pytest.mark.parametrize("name", ["replication_tables.py", "replication_nulls.py"])
def test_the_scripts_declare_no_test_family_or_verdict_rule(name):
    tree = ast.parse((SCRIPTS / name).read_text())
    defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assigned = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    called = {
        n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
    }
    assert not ({"verdict", "holm", "bh", "adjust_family"} & defined)
    assert not ({"NULLS", "PAIRS", "TEST_PAIRS"} & assigned)
    assert not (
        {"holm", "verdict", "paired_bootstrap_diff", "permutation_test", "factor_effects", "ttest_rel", "ttest_ind"}
        & called
    )


@pytest.fixture()
def scripts(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    for mod in ("replication_tables", "replication_nulls"):
        sys.modules.pop(mod, None)
    import replication_tables

    monkeypatch.setattr(replication_tables, "FIGURES", tmp_path / "figures")
    return replication_tables


def _run(root: Path, name: str, **spec) -> None:
    from iclit.experiments import parse_spec, run_experiment

    base = {
        "name": name,
        "model": "tiny-random-llama",
        "task": "sentiment",
        "k": 2,
        "resamples": 4,
        "queries_per_set": 2,
        "chunk_size": 2,
        "recipe": {"epochs": 1},
        "equivalence_margin": 0.02,
    }
    run_experiment(parse_spec({**base, **spec}), root / name)


def test_a_factor_section_and_the_dose_section_from_tiny_runs(scripts, tmp_path):
    root = tmp_path / "paper"
    _run(root, "n_demos", factors={"k": [1, 2]})
    _run(root, "dose", recipe={"epochs": 3, "capture_steps": [1, 3]}, factors={"recipe": [{"lr": 1e-4}, {"lr": 1e-3}]})
    text = scripts.section(root, "n_demos")
    assert "ICL–IT − anchor–ICL [95% CI], p Holm, verdict" in text
    assert "| 1 vs 2 | ICL–IT | cosine | 2 / 2 (paired)" in text
    assert "paired t test over the 2 blocks; Holm over the 4 tests of this table" in text  # 2 cells × 2 contrasts
    assert "Holm over the 3 tests of this table; TOST against ±0.02;" in text  # 1 level × 3 quantities
    dose = scripts.section(root, "dose")
    assert "ICL–IT − anchor–ICL" in dose and "paired t over blocks" in dose


def test_every_cell_prints_its_positive_control_and_the_fraction_of_it(scripts, tmp_path, capsys):
    """The nulls table prints, per cell, the ceiling pair's demo-swap excess and ICL–IT's
    fraction of it, as iclit.analysis.nulls computes them."""
    import replication_nulls

    from iclit.analysis import load_run
    from iclit.analysis.cells import last_layer_rows

    root = tmp_path / "paper"
    _run(root, "main", arms=["anchor", "icl", "it", "icl_reordered"], equivalence_margin={"raw": "ceiling"})
    run = load_run(root / "main")
    replication_nulls.tests_table(run, None)
    text = capsys.readouterr().out
    t = last_layer_rows(run.tests)
    row = t[(t["pair"] == "icl_it") & (t["centring"] == "raw") & (t["null"] == "demo_swap")].iloc[0]
    assert row["ceiling"] == "ceiling_icl"
    line = next(x for x in text.splitlines() if "| ICL–IT | raw |" in x)
    assert f"ICL–ICL reordered {row['ceiling_diff']:+.3f} ({row['ceiling_p']:.2g})" in line
    assert line.rstrip(" |").endswith(replication_nulls._control_cells(row.to_dict())[1])
    assert "Positive control: the same demo-swap test on the cell's ceiling pair" in text


def test_the_fraction_cell_says_when_its_interval_is_not_finite(scripts):
    import replication_nulls

    row = {"ceiling": "ceiling_it", "ceiling_diff": 0.2, "ceiling_p": 0.001, "fraction": 0.25}
    assert replication_nulls._control_cells({**row, "fraction_low": 0.1, "fraction_high": 0.4}) == [
        "IT–IT′ +0.200 (0.001)",
        "+0.25 [+0.10, +0.40]",
    ]
    open_ci = replication_nulls._control_cells({**row, "fraction_low": np.nan, "fraction_high": np.nan})
    assert open_ci[1] == "+0.25 (no finite CI: the control's own CI includes 0)"
    update = {**row, "ceiling": "update_ceiling_icl", "fraction_low": 0.1, "fraction_high": 0.4}
    assert replication_nulls._control_cells(update)[0] == "update ICL–ICL′ +0.200 (0.001)"
    assert replication_nulls._control_cells({**row, "ceiling": "", "ceiling_diff": np.nan}) == ["–", "–"]
    assert replication_nulls._control_cells(None) == ["–", "–"]


def test_the_suite_timing_prints_what_suite_json_records(scripts):
    """The time section's table (replication_tables.py --timing) is suite.json's numbers: a row
    per spec with its report and matmul reading, the specs' total, and "–" where an older
    suite.json lacks a field."""
    suite = {
        "specs": {
            "main": {
                "planned": 480,
                "computed": 480,
                "reused": 0,
                "seconds": 885.4,
                "report_seconds": 19.2,
                "matmul_gflops_before": 147,
            },
            "layers": {
                "planned": 480,
                "computed": 0,
                "reused": 0,
                "seconds": 6.6,
                "report_seconds": 6.1,
                "matmul_gflops_before": 171,
            },
            "old": {"planned": 240, "computed": 240, "reused": 0, "seconds": 1200.0},
        },
        "invocations": [
            {
                "suite": "paper",
                "specs": ["main", "layers", "old"],
                "seconds": 2100.0,
                "machine": "x86_64",
                "backend": "ray: 2 x 1 threads",
                "matmul_gflops": [147, 167],
                "finished": "2026-12-06 12:35:44",
            }
        ],
    }
    text = scripts.suite_timing(suite)
    assert "`run_paper.py`: 3 specs (main, layers, old) in 35.0 min (x86_64; ray: 2 x 1 threads; " in text
    assert "matmul 147 GFLOP/s before, 167 after; finished 2026-12-06 12:35:44)" in text
    assert "| main | 480 | 480 | 0 | 885 | 19 | 147 |" in text
    assert "| old | 240 | 240 | 0 | 1,200 | – | – |" in text
    assert "| **all 3** | | | | **2,092 (34.9 min)** | – | 147–171 |" in text
    del suite["specs"]["old"]
    assert "| **all 2** | | | | **892 (14.9 min)** | 25 | 147–171 |" in scripts.suite_timing(suite)
    assert scripts.suite_timing({}) == ""
