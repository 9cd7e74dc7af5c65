"""Scale-out without a cluster: shards and their merge, the run-directory lock, the plan's
cost, the Ray actors' resource request, and the run directory's errors."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from exp_helpers import (
    TINY_SPEC,
    assert_same_numbers,
    check_store,
    env_one_thread,
    iclit_cmd,
    run_tiny_spec,
    write_spec,
)
from typer.testing import CliRunner

from iclit.experiments import make_plan, parse_spec, raypool, run_experiment
from iclit.experiments.cost import chunk_cost, describe_cost, plan_cost
from iclit.experiments.lock import LOCK_NAME, RunDirError, RunLock, RunLocked, lock_holder
from iclit.experiments.raypool import (
    RayOptions,
    actor_options,
    actors_per_gpu_for,
    allocator_preload,
    ray_options_of,
)
from iclit.experiments.shards import ShardError, assign_shards, merge_shards, parse_shard, shard_chunks, shard_dir
from iclit.rundir import Store
from iclit.rundir.statefiles import read_chunk_states

N_TRIALS = 24
VARIED = {**TINY_SPEC, "factors": {"k": [1, 2, 4], "wrong_labels": [0.0, 1.0]}, "resamples": 7, "seeds": [0, 1]}
"""Chunks of different costs (k, a short last chunk): 6 cells x 2 seeds x 4 chunks."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-process")
    run_tiny_spec(out)
    return out


def _rows(out: Path) -> pd.DataFrame:
    """Every trial row as stored, less where and when it was written."""
    con = sqlite3.connect(out / "results.sqlite")
    try:
        df = pd.read_sql_query("SELECT * FROM trials ORDER BY trial_key", con)
    finally:
        con.close()
    return df.drop(columns=["run_id", "written", "states_file", "states_row", "seconds"])


def _states(out: Path) -> dict[str, dict[str, np.ndarray]]:
    con = sqlite3.connect(out / "results.sqlite")
    try:
        refs = con.execute("SELECT trial_key, states_file, states_row FROM trials").fetchall()
    finally:
        con.close()
    files = {f: read_chunk_states(out / f)[1] for f in {f for _, f, _ in refs}}
    return {k: {name: a[r] for name, a in files[f].items() if name != "reference_mean"} for k, f, r in refs}


# --- shards -----------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 64])
def test_every_chunk_in_exactly_one_shard_balanced_and_deterministic(count: int) -> None:
    plan = make_plan(parse_spec(VARIED))
    owner = assign_shards(plan.chunks, count)
    assert owner == assign_shards(make_plan(parse_spec(VARIED)).chunks, count)  # same on every job
    assert owner == assign_shards(list(reversed(plan.chunks)), count)[::-1]  # the plan's order plays no part
    parts = [shard_chunks(plan, i, count) for i in range(count)]
    keys = [c.keys for part in parts for c in part]
    assert sorted(keys) == sorted(c.keys for c in plan.chunks) and len(set(keys)) == len(plan.chunks)
    loads = [sum(chunk_cost(c) for c in part) for part in parts]
    assert max(loads) - min(loads) <= max(chunk_cost(c) for c in plan.chunks)
    assert len({chunk_cost(c) for c in plan.chunks}) > 1  # the costs do differ


def test_parse_shard() -> None:
    assert parse_shard("3/32") == (3, 32) and parse_shard(" 0 / 1 ") == (0, 1)
    for bad in ("32/32", "1", "a/b", "-1/4", "1/0"):
        with pytest.raises(ShardError, match="--shard"):
            parse_shard(bad)


