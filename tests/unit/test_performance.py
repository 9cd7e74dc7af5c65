"""The performance page's tables come from benchmarks/results/runs.csv (iclit.report.performance)."""

from __future__ import annotations

import pytest
from exp_helpers import REPO

from iclit.report.performance import COLUMNS, RunsFileError, performance_table, read_runs

RUNS = REPO / "benchmarks" / "results" / "runs.csv"
HEADER = ",".join(COLUMNS)


def _write(tmp_path, *lines: str):
    path = tmp_path / "runs.csv"
    path.write_text("\n".join([HEADER, *lines]) + "\n", encoding="utf-8")
    return path


def test_render_groups_orders_and_formats(tmp_path):
    path = _write(
        tmp_path,
        "2026-01-01,make run,make run,cpu A,,163,135,3.75,,first",
        '2026-01-03,make run,make run,cpu B,283–347,59.5,,,,"second, later"',
        "2026-01-02,bench x,python bench.py,cpu A,,3.0,,1.88,14.09,a|b",
    )
    assert performance_table(path) == "\n".join(
        [
            "### make run",
            "",
            "| date | command | machine | matmul GFLOP/s | wall | compute | peak RSS | note |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            "| 2026-01-03 | `make run` | cpu B | 283–347 | 59.5 s |  |  | second, later |",
            "| 2026-01-01 | `make run` | cpu A |  | 2 min 43 s | 2 min 15 s | 3.75 GiB | first |",
            "",
            "### bench x",
            "",
            "| date | command | machine | wall | peak RSS | ratio | note |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            "| 2026-01-02 | `python bench.py` | cpu A | 3 s | 1.88 GiB | 14.09× | a\\|b |",
            "",
        ]
    )


def test_hours(tmp_path):
    path = _write(tmp_path, "2026-01-01,suite,make paper,cpu,,4189,,,,")
    assert "| 1 h 9 min 49 s |" in performance_table(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("01/02/2026,make run,make run,cpu,,1,,,,", "is not YYYY-MM-DD"),
        ("2026-01-01,make run,make run,cpu,,fast,,,,", "wall_s 'fast' is not a number"),
        ("2026-01-01,make run,make run,cpu,about 300,1,,,,", "gflops 'about 300'"),
        ("2026-01-01,,make run,cpu,,1,,,,", "what is empty"),
        ("2026-01-01,make run,make run,cpu,,1,,,", "expected 10 fields"),
    ],
)
def test_bad_rows_name_their_line(tmp_path, line, message):
    path = _write(tmp_path, "2026-01-01,make run,make run,cpu,,1,,,,", line)
    with pytest.raises(RunsFileError, match=f"runs.csv:3: .*{message}"):
        read_runs(path)


def test_bad_header(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_text("date,what\n2026-01-01,x\n", encoding="utf-8")
    with pytest.raises(RunsFileError, match="the header must be"):
        read_runs(path)


def test_the_recorded_runs_render():
    rows = read_runs(RUNS)
    text = performance_table(RUNS)
    kinds = list(dict.fromkeys(r["what"] for r in rows))
    assert [line[4:] for line in text.splitlines() if line.startswith("### ")] == kinds
    table_rows = [line for line in text.splitlines() if line.startswith("| 20")]
    assert len(table_rows) == len(rows)
    # the timings the documentation quotes elsewhere are rows here
    assert {"make run", "make paper", "make causal-tasks", "test suite"} <= set(kinds)
