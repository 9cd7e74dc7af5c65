"""Reusing the trials of other run directories: whole chunks only, copied verbatim, resumable."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from exp_helpers import TINY_SPEC, assert_same_numbers, check_store, cosine_table, stored_trials, write_spec
from typer.testing import CliRunner

from iclit.experiments import make_plan, parse_spec, run_experiment
from iclit.experiments.runner import ReuseError
from iclit.rundir import Store

BASE = {**TINY_SPEC, "factors": {}}
"""The base cell of the tiny spec alone (k=2, no wrong labels): 6 trials in 3 chunks of 2."""
MORE = {**TINY_SPEC, "factors": {"k": [1, 2]}}
"""The base cell and k=1: 12 trials in 6 chunks; shares BASE's cell."""


def _spec(d: dict, **changes):
    return parse_spec({**d, **changes})


def _trial_rows(out: Path, keys=None) -> dict[str, tuple]:
    con = sqlite3.connect(out / "results.sqlite")
    try:
        rows = con.execute(
            "SELECT trial_key, cell_key, seed, resample, query_id, n_layers, demo_similarity, n_wrong, "
            "scores_json, outputs_json, seconds, written FROM trials"
        ).fetchall()
    finally:
        con.close()
    return {r[0]: r for r in rows if keys is None or r[0] in keys}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base")
    summary = run_experiment(_spec(BASE), out)
    assert (summary.computed, summary.chunks_run) == (6, 3)
    return out


def test_shared_cell_is_reused_verbatim(base_run: Path, tmp_path: Path) -> None:
    source_before = _trial_rows(base_run), cosine_table(base_run)
    out = tmp_path / "more"
    summary = run_experiment(_spec(MORE), out, reuse=[base_run])
    assert (summary.reused, summary.chunks_reused, summary.computed, summary.chunks_run) == (6, 3, 6, 3)
    assert summary.reused_from == {str(base_run): 6}
    assert f"6 computed in 3 chunks, 6 reused in 3 chunks from {base_run}" in str(summary)
    assert check_store(out) == (12, 12 * 4 * 3)

    # the shared cell's trials: the same keys, rows and cosines as in the source, exactly
    shared = set(_trial_rows(base_run))
    copied = _trial_rows(out, shared)
    assert copied == source_before[0]
    src_cos = source_before[1]
    dst_cos = cosine_table(out)
    dst_cos = dst_cos[dst_cos["trial_key"].isin(shared)].reset_index(drop=True)
    assert dst_cos.equals(src_cos)
    # the other cell was computed here, under this run
    plan = make_plan(_spec(MORE))
    with Store(out) as store:
        run = store.latest_run()
        assert (run["computed"], run["reused"]) == (6, 6)
        assert run["reused_from"] == {str(base_run.resolve()): 6}
        run_ids = dict(store.conn.execute("SELECT trial_key, run_id FROM trials").fetchall())
        cells = dict(store.conn.execute("SELECT cell_key, settings_json FROM cells").fetchall())
    assert set(run_ids.values()) == {run["id"]}
    assert set(cells) == {c.key for c in plan.cells}
    # the source is left as it was
    assert (_trial_rows(base_run), stored_trials(base_run)) == (source_before[0], 6)
    with Store(base_run, readonly=True) as store:
        assert store.count()["runs"] == 1

    # the same numbers as computing everything here
    fresh = tmp_path / "fresh"
    run_experiment(_spec(MORE), fresh)
    assert_same_numbers(out, fresh)

    # resume: nothing left to do, with or without the source
    again = run_experiment(_spec(MORE), out, reuse=[base_run])
    assert (again.already_done, again.reused, again.computed) == (12, 0, 0)
    assert run_experiment(_spec(MORE), out).already_done == 12
    assert check_store(out)[0] == 12