def test_four_shards_merged_equal_the_one_process_run(reference: Path, tmp_path: Path) -> None:
    spec = parse_spec(TINY_SPEC)
    out = tmp_path / "run"
    for i in (2, 0, 3, 1):  # any order, each into its own directory
        summary = run_experiment(spec, out, shard=(i, 4))
        assert summary.out == shard_dir(out, i, 4) and summary.computed == summary.planned
    assert sum(Store(shard_dir(out, i, 4)).count()["trials"] for i in range(4)) == N_TRIALS
    assert not (out / "results.sqlite").exists()
    cli = CliRunner()
    from iclit.cli import app

    r = cli.invoke(app, ["merge", str(out)])
    assert r.exit_code == 0, r.output
    assert f"merged {N_TRIALS} new trials from 4 shards" in r.output
    pd.testing.assert_frame_equal(_rows(out), _rows(reference))  # row for row
    mine, theirs = _states(out), _states(reference)
    assert mine.keys() == theirs.keys()
    for key in mine:  # state for state, bit for bit
        assert mine[key].keys() == theirs[key].keys()
        for name in mine[key]:
            np.testing.assert_array_equal(mine[key][name], theirs[key][name])
    check_store(out)
    runs = Store(out).count()["runs"]
    again = merge_shards(out)  # idempotent: nothing new, nothing written
    assert again.merged == 0 and Store(out).count() == {"trials": N_TRIALS, "cells": 4, "runs": runs}
    rerun = run_experiment(spec, out, shard=(1, 4))  # a shard rerun after its merge computes nothing
    assert rerun.computed == 0


def test_results_fold_unmerged_shards_in(reference: Path, tmp_path: Path) -> None:
    spec = parse_spec(TINY_SPEC)
    out = tmp_path / "run"
    from iclit.cli import app

    r = CliRunner().invoke(
        app, ["run", str(write_spec(tmp_path / "tiny.yaml")), "--out", str(out), "--shard", "0/2", "--no-progress"]
    )
    assert r.exit_code == 0 and "shards/0-of-2: 12 trials planned" in " ".join(r.output.split()), r.output
    run_experiment(spec, out, shard=(1, 2))

    r = CliRunner().invoke(app, ["results", str(out), "--outputs", "-f", "csv"])
    assert r.exit_code == 0, r.output
    assert f"merged {N_TRIALS} new trials from 2 shards" in r.output
    assert_same_numbers(out, reference)


