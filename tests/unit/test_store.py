"""The results store: atomic chunks, no duplicates, safe under kills and concurrent writers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from store_records import record

from iclit.rundir.store import Store

# Subprocesses import the store alone (stdlib, pandas and iclit.rundir), not the engine (torch,
# transformers): iclit and iclit.rundir import lazily, so this takes a fraction of a second.
LOAD_STORE = textwrap.dedent(f"""
    import sys
    sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[2] / "src")!r}]
    from iclit.rundir.store import Store
""")


def check(store: Store, n: int, layers: int = 4) -> None:
    assert store.integrity() == "ok"
    counts = store.count()
    assert counts["trials"] == n
    dup = store.conn.execute("SELECT COUNT(*) - COUNT(DISTINCT trial_key) FROM trials").fetchone()[0]
    assert dup == 0
    # every trial names where its states are, each at a row of its own, with all its layers
    refs = store.conn.execute("SELECT states_file, states_row, n_layers FROM trials").fetchall()
    assert all(f is not None and r is not None for f, r, _ in refs)
    assert len({(f, r) for f, r, _ in refs}) == n
    assert all(nl == layers for _, _, nl in refs)


def test_round_trip_and_tidy_frames(tmp_path: Path) -> None:
    import numpy as np

    from iclit.analysis import load_run, load_states
    from iclit.rundir.statefiles import write_chunk_states

    rng = np.random.default_rng(0)
    states = {arm: rng.standard_normal((3, 4, 8)).astype(np.float32) for arm in ("anchor", "icl", "it")}
    keys = [record(i)["trial_key"] for i in range(3)]
    rel = write_chunk_states(tmp_path, keys, states)
    records = [record(i, states_file=rel) for i in range(3)]
    with Store(tmp_path) as store:
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        store.begin_run(
            "name: x\n",
            {"n_trials": 3, "cells": [{"key": "cell-a"}], "seeds": [0], "resamples": 3},
            [("cell-a", {"k": 2, "model": "m"}, {"k": 2})],
            backend="local",
            versions={"iclit": "0"},
        )
        assert store.write_trials(records) == 3
        assert store.write_trials(records) == 0  # already there: ignored
        check(store, 3)
        trials = store.trials()
        assert list(trials.columns[:2]) == ["k", "model"]
        assert list(trials["states_file"]) == [rel] * 3 and list(trials["states_row"]) == [0, 1, 2]
        out = store.outputs()
        assert len(out) == 3 and set(out["score_icl"]) == {0.0, 1.0} and out["prediction_icl"].iloc[0] == "neg"
        assert store.has_all(["trial-0000", "trial-0002"]) and not store.has_all(["trial-0000", "nope"])
        plan = store.latest_run()["plan"]
        assert len(store.trials(dict(plan, resamples=2))) == 2
    # the tidy frame: the cosines of exactly the stored states
    frame = load_run(tmp_path).frame
    assert len(frame) == 3 * 4 * 3
    assert list(frame.columns[:2]) == ["k", "model"]
    row = frame[(frame["resample"] == 1) & (frame["pair"] == "anchor_it") & (frame["layer"] == 2)].iloc[0]
    a, b = states["anchor"][1, 2].astype(np.float64), states["it"][1, 2].astype(np.float64)
    assert row.cosine == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), abs=1e-12)
    back = load_states(tmp_path)
    assert back.keys == keys
    for arm, want in states.items():
        np.testing.assert_array_equal(back[arm], want)


def test_a_failed_chunk_leaves_nothing(tmp_path: Path) -> None:
    def failing():
        yield record(0)
        yield record(1)
        raise RuntimeError("worker died")

    with Store(tmp_path) as store:
        with pytest.raises(RuntimeError):
            store.write_trials(failing())
        check(store, 0)
        store.write_trials([record(0), record(1)])
        check(store, 2)


def test_sigkill_inside_a_transaction_loses_only_that_chunk(tmp_path: Path) -> None:
    """A writer SIGKILLed in the middle of a chunk's transaction: the earlier chunk is whole,
    the killed one absent, the database intact; writing it again completes the store."""
    script = LOAD_STORE + textwrap.dedent(f"""
        import os, signal
        from store_records import record
        store = Store({str(tmp_path)!r})
        store.write_trials([record(0), record(1)])
        def dying():
            yield record(2)
            yield record(3)
            os.kill(os.getpid(), signal.SIGKILL)
        store.write_trials(dying())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    with Store(tmp_path) as store:
        check(store, 2)
        assert store.done_keys() == {"trial-0000", "trial-0001"}
        store.write_trials([record(2), record(3)])
        check(store, 4)


def _writer(path: str, start: int, reps: int) -> None:
    store = Store(path)
    for _ in range(reps):  # overlapping chunks of 5 trials, each written by every writer
        for chunk in range(0, 40, 5):
            store.write_trials(record(i) for i in range(chunk, chunk + 5))
    store.close()


WRITER = LOAD_STORE + textwrap.dedent("""
    from store_records import record
    store = Store(sys.argv[1])
    for rep in range(25):  # long enough for the writers to overlap
        for chunk in range(0, 40, 5):
            store.write_trials(record(i) for i in range(chunk, chunk + 5))
    store.close()
""")


def test_concurrent_threads_write_each_trial_once(tmp_path: Path) -> None:
    threads = [threading.Thread(target=_writer, args=(str(tmp_path), i, 2)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with Store(tmp_path) as store:
        check(store, 40)


def test_concurrent_processes_write_each_trial_once(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    for p in procs:
        _, errors = p.communicate(timeout=120)
        assert p.returncode == 0, errors
    with Store(tmp_path) as store:
        check(store, 40)


def test_open_store_needs_a_store(tmp_path: Path) -> None:
    from iclit.rundir.store import open_store

    with pytest.raises(FileNotFoundError, match="no results store"):
        open_store(tmp_path / "nothing")