def test_reuse_then_resume_after_max_chunks(base_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "more"
    first = run_experiment(_spec(MORE), out, reuse=[base_run], max_chunks=1)  # reuse copies all; 1 chunk computed
    assert (first.reused, first.computed, first.chunks_run) == (6, 2, 1)
    rest = run_experiment(_spec(MORE), out)
    assert (rest.already_done, rest.reused, rest.computed) == (8, 0, 4)
    assert "reused" not in str(rest)
    assert check_store(out)[0] == 12


def test_only_whole_chunks_are_reused(tmp_path: Path) -> None:
    # another chunk size: other keys, nothing reused
    source = tmp_path / "c2"
    run_experiment(_spec(BASE), source)
    other = run_experiment(_spec(BASE, chunk_size=3), tmp_path / "c3", reuse=[source])
    assert (other.reused, other.computed) == (0, 6)
    assert "0 reused in 0 chunks" in str(other)

    # resamples 0-5 in chunks of 4: [0-3] [4-5]; a run of 8 resamples ([0-3] [4-7]) reuses only [0-3]
    short = tmp_path / "short"
    run_experiment(_spec(BASE, resamples=6, chunk_size=4), short)
    longer = run_experiment(_spec(BASE, resamples=8, chunk_size=4), tmp_path / "long", reuse=[short])
    assert (longer.reused, longer.chunks_reused, longer.computed, longer.chunks_run) == (4, 1, 4, 1)

    # a source holding all of [4-7], but from two different chunks (4-5 from a chunk of two): not reused
    run_experiment(_spec(BASE, resamples=8, chunk_size=4), short)  # stores 6-7 of [4-7]; 4-5 stay
    assert stored_trials(short) == 8
    mixed = run_experiment(_spec(BASE, resamples=8, chunk_size=4), tmp_path / "mixed", reuse=[short])
    assert (mixed.reused, mixed.computed) == (4, 4)

    # a shorter run's last chunk [4-5] is part of the source's chunk [4-7]: computed there with
    # 4 queries (other shuffled pairs and CKA), so not reused; [0-3] is
    part = run_experiment(_spec(BASE, resamples=6, chunk_size=4), tmp_path / "part", reuse=[tmp_path / "long"])
    assert (part.reused, part.chunks_reused, part.computed) == (4, 1, 2)

    # several sources: tried in order, each chunk from the one that holds it whole
    both = run_experiment(_spec(BASE, resamples=8, chunk_size=4), tmp_path / "both", reuse=[short, tmp_path / "long"])
    assert (both.reused, both.computed) == (8, 0)
    assert both.reused_from == {str(short): 4, str(tmp_path / "long"): 4}


def test_missing_source_is_an_error_and_writes_nothing(base_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    missing = tmp_path / "nowhere"
    with pytest.raises(ReuseError, match=f"reuse source {missing}: does not exist"):
        run_experiment(_spec(MORE), out, reuse=[base_run, missing])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReuseError, match=f"reuse source {empty}: holds no results.sqlite"):
        run_experiment(_spec(MORE), out, reuse=[empty])
    assert not out.exists()
    assert not (empty / "results.sqlite").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.sqlite").write_text("not a database")
    with pytest.raises(ReuseError, match=f"reuse source {bad}"):
        run_experiment(_spec(MORE), out, reuse=[bad])
    assert not out.exists()


def test_cli_reuse(base_run: Path, tmp_path: Path) -> None:
    from iclit.cli import app

    cli = CliRunner()
    spec = write_spec(tmp_path / "more.yaml", factors={"k": [1, 2]})
    out = tmp_path / "run"
    r = cli.invoke(app, ["run", str(spec), "--out", str(out), "--no-progress", "--reuse", str(tmp_path / "nowhere")])
    assert r.exit_code == 2
    assert f"reuse source {tmp_path / 'nowhere'}: does not exist" in " ".join(r.output.split())
    assert not out.exists()

    r = cli.invoke(
        app,
        [
            "run",
            str(spec),
            "--out",
            str(out),
            "--no-progress",
            "--reuse",
            str(base_run),
            "--reuse",
            str(tmp_path / "nowhere"),
        ],
    )
    assert r.exit_code == 2 and not out.exists()

    r = cli.invoke(app, ["run", str(spec), "--out", str(out), "--no-progress", "--reuse", str(base_run)])
    assert r.exit_code == 0, r.output
    assert f"6 computed in 3 chunks, 6 reused in 3 chunks from {base_run}" in " ".join(r.output.split())
    r = cli.invoke(app, ["run", "--out", str(out), "--no-progress", "--reuse", str(base_run)])  # resume
    assert r.exit_code == 0, r.output
    assert "12 already stored, 0 computed in 0 chunks, 0 reused" in " ".join(r.output.split())


def test_reuse_with_the_ray_backend(base_run: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="the Ray backend needs ray")
    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    out = tmp_path / "ray"
    # everything reusable: copied on the driver, no Ray session started
    whole = run_experiment(_spec(BASE), out, backend="ray", reuse=[base_run])
    assert (whole.reused, whole.computed) == (6, 0) and not ray.is_initialized()
    # the shared cell copied, the other one computed by one actor
    more = run_experiment(_spec(MORE), tmp_path / "ray2", backend="ray", workers=1, reuse=[base_run])
    assert (more.backend, more.reused, more.computed) == ("ray", 6, 6)
    assert check_store(tmp_path / "ray2")[0] == 12
    assert _trial_rows(tmp_path / "ray2", set(_trial_rows(base_run))) == _trial_rows(base_run)


def test_stores_from_before_reuse_open_and_read(base_run: Path, tmp_path: Path) -> None:
    """A store whose runs table predates the reuse columns: read-only as it is, upgraded on a writable open."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(base_run, old)
    con = sqlite3.connect(old / "results.sqlite")
    con.execute("ALTER TABLE runs DROP COLUMN reused")
    con.execute("ALTER TABLE runs DROP COLUMN reused_from_json")
    con.close()
    with Store(old, readonly=True) as store:
        run = store.latest_run()
        assert (run["computed"], run["reused"], run["reused_from"]) == (6, None, {})
        with pytest.raises(sqlite3.OperationalError):
            store.finish_run(run["id"], 0)
    summary = run_experiment(_spec(MORE), tmp_path / "new", reuse=[old])  # an old store as a source
    assert summary.reused == 6
    with Store(old) as store:
        assert store.latest_run()["reused"] is None
        assert {"reused", "reused_from_json"} <= {r[1] for r in store.conn.execute("PRAGMA table_info(runs)")}
