"""Shared helpers for the experiment tests: tiny specs, subprocess runs, store comparisons."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "examples" / "smoke.yaml"

TINY_SPEC = {
    "name": "tiny",
    "model": "tiny-random-llama",
    "task": "sentiment",
    "k": 2,
    "resamples": 6,
    "chunk_size": 2,
    "recipe": {"epochs": 3},
    "factors": {"k": [1, 2], "wrong_labels": [0.0, 1.0]},
}
"""Two factors, 4 cells x 6 resamples = 24 trials in 12 chunks; about a second on the tiny model."""


def run_tiny_spec(out: Path, **kwargs):
    """Run TINY_SPEC into ``out`` in this process (tests/unit/conftest.py keeps one torch
    thread per module) and return the RunSummary."""
    from iclit.experiments import parse_spec, run_experiment

    return run_experiment(parse_spec(TINY_SPEC), out, **kwargs)


def write_spec(path: Path, **changes) -> Path:
    spec = {**TINY_SPEC, **changes}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def env_one_thread() -> dict[str, str]:
    """A subprocess environment: one torch thread (fast and steady on a shared 2-CPU machine)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def iclit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "iclit.cli", *args]


def start_run(spec: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        iclit_cmd("run", str(spec), "--out", str(out), "--no-progress"),
        env=env_one_thread(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stored_trials(out: Path) -> int:
    db = out / "results.sqlite"
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return int(con.execute("SELECT COUNT(*) FROM trials").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:  # schema not created yet
        return 0


def cosine_table(out: Path) -> pd.DataFrame:
    """Every stored trial's cosines (the three pairs and any baseline pair), computed from its
    stored states: trial_key, pair, layer, cosine, sorted by those keys."""
    from iclit.analysis import load_run

    frame = load_run(out, all_trials=True).frame
    cols = ["trial_key", "pair", "layer", "cosine"]
    if frame.empty:
        return pd.DataFrame(columns=cols)
    return frame[cols].sort_values(cols[:3], kind="stable", ignore_index=True)


def check_store(out: Path) -> tuple[int, int]:
    """integrity_check passes, no trial twice, every trial names a states file that exists,
    holds its key at its row, and no two trials share a (file, row); every trial has all its
    cosine rows (3 pairs x n_layers, computed from the states); returns (trials, cosine rows
    of the three pairs)."""
    from iclit.analysis.similarity import PAIRS
    from iclit.rundir.statefiles import read_chunk_states

    con = sqlite3.connect(out / "results.sqlite")
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        n_trials = con.execute("SELECT COUNT(*) FROM trials").fetchone()[0]
        assert n_trials == con.execute("SELECT COUNT(DISTINCT trial_key) FROM trials").fetchone()[0]
        refs = con.execute("SELECT trial_key, n_layers, states_file, states_row FROM trials").fetchall()
    finally:
        con.close()
    assert all(f is not None and r is not None for _, _, f, r in refs), "a trial without stored states"
    assert len({(f, r) for _, _, f, r in refs}) == len(refs), "two trials share one states row"
    keys_in: dict[str, list[str]] = {}
    for key, _n_layers, f, r in refs:
        assert (out / f).is_file(), f"trial {key}: states file {f} missing"
        if f not in keys_in:
            keys_in[f] = read_chunk_states(out / f, names=[])[0]
        assert keys_in[f][r] == key, f"trial {key}: row {r} of {f} belongs to {keys_in[f][r]}"
    table = cosine_table(out)
    three = table[table["pair"].isin(PAIRS)]
    assert len(three) == len(three.drop_duplicates(["trial_key", "pair", "layer"]))
    per_trial = three.groupby("trial_key").size()
    for key, n_layers, _, _ in refs:
        rows = int(per_trial.get(key, 0))
        assert rows == 3 * n_layers, f"trial {key}: {rows} cosine rows, expected {3 * n_layers}"
    assert np.isfinite(three["cosine"].to_numpy(dtype=float)).all()
    return n_trials, len(three)


def assert_same_numbers(a: Path, b: Path, atol: float = 1e-6) -> None:
    x, y = cosine_table(a), cosine_table(b)
    assert len(x) == len(y)
    assert list(x["trial_key"]) == list(y["trial_key"])
    assert list(x["pair"]) == list(y["pair"]) and list(x["layer"]) == list(y["layer"])
    np.testing.assert_allclose(x["cosine"].to_numpy(), y["cosine"].to_numpy(), rtol=0, atol=atol)


def dying_worker(marker: Path, first_key: str, times: int = 1):
    """A :class:`~iclit.experiments.workers.ChunkWorker` whose process kills itself (SIGKILL)
    after computing the chunk whose first trial key is ``first_key``, before returning it, the
    first ``times`` times (each death leaves a file in ``marker``). Made in a function, so Ray
    pickles the class by value: its workers need not import the tests."""
    from iclit.experiments.workers import ChunkWorker

    class DyingWorker(ChunkWorker):
        def run(self, job):
            output = super().run(job)
            if job.keys and job.keys[0] == first_key and len(list(marker.glob("died-*"))) < times:
                (marker / f"died-{os.getpid()}").touch()
                os.kill(os.getpid(), 9)
            return output

    return DyingWorker


def failing_once(marker: Path, shard: int):
    """A shard job (as :func:`iclit.experiments.slurm.run_shard`) that raises the first time it
    runs shard ``shard`` (leaving ``marker``), then runs the shard. Made in a function, so
    submitit pickles it by value: its job processes need not import the tests."""

    def job(spec_yaml: str, out: str, index: int, count: int):
        if index == shard and not marker.exists():
            marker.touch()
            raise RuntimeError(f"shard {index}: an injected failure")
        from iclit.experiments.slurm import run_shard

        return run_shard(spec_yaml, out, index, count)

    return job
