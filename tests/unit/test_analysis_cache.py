"""The on-disk cache of whole-cell tables (iclit.analysis.cache): read back equal to a fresh
computation, missed whenever what they depend on changes, carried along by ``--reuse``, and
never in the way (a broken entry is recomputed, an unwritable folder is skipped)."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from iclit.analysis import cache, cells, load_run
from iclit.cli import app
from iclit.experiments import parse_spec, run_experiment

SPEC = {
    "name": "cached",
    "model": "tiny-random-llama",
    "task": "sentiment",
    "k": 2,
    "resamples": 4,
    "queries_per_set": 4,
    "it_seeds": 2,
    "chunk_size": 2,
    "recipe": {"epochs": 2},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "run"
    run_experiment(parse_spec(SPEC), out)
    return out


@pytest.fixture(autouse=True)
def empty_cache(run_dir):
    import shutil

    shutil.rmtree(run_dir / cache.CACHE_DIR, ignore_errors=True)


def _tables(run_dir, **kw):
    run = load_run(run_dir)
    trials = run.trials[run.trials["states_file"].notna()]
    return cells.cell_tables(
        run_dir, trials, run.outputs, run.settings, margin=run.margin, n_perm=200, n_boot=200, **kw
    )


def _entries(run_dir):
    folder = run_dir / cache.CACHE_DIR
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


def _no_compute(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("computed, not read from the cache")

    monkeypatch.setattr(cells, "_one_cell", fail)


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        pd.testing.assert_frame_equal(
            a[name].reset_index(drop=True), b[name].reset_index(drop=True), check_dtype=False, obj=name
        )


def test_cached_tables_equal_a_fresh_computation(run_dir, monkeypatch):
    fresh = _tables(run_dir, cache=False)
    assert _entries(run_dir) == []  # cache=False writes nothing
    first = _tables(run_dir, cache=True)
    assert len(_entries(run_dir)) == 1  # one cell
    _no_compute(monkeypatch)
    again = _tables(run_dir, cache=True)
    for got in (first, again):
        _assert_same(fresh, got)
    assert len(fresh["tests"]) and len(fresh["seeds"]) and len(fresh["geometry"])


def test_a_change_in_what_the_tables_depend_on_misses(run_dir, monkeypatch):
    _tables(run_dir, cache=True)
    trials = load_run(run_dir).trials
    settings = load_run(run_dir).settings
    (cell,) = settings
    base = cache.entry_key(cell, trials["trial_key"].tolist(), settings[cell], {"margin": 0.02})
    assert base == cache.entry_key(cell, trials["trial_key"].tolist(), settings[cell], {"margin": 0.02})
    assert base != cache.entry_key(cell, trials["trial_key"].tolist()[1:], settings[cell], {"margin": 0.02})
    assert base != cache.entry_key(cell, trials["trial_key"].tolist(), settings[cell], {"margin": 0.03})
    assert base != cache.entry_key(cell, trials["trial_key"].tolist(), {**settings[cell], "k": 9}, {"margin": 0.02})
    monkeypatch.setattr(cache, "_code_digest", lambda: "another version of the analysis code")
    assert base != cache.entry_key(cell, trials["trial_key"].tolist(), settings[cell], {"margin": 0.02})


def test_off_by_environment(run_dir, monkeypatch):
    monkeypatch.setenv("ICLIT_ANALYSIS_CACHE", "0")
    assert not cache.enabled()
    _no_compute(monkeypatch)
    with pytest.raises(AssertionError, match="computed"):
        _tables(run_dir)  # cache=None follows the environment


def test_a_broken_entry_is_recomputed_and_an_unwritable_folder_skipped(run_dir, monkeypatch, tmp_path):
    fresh = _tables(run_dir, cache=False)
    _tables(run_dir, cache=True)
    (entry,) = _entries(run_dir)
    (run_dir / cache.CACHE_DIR / entry / "tests.parquet").write_bytes(b"not parquet")
    _assert_same(fresh, _tables(run_dir, cache=True))

    def no_folder(*a, **k):
        raise PermissionError("read-only file system")

    def no_parquet(self, *a, **k):
        raise TypeError("a column Parquet cannot hold")

    with monkeypatch.context() as m:
        m.setattr(pd.DataFrame, "to_parquet", no_parquet)
        cache.save(tmp_path, entry, fresh)  # nothing written, nothing raised
    assert cache.load(tmp_path, entry) is None and not any((tmp_path / cache.CACHE_DIR).iterdir())

    monkeypatch.setattr(cache.tempfile, "mkdtemp", no_folder)
    assert cache.load(tmp_path, entry) is None
    cache.save(tmp_path, entry, fresh)  # nothing written, nothing raised
    assert cache.load(tmp_path, entry) is None


def test_reused_trials_bring_their_cells_tables(run_dir, tmp_path, monkeypatch):
    _tables(run_dir, cache=True)
    spec = tmp_path / "same.yaml"
    spec.write_text(parse_spec(SPEC).to_yaml())
    out = tmp_path / "again"
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(out), "--reuse", str(run_dir), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert set(_entries(run_dir)) <= set(_entries(out))
    _no_compute(monkeypatch)
    assert len(_tables(out, cache=True)["tests"])
