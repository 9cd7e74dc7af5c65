"""One pipeline: `iclit compare` is a one-cell spec run like any other, its states round-trip
through the run directory, a killed comparison resumes, and analysis needs no model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from exp_helpers import assert_same_numbers, check_store, cosine_table, env_one_thread, iclit_cmd, stored_trials
from typer.testing import CliRunner

from iclit.analysis import PAIRS, compute_metric, load_run, load_states
from iclit.analysis.frames import similarities
from iclit.cli import app
from iclit.report.exports import write_exports

MODEL = "tiny-random-llama"
COMPARE = [
    "compare",
    "--model",
    MODEL,
    "--task",
    "sentiment",
    "--k",
    "2",
    "--resamples",
    "4",
    "--epochs",
    "2",
    "--seed",
    "3",
    "--capture-steps",
    "1,2",
    "--baselines",
    "centered,shuffled,query_mean",
]
"""A small comparison with a dose curve and per-trial baselines: 4 trials, each read back from states."""
FILES = ("trials.jsonl", "summary.csv", "metrics.json")
VOLATILE = ("argv", "started", "seconds", "run_dir")
"""config.json keys that say when, where and how a run was started, not what it computed."""
WIDE = {"COLUMNS": "200"}


def _store_states_key() -> bool:
    """Whether the spec has the ``store_states`` key yet."""
    from iclit.experiments.spec import SpecError, parse_spec

    try:
        spec = parse_spec(
            {"name": "x", "model": MODEL, "task": "sentiment", "resamples": 2, "store_states": False},
            check_resources=False,
        )
    except SpecError:
        return False
    return getattr(spec, "store_states", True) is False


def _config(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    return {k: v for k, v in config.items() if k not in VOLATILE}


def _assert_same_exports(a: Path, b: Path) -> None:
    for name in FILES:
        assert (a / name).read_text(encoding="utf-8") == (b / name).read_text(encoding="utf-8"), name
    assert _config(a) == _config(b)
    for d in (a, b):
        assert (d / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture()
def cli() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> Path:
    """`iclit compare` (CLI, in this process) into a run directory."""
    out = tmp_path_factory.mktemp("compare") / "run"
    r = CliRunner().invoke(app, [*COMPARE, "--out", str(out)], env=WIDE)
    assert r.exit_code == 0, r.output
    return out


# --- (a) compare is a one-cell spec through `iclit run` ------------------------------------


def test_compare_equals_the_same_spec_through_iclit_run(compared: Path, tmp_path: Path, cli: CliRunner) -> None:
    shown = cli.invoke(app, [*COMPARE, "--out", str(tmp_path / "unused"), "--show-spec"])
    assert shown.exit_code == 0, shown.output
    assert not (tmp_path / "unused").exists()  # --show-spec runs nothing
    assert shown.output.strip() == (compared / "spec.yaml").read_text(encoding="utf-8").strip()
    spec = tmp_path / "compare.yaml"
    spec.write_text(shown.output, encoding="utf-8")

    out = tmp_path / "run"
    r = cli.invoke(app, ["run", str(spec), "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "4 trials planned, 0 already stored, 4 computed" in " ".join(r.output.split())
    assert not any((out / name).exists() for name in FILES)  # `iclit run` writes no exports itself
    assert write_exports(out) == out

    _assert_same_exports(compared, out)
    assert_same_numbers(compared, out, atol=0)
    a, b = _config(compared), _config(out)
    assert a["k"] == 2 and a["resamples"] == 4 and a["seed"] == 3 and a["recipe"]["capture_steps"] == [1, 2]
    assert a == b
    # and write_exports over the compare run directory rewrites exactly what compare wrote
    again = tmp_path / "again"
    write_exports(compared, again)
    _assert_same_exports(compared, again)


# --- (b) states round-trip: stored → load_states → the engine's cosines ----------------------


def test_stored_states_and_cosines_equal_the_engines(tmp_path: Path) -> None:
    from iclit.api import run_comparison
    from iclit.engine.evaluate import evaluate
    from iclit.experiments.plan import make_plan
    from iclit.experiments.spec import loads_spec
    from iclit.experiments.workers import make_job
    from iclit.models import load_model
    from iclit.tuning import TuningRecipe

    lm = load_model(MODEL)
    baselines = ["centered", "shuffled", "update", "noise_ceiling", "query_mean"]
    out = tmp_path / "run"
    result = run_comparison(
        lm,
        "sentiment",
        k=2,
        resamples=5,
        seed=1,
        recipe=TuningRecipe(epochs=2, capture_steps=(1, 2)),
        baselines=baselines,
        settings={"chunk_size": 2},
        out=out,
    )
    assert result.run_dir == out

    # the engine on the same draws, chunk by chunk as the runner drew them
    spec = loads_spec((out / "spec.yaml").read_text(encoding="utf-8"), check_resources=False)
    plan = make_plan(spec)
    assert len(plan.chunks) == 3  # 5 resamples in chunks of 2
    parts = []
    for chunk in plan.chunks:
        job = make_job(chunk, spec)
        ev = evaluate(
            lm,
            job.task,
            job.draws,
            recipe=job.recipe,
            seed=job.seed,
            batch_size=job.batch_size,
            max_new_tokens=job.max_new_tokens,
            arms=job.arms,
            demo_template=job.demo_template,
            fast=job.fast,
            baselines=job.baselines,
        )
        parts.append(ev.states)
    engine = {name: torch.cat([p[name] for p in parts]) for name in parts[0] if name != "reference_mean"}
    engine["reference_mean"] = parts[0]["reference_mean"]
    want = similarities(engine, baselines)
    assert {"icl_it_shuffled", "icl_it_centered", "icl_it_qmean", "it_it_seed", "icl_it_step1"} <= set(want)

    stored = load_states(out)
    assert len(stored) == 5 and len(set(stored.keys)) == 5
    assert set(stored) == set(engine) - {"reference_mean"}
    for name in stored:
        np.testing.assert_allclose(stored[name], engine[name].numpy(), rtol=0, atol=1e-6, err_msg=name)
    (reference,) = stored.reference.values()
    np.testing.assert_allclose(reference, engine["reference_mean"].numpy(), rtol=0, atol=1e-6)
    got = similarities({**stored.arrays, "reference_mean": reference}, baselines)
    assert set(got) == set(want)
    for pair in want:
        np.testing.assert_allclose(got[pair], want[pair], rtol=0, atol=1e-6, err_msg=pair)

    # the run directory's frame, and the comparison's trials, frame and states
    frame = load_run(out).frame
    for pair, values in want.items():
        f = frame[frame["pair"] == pair].sort_values(["resample", "layer"])
        np.testing.assert_allclose(f["cosine"].to_numpy(), values.reshape(-1), rtol=0, atol=1e-6, err_msg=pair)
        np.testing.assert_allclose([t[pair] for t in result.trials], values, rtol=0, atol=1e-6, err_msg=pair)
    for pair in PAIRS:
        f = result.frame[result.frame["pair"] == pair].sort_values(["resample", "layer"])
        np.testing.assert_allclose(f["cosine"].to_numpy(), want[pair].reshape(-1), rtol=0, atol=1e-6)
    for name in ("anchor", "icl", "it", "it_seed2", "icl:qmean", "it:step1"):
        torch.testing.assert_close(result.states[name], engine[name], atol=1e-6, rtol=0)


# --- (c) a killed comparison resumes, losing and duplicating nothing --------------------------


KILLED = [
    "compare",
    "--model",
    MODEL,
    "--task",
    "sentiment",
    "--k",
    "2",
    "--resamples",
    "12",
    "--epochs",
    "3",
    "--seed",
    "2",
    "--baselines",
    "shuffled",
    "--set",
    "chunk_size=1",
]
"""12 chunks of one trial each: a kill lands between chunks or inside one."""


def _compare_process(out: Path, logs: Path) -> tuple[subprocess.Popen, Path]:
    """`iclit compare` in a subprocess (one torch thread); output to files (a pipe nobody reads
    can fill up and stall it). Returns the process and its stderr file."""
    logs.mkdir(parents=True, exist_ok=True)
    n = len(list(logs.glob("*.err")))
    with open(logs / f"{n}.out", "w") as stdout, open(logs / f"{n}.err", "w") as stderr:
        proc = subprocess.Popen(
            iclit_cmd(*KILLED, "--out", str(out)), env=env_one_thread(), stdout=stdout, stderr=stderr, text=True
        )
    return proc, logs / f"{n}.err"


def test_sigkill_and_resume_of_compare(tmp_path: Path) -> None:
    out, logs = tmp_path / "run", tmp_path / "logs"
    kills = 0
    for target in (2, 6):  # kill once a few trials are stored, then again later on
        proc, _ = _compare_process(out, logs)
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
        if stored_trials(out):
            check_store(out)  # every stored trial names a states file that exists, at a row of its own
    assert kills >= 1, "the run finished before it could be killed"
    before = stored_trials(out)
    assert 0 < before < 12
    proc, errors = _compare_process(out, logs)
    assert proc.wait(300) == 0, errors.read_text()
    assert check_store(out) == (12, 12 * 4 * 3)

    states = load_states(out)
    with_keys = load_run(out).trials
    assert len(states.keys) == len(set(states.keys)) == 12  # each trial once
    assert sorted(states.keys) == sorted(with_keys["trial_key"])
    assert states["icl"].shape[0] == 12

    reference = tmp_path / "reference"  # the same command, uninterrupted
    proc, errors = _compare_process(reference, tmp_path / "ref-logs")
    assert proc.wait(300) == 0, errors.read_text()
    _assert_same_exports(out, reference)
    assert_same_numbers(out, reference, atol=0)
    np.testing.assert_array_equal(states["it"], load_states(reference)["it"])


# --- (d) analysis of an existing run directory loads no model -------------------------------


@pytest.fixture()
def no_model(monkeypatch):
    """Fail on any model load, and on any transformers model being built."""
    import transformers

    import iclit.experiments.runner as runner
    import iclit.experiments.workers as workers
    import iclit.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(iclit.models, "load_model", refuse)
    monkeypatch.setattr(workers, "loaded_model", refuse)
    monkeypatch.setattr(runner, "loaded_model", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", refuse)
    workers.clear_model_cache()
    yield workers
    assert not workers._MODELS, "a model was put in the model cache"


@pytest.mark.parametrize("metric", ["cka", "cosines", "layers", "scores"])
def test_results_metric_loads_no_model(metric: str, compared: Path, cli: CliRunner, no_model) -> None:
    r = cli.invoke(app, ["results", str(compared), "--metric", metric, "--format", "csv"])
    assert r.exit_code == 0, r.output
    got = pd.read_csv(pd.io.common.StringIO(r.stdout))
    want = compute_metric(compared, metric)
    assert len(got) == len(want) > 0
    assert list(got.columns) == list(want.columns)
    if metric == "cka":  # across the cell's 4 queries, per layer and pair
        assert set(got["pair"]) == {"cka_anchor_icl", "cka_anchor_it", "cka_icl_it"} and set(got["n"]) == {4}
        np.testing.assert_allclose(got["value"], want["value"], rtol=0, atol=1e-12)
    if metric == "cosines":
        assert len(got) == len(cosine_table(compared))
        np.testing.assert_allclose(got["cosine"], want["cosine"], rtol=0, atol=1e-12)
    table = cli.invoke(app, ["results", str(compared), "--metric", metric], env=WIDE)
    assert table.exit_code == 0 and "┏" in table.output, table.output


def test_results_list_metrics(cli: CliRunner) -> None:
    r = cli.invoke(app, ["results", "--list-metrics", "unused"], env=WIDE)
    assert r.exit_code == 0, r.output
    for name in ("cosines", "layers", "summary", "cka", "scores", "agreement", "it_loss", "effects"):
        assert name in r.output


# --- (e) store_states: false ------------------------------------------------------------------


@pytest.mark.skipif(not _store_states_key(), reason="the spec has no store_states key yet")
def test_compare_without_states(tmp_path: Path, cli: CliRunner) -> None:
    out = tmp_path / "run"
    r = cli.invoke(app, [*COMPARE, "--set", "store_states=false", "--out", str(out)], env=WIDE)
    assert r.exit_code == 0, r.output
    assert "no similarities" in r.output and "per-arm accuracy" in r.output
    assert not (out / "states").exists() or not any((out / "states").iterdir())
    run = load_run(out)
    assert run.trials["states_file"].isna().all() and len(run.trials) == 4
    assert run.frame.empty and run.notes and "store_states" in run.notes[0]
    # outputs and scores are all there
    assert len(run.outputs) == 4 and {"prediction_icl", "score_it", "it_final_loss", "dose"} <= set(run.outputs.columns)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"anchor", "icl", "it"} and metrics["last_layer"] == {}
    assert len((out / "trials.jsonl").read_text().splitlines()) == 4
    scores = cli.invoke(app, ["results", str(out), "--metric", "scores", "--format", "csv"])
    assert scores.exit_code == 0, scores.output
    got = pd.read_csv(pd.io.common.StringIO(scores.stdout))
    assert list(got["arm"]) == ["anchor", "icl", "it"] and (got["n"] == 4).all()
    per_trial = cli.invoke(app, ["results", str(out), "--outputs", "--format", "csv"])
    assert per_trial.exit_code == 0 and len(pd.read_csv(pd.io.common.StringIO(per_trial.stdout))) == 4
    assert "note:" not in per_trial.output  # the outputs need no states: nothing to note
    # similarities need the states: a clear error, no traceback
    for metric in ("cosines", "cka"):
        bad = cli.invoke(app, ["results", str(out), "--metric", metric], env=WIDE)
        assert bad.exit_code == 2, bad.output
        assert "store_states: false" in " ".join(bad.output.split()) and "Traceback" not in bad.output
    with pytest.raises(ValueError, match="store_states"):
        load_states(out)