def test_merge_refuses_shards_of_another_spec_or_code(tmp_path: Path) -> None:
    from iclit.cli import app

    out = tmp_path / "run"
    run_experiment(parse_spec(TINY_SPEC), out, shard=(0, 4), max_chunks=1)
    run_experiment(parse_spec({**TINY_SPEC, "resamples": 4}), out, shard=(1, 4), max_chunks=1)
    r = CliRunner().invoke(app, ["merge", str(out)])
    assert r.exit_code == 2 and "computed from another spec" in r.output and "1-of-4" in r.output
    assert "Traceback" not in r.output and not (out / "results.sqlite").exists()  # nothing written

    other = tmp_path / "other"
    run_experiment(parse_spec(TINY_SPEC), other, shard=(0, 2), max_chunks=1)
    run_experiment(parse_spec(TINY_SPEC), other, shard=(1, 2), max_chunks=1)
    con = sqlite3.connect(shard_dir(other, 1, 2) / "results.sqlite")
    with con:
        versions = json.loads(con.execute("SELECT versions_json FROM runs").fetchone()[0])
        con.execute("UPDATE runs SET versions_json = ?", (json.dumps({**versions, "torch": "0.0.1"}),))
    con.close()
    r = CliRunner().invoke(app, ["merge", str(other)])
    assert r.exit_code == 2 and "other code versions" in r.output and "torch 0.0.1" in r.output
    assert not (other / "results.sqlite").exists()
    r = CliRunner().invoke(app, ["merge", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "no shards to merge" in " ".join(r.output.split())  # the console wraps long paths


# --- the lock ---------------------------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_holder(reference: Path, tmp_path: Path) -> None:
    """Two real processes on one --out: while one holds the run directory, `iclit run` is
    refused before any work (exit 2, the holder's host and pid named); once the holder is
    killed (SIGKILL: its lock stays behind, stale), a run takes the lock over. (A killed
    `iclit run` resumed by another: tests/unit/test_runner.py.)"""
    spec = write_spec(tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    hold = (
        "import sys, time\nfrom iclit.experiments.lock import RunLock\nRunLock.acquire(sys.argv[1])\n"
        "print('held', flush=True)\ntime.sleep(300)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(out)], env=env_one_thread(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run(
            iclit_cmd("run", str(spec), "--out", str(out), "--no-progress"),
            env=env_one_thread(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr
        assert f"pid {holder.pid}" in second.stderr and socket.gethostname() in second.stderr
        assert "being written by another iclit process" in second.stderr and "Traceback" not in second.stderr
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # refused before any work
    finally:
        holder.kill()
        holder.wait(30)
    assert lock_holder(out)["pid"] == holder.pid  # killed: its lock is left behind, stale
    run_tiny_spec(out)  # taken over
    assert check_store(out)[0] == N_TRIALS and not (out / LOCK_NAME).exists()
    assert_same_numbers(out, reference)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_stale_lock_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "started": "then"}))
    summary = run_experiment(parse_spec(TINY_SPEC), out, max_chunks=1)
    assert summary.computed == 2 and not (out / LOCK_NAME).exists()


def test_lock_of_a_live_process_or_another_host_is_kept(tmp_path: Path) -> None:
    with RunLock.acquire(tmp_path / "a" / "b") as held:
        assert lock_holder(tmp_path / "a" / "b")["pid"] == os.getpid()
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            RunLock.acquire(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()  # the directories it created, left empty, are removed
    elsewhere = tmp_path / "c"
    elsewhere.mkdir()
    (elsewhere / LOCK_NAME).write_text(json.dumps({"host": "node-7", "pid": _dead_pid(), "started": "then"}))
    with pytest.raises(RunLocked, match=f"host node-7.*remove {elsewhere / LOCK_NAME}"):
        RunLock.acquire(elsewhere)
    assert held.path.name == LOCK_NAME


def test_unusable_out_is_one_clear_error(tmp_path: Path) -> None:
    from iclit.cli import app

    spec = write_spec(tmp_path / "tiny.yaml")
    for out, says in (("/proc/iclit-run", "/proc/iclit-run: cannot be created"), (str(spec / "run"), "is a file")):
        r = CliRunner().invoke(app, ["run", str(spec), "--out", out, "--no-progress"])
        text = " ".join(r.output.split())
        assert r.exit_code == 2 and says in text and "Traceback" not in text, r.output
    with pytest.raises(RunDirError, match="cannot be created"):
        RunLock.acquire(Path("/proc/iclit-run/x"))


# --- the cost ---------------------------------------------------------------------------------


def test_plan_cost_from_shapes_and_stored_timings(reference: Path) -> None:
    plan = make_plan(parse_spec(TINY_SPEC))
    new = plan_cost(plan, None, shapes={"tiny-random-llama": (4, 64)})
    assert (new.cells, new.chunks, new.trials, new.todo, new.adapters) == (4, 12, N_TRIALS, N_TRIALS, N_TRIALS)
    assert new.state_bytes == 4 * 64 * 3 * N_TRIALS * 4  # layers × hidden × arms × trials × 4 bytes
    assert new.seconds is None and "--calibrate" in new.timing_source
    stored = plan_cost(plan, reference)  # shapes and timings from the run's own store
    assert stored.state_bytes == new.state_bytes and stored.todo == 0
    more = make_plan(parse_spec({**TINY_SPEC, "seeds": [0, 1]}))
    resumed = plan_cost(more, reference)
    assert resumed.todo == N_TRIALS and resumed.seconds is not None and resumed.seconds > 0
    assert "chunks stored in" in resumed.timing_source
    text = "\n".join(describe_cost(resumed, more.spec))
    assert "estimated time" in text and "states on disk: 144.0 KiB" in text


def test_check_states_the_cost_of_a_large_grid(tmp_path: Path) -> None:
    from iclit.cli import app

    spec = write_spec(
        tmp_path / "big.yaml",
        resamples=4,
        chunk_size=4,
        factors={"k": list(range(1, 41)), "wrong_labels": [i / 25 for i in range(26)]},
    )
    r = CliRunner().invoke(app, ["run", str(spec), "--out", str(tmp_path / "run"), "--check"])
    assert r.exit_code == 0, r.output
    assert "1040 cells" in r.output and "4160 IT adapters to train" in r.output and "estimated time" in r.output
    assert not (tmp_path / "run").exists()
    small = write_spec(tmp_path / "tiny.yaml")
    r = CliRunner().invoke(app, ["run", str(small), "--out", str(tmp_path / "run"), "--check", "--calibrate"])
    assert r.exit_code == 0, r.output
    assert "from a calibration" in r.output and "states on disk: 72.0 KiB" in r.output
    assert not (tmp_path / "run").exists()


# --- Ray's resource request (no Ray needed) ----------------------------------------------------


def test_actor_options() -> None:
    assert actor_options(gpu=False) == {"num_cpus": 1, "num_gpus": 0}
    assert actor_options(gpu=False, threads=4) == {"num_cpus": 4, "num_gpus": 0}
    assert actor_options(gpu=True) == {"num_cpus": 1, "num_gpus": 1.0}
    assert actor_options(gpu=True, actors_per_gpu=4, threads=2) == {"num_cpus": 2, "num_gpus": 0.25}
    assert actor_options(gpu=True, actors_per_gpu=3)["num_gpus"] * 3 <= 1.0
    with pytest.raises(ValueError, match="actors_per_gpu"):
        actor_options(gpu=True, actors_per_gpu=0)
    gib = 2**30
    assert actors_per_gpu_for(80 * gib, 1 * gib, 8 * gib) == 8  # 72 GiB usable / 9 GiB an actor
    assert actors_per_gpu_for(16 * gib, 30 * gib, 8 * gib) == 1


def test_ray_options_from_the_spec_and_flags() -> None:
    spec = parse_spec({**TINY_SPEC, "cluster": {"actors_per_gpu": 4, "worker_threads": 2, "max_retries": 5}})
    assert ray_options_of(spec) == RayOptions(None, 4, 2, 5)
    assert ray_options_of(spec, actors_per_gpu=2, threads=1, max_retries=0) == RayOptions(None, 2, 1, 0)
    assert ray_options_of(parse_spec(TINY_SPEC)) == RayOptions(None, None, 1, 2)
    assert "cluster" not in parse_spec(TINY_SPEC).to_yaml()  # specs without the section keep their text


def test_the_actors_allocator(monkeypatch) -> None:
    lib = "libtcmalloc_minimal.so.4"
    assert actor_options(gpu=False, preload=lib)["runtime_env"] == {"env_vars": {"LD_PRELOAD": lib}}
    assert "runtime_env" not in actor_options(gpu=False, preload=None)
    assert allocator_preload("system") is None
    with pytest.raises(ValueError, match="one of auto, tcmalloc, system, not 'jemalloc'"):
        allocator_preload("jemalloc")
    with pytest.raises(ValueError, match="jemalloc"):  # a flag's typo stops the run before it starts
        ray_options_of(parse_spec(TINY_SPEC), allocator="jemalloc")
    assert ray_options_of(parse_spec(TINY_SPEC), allocator="system").allocator == "system"
    monkeypatch.setattr(raypool.sys, "platform", "linux")
    monkeypatch.setattr(raypool.ctypes.util, "find_library", lambda name: lib if name == "tcmalloc_minimal" else None)
    assert allocator_preload("auto") == allocator_preload("tcmalloc") == lib
    monkeypatch.setattr(raypool.ctypes.util, "find_library", lambda name: None)  # a machine without it
    assert allocator_preload("auto") is None
    with pytest.raises(ValueError, match="apt install libtcmalloc-minimal4"):
        allocator_preload("tcmalloc")
    monkeypatch.setattr(raypool.sys, "platform", "darwin")
    with pytest.raises(ValueError, match="needs Linux"):
        allocator_preload("tcmalloc")


def test_cost_counts_the_arms_the_engine_runs() -> None:
    from iclit.engine.evaluate import run_arms
    from iclit.experiments.cost import arms_run

    for arms in (
        ("anchor", "icl", "it"),
        ("anchor", "icl", "it", "it_seed2"),
        ("anchor", "icl", "it", "icl_reordered"),
    ):
        for baselines in ((), ("noise_ceiling",), ("noise_ceiling", "centered")):
            for seeds in (1, 2, 3):
                assert arms_run(arms, baselines, seeds) == run_arms(arms, baselines, seeds)


def test_a_plain_run_takes_the_shards_trials(tmp_path: Path) -> None:
    """`iclit run` on a run directory whose shards hold trials merges them first: not recomputed."""
    spec = parse_spec(TINY_SPEC)
    out = tmp_path / "run"
    run_experiment(spec, out, shard=(0, 3))
    summary = run_experiment(spec, out)
    assert summary.already_done == Store(shard_dir(out, 0, 3)).count()["trials"] > 0
    assert summary.computed == N_TRIALS - summary.already_done
    check_store(out)
