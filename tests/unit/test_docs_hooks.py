"""The documentation site's generated parts (docs/hooks.py, docs/griffe_rst.py): `make docs`
builds the whole site in CI; these check the generators on their own, without mkdocs."""

from __future__ import annotations

import importlib.util
import sqlite3
from types import SimpleNamespace

import pytest
from exp_helpers import REPO


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_{name}", REPO / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _load("hooks")


def _page(uri: str):
    return SimpleNamespace(file=SimpleNamespace(src_uri=uri))


def test_cli_page_has_every_command():
    import typer

    from iclit.cli import app

    text = hooks.cli_markdown()
    names = list(typer.main.get_command(app).commands)
    assert len(names) >= 8
    for name in names:
        assert f"## `iclit {name}`" in text, name
    assert "--queries-per-set" in text


def test_store_page_has_every_table_and_column(tmp_path):
    from iclit.rundir.store import Store

    text = hooks.store_markdown()
    Store(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "results.sqlite")
    tables = [
        r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
    ]
    assert {"trials", "runs", "cells", "meta"} <= set(tables)
    for table in tables:
        assert f"### `{table}`" in text
        for row in conn.execute(f"PRAGMA table_info({table})"):
            assert f"| `{row[1]}` |" in text, (table, row[1])
    conn.close()


def test_an_undocumented_column_stops_the_build(monkeypatch):
    trimmed = {table: dict(cols) for table, cols in hooks.STORE_COLUMNS.items()}
    del trimmed["trials"]["states_row"]
    monkeypatch.setattr(hooks, "STORE_COLUMNS", trimmed)
    with pytest.raises(ValueError, match="trials.states_row has no entry"):
        hooks.store_markdown()


def test_markers_are_replaced_and_unknown_ones_refused():
    from iclit.analysis.stats import SUMMARY_COLUMNS

    text = hooks.on_page_markdown(
        "a | <!-- iclit:columns iclit.analysis.stats:SUMMARY_COLUMNS --> |\n", _page("reference/x.md"), None, None
    )
    assert all(f"`{c}`" in text for c in SUMMARY_COLUMNS) and "<!--" not in text
    spec_page = hooks.on_page_markdown("<!-- iclit:spec-keys -->\n", _page("reference/spec.md"), None, None)
    assert "`queries_per_set`" in spec_page
    with pytest.raises(ValueError, match="unknown generated part"):
        hooks.on_page_markdown("<!-- iclit:nothing -->\n", _page("index.md"), None, None)


def test_links_that_leave_docs_lose_the_link_only():
    md = "[`configs/`](../configs/README.md) [stats](statistics.md#units) [up](../index.md) ![fig](figures/a.png)"
    assert hooks.on_page_markdown(md, _page("replication.md"), None, None) == (
        "`configs/` [stats](statistics.md#units) up ![fig](figures/a.png)"
    )
    assert hooks.on_page_markdown(md, _page("how-to/x.md"), None, None) == md  # one ../ stays inside docs/ here
    assert hooks.on_page_markdown("[f](../../src/a.py)", _page("how-to/x.md"), None, None) == "f"


def test_performance_page_is_the_runs_file():
    from iclit.report.performance import performance_table

    assert hooks.performance_markdown() == performance_table(REPO / "benchmarks" / "results" / "runs.csv")


def test_docstring_rst_becomes_markdown():
    rst = _load("griffe_rst")
    text = "See :func:`~iclit.analysis.nulls.verdict` and :mod:`iclit.analysis.inference`, ``x``; a table::\n\n    code"
    assert rst.markdown_docstring(text) == ("See `verdict` and `iclit.analysis.inference`, `x`; a table:\n\n    code")
