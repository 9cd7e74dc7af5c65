"""Running specs locally: resume, kill -9 and resume, concurrent runs, one model load, the CLI."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from exp_helpers import (
    SMOKE,
    TINY_SPEC,
    assert_same_numbers,
    check_store,
    run_tiny_spec,
    start_run,
    stored_trials,
    write_spec,
)
from typer.testing import CliRunner

from iclit.experiments import load_spec, make_plan, parse_spec, run_experiment
from iclit.rundir import Store

N_TRIALS = 24  # TINY_SPEC: 4 cells x 6 resamples
LAYERS = 4  # tiny-random-llama: 3 layers + embeddings


@pytest.fixture()
def one_thread():
    """One torch thread (as the subprocess runs use): fast and steady on a shared 2-CPU machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The tiny spec run once, uninterrupted, in this process (one torch thread)."""
    out = tmp_path_factory.mktemp("reference")
    summary = run_tiny_spec(out)
    assert summary.computed == N_TRIALS and summary.chunks_run == 12
    return out


def test_run_stores_every_trial_once(reference: Path) -> None:
    from iclit.analysis import load_run

    assert check_store(reference) == (N_TRIALS, N_TRIALS * LAYERS * 3)
    frame = load_run(reference).frame
    with Store(reference) as store:
        outputs = store.outputs()
    assert len(frame) == N_TRIALS * LAYERS * 3
    assert set(frame["k"]) == {1, 2} and set(frame["wrong_labels"]) == {0.0, 1.0}
    assert set(frame["pair"]) == {"anchor_icl", "anchor_it", "icl_it"}
    assert (frame[frame["layer"] == 0]["cosine"] > 0.99).all()
    # wrong labels recorded per trial: k demonstrations, all wrong at wrong_labels 1
    by_cell = outputs.groupby(["k", "wrong_labels"])["n_wrong"].unique()
    assert by_cell[(2, 1.0)].tolist() == [2] and by_cell[(1, 1.0)].tolist() == [1] and by_cell[(2, 0.0)].tolist() == [0]
    assert {"prediction_icl", "score_it", "query", "gold", "it_final_loss"} <= set(outputs.columns)
    assert (reference / "spec.yaml").exists()
    assert parse_spec(yaml.safe_load((reference / "spec.yaml").read_text())) == parse_spec(TINY_SPEC)


def test_rerun_skips_finished_trials(reference: Path, tmp_path: Path, one_thread) -> None:
    spec = parse_spec(TINY_SPEC)
    out = tmp_path / "run"
    first = run_experiment(spec, out, max_chunks=5)
    assert (first.computed, first.chunks_run) == (10, 5)
    second = run_experiment(spec, out)
    assert (second.already_done, second.computed, second.chunks_run) == (10, 14, 7)
    third = run_experiment(spec, out)
    assert (third.already_done, third.computed, third.chunks_run) == (N_TRIALS, 0, 0)
    check_store(out)
    assert_same_numbers(out, reference)
    # a larger spec reuses what is stored: only the new resamples run
    bigger = run_experiment(spec.replace(resamples=8), out)
    assert (bigger.already_done, bigger.computed) == (N_TRIALS, 8)
    check_store(out)


def test_model_is_loaded_once_per_process(tmp_path: Path, monkeypatch, one_thread) -> None:
    import iclit.models
    from iclit.experiments import workers

    calls = []
    real = iclit.models.load_model

    def counting(name, **kw):
        calls.append(name)
        return real(name, **kw)

    monkeypatch.setattr(iclit.models, "load_model", counting)
    workers.clear_model_cache()
    summary = run_experiment(parse_spec(TINY_SPEC), tmp_path)
    assert summary.chunks_run == 12
    assert calls == ["tiny-random-llama"]
    workers.clear_model_cache()


def test_sigkill_and_resume_loses_and_duplicates_nothing(reference: Path, tmp_path: Path) -> None:
    """`iclit run` killed with SIGKILL twice mid-run, then resumed: the store ends with every
    trial once and the numbers of the uninterrupted run."""
    spec = write_spec(tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    kills = 0
    for target in (3, 12):  # kill once a few trials are stored, then again later on
        proc = start_run(spec, out)
        try:
            deadline = time.time() + 120
            while stored_trials(out) < target and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        n = stored_trials(out)
        assert n % 2 == 0  # whole chunks of 2 only
        check_store(out)
    assert kills >= 1, "the run finished before it could be killed"
    before = stored_trials(out)
    assert 0 < before < N_TRIALS
    proc = start_run(spec, out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert f"{before} already stored, {N_TRIALS - before} computed" in stdout
    assert check_store(out) == (N_TRIALS, N_TRIALS * LAYERS * 3)
    assert_same_numbers(out, reference)


def test_two_runs_into_one_directory(reference: Path, tmp_path: Path) -> None:
    """Started together: one writes the run; the other either finds it being written (exit 2,
    the holder named; see tests/unit/test_scaleout.py) or, started after it ended, finds it done."""
    spec = write_spec(tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    procs = [start_run(spec, out) for _ in range(2)]
    codes = []
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode in (0, 2), stderr
        assert proc.returncode == 0 or "being written by another iclit process" in stderr
        codes.append(proc.returncode)
    assert 0 in codes
    assert check_store(out) == (N_TRIALS, N_TRIALS * LAYERS * 3)
    assert_same_numbers(out, reference)
    with Store(out) as store:
        assert store.count()["runs"] == codes.count(0)


def test_cli_run_results_report(reference: Path, tmp_path: Path, one_thread) -> None:
    from iclit.cli import app

    cli = CliRunner()
    spec = write_spec(tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    r = cli.invoke(app, ["run", str(spec), "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert f"{N_TRIALS} trials planned, 0 already stored, {N_TRIALS} computed" in r.output
    r = cli.invoke(app, ["run", "--out", str(out), "--no-progress"])  # resume from the stored spec
    assert r.exit_code == 0, r.output
    assert f"{N_TRIALS} already stored, 0 computed" in r.output
    assert_same_numbers(out, reference)

    r = cli.invoke(app, ["results", str(out)])
    assert r.exit_code == 0 and "anchor_i" in r.output and f"30 of {N_TRIALS * LAYERS * 3} rows" in r.output
    r = cli.invoke(app, ["results", str(out), "--summary", "--format", "csv"])
    summary = pd.read_csv(pd.io.common.StringIO(r.output))
    assert len(summary) == 4 * 3 and set(summary["trials"]) == {6}
    csv, parquet = tmp_path / "tidy.csv", tmp_path / "tidy.parquet"
    assert cli.invoke(app, ["results", str(out), "-f", "csv", "-o", str(csv)]).exit_code == 0
    assert cli.invoke(app, ["results", str(out), "-f", "parquet", "-o", str(parquet)]).exit_code == 0
    a, b = pd.read_csv(csv), pd.read_parquet(parquet)
    assert len(a) == len(b) == N_TRIALS * LAYERS * 3
    assert {"k", "wrong_labels", "model", "seed", "resample", "layer", "pair", "cosine", "trial_key"} <= set(a.columns)
    r = cli.invoke(app, ["results", str(out), "--outputs", "-f", "csv"])
    per_trial = pd.read_csv(pd.io.common.StringIO(r.output))
    assert len(per_trial) == N_TRIALS and "prediction_it" in per_trial.columns

    r = cli.invoke(app, ["report", str(out)])
    assert r.exit_code == 0, r.output
    html = (out / "report.html").read_text()
    assert html.count("<img ") == 4 and "Factor: k" in html and "Factor: wrong_labels" in html
    r = cli.invoke(app, ["results", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "no results store" in r.output


def test_smoke_spec_runs_on_the_tiny_model(tmp_path: Path, one_thread) -> None:
    """configs/examples/smoke.yaml, on tiny-random-llama with short tuning: runs, resumes, reports."""
    from iclit.report import write_report

    spec = load_spec(SMOKE)
    tiny = spec.replace(model="tiny-random-llama", recipe=dataclasses.replace(spec.recipe, epochs=2))
    plan = make_plan(tiny)
    summary = run_experiment(tiny, tmp_path)
    assert summary.computed == plan.n_trials
    outputs = Store(tmp_path).outputs()
    most = outputs[outputs["similarity"] == "most"]["demo_similarity"]
    rand = outputs[(outputs["similarity"] == "random") & (outputs["k"] == 4)]["demo_similarity"]
    assert most.notna().all() and rand.notna().all()
    assert most.mean() > rand.mean()  # most-similar demonstrations are more similar to the query
    html = write_report(tmp_path).read_text()
    assert "Factor: similarity" in html and "demo–query similarity" in html
