"""The label-sensitivity diagnostic: relabelling, the engine function on the tiny model, its
summary (intervals and tests over sets that agree; the verdict), and ``iclit models --diagnose``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import iclit.models
from iclit.analysis.labels import label_sensitivity_summary
from iclit.cli import app
from iclit.engine.diagnose import LABEL_CONDITIONS, label_sensitivity, relabel
from iclit.tasks import Example, get_task


def test_relabel():
    demos = [Example("a", "x", "positive"), Example("b", "y", "negative")]
    labels = ("positive", "negative")
    rng = np.random.default_rng(0)
    assert relabel(demos, labels, "gold", rng) == tuple(demos)
    flipped = relabel(demos, labels, "flipped", rng)
    assert [d.output for d in flipped] == ["negative", "positive"]
    assert [d.meta["true_output"] for d in flipped] == ["positive", "negative"]
    three = relabel([Example("c", "z", "b")], ("a", "b", "c"), "flipped", rng)
    assert three[0].output == "c"
    drawn = [relabel(demos, labels, "random", np.random.default_rng(s))[0].output for s in range(40)]
    assert set(drawn) == set(labels)
    with pytest.raises(ValueError, match="unknown label condition"):
        relabel(demos, labels, "shuffled", rng)


def test_summary_verdicts_and_agreeing_intervals():
    rng = np.random.default_rng(1)
    gold = np.ones((16, 8))
    reads = label_sensitivity_summary(
        {"gold": gold, "flipped": np.zeros((16, 8)), "random": rng.integers(0, 2, (16, 8))}
    )
    assert reads["verdict"] == "reads labels" and reads["contrasts"]["gold-flipped"]["mean"] == 1.0
    same = rng.integers(0, 2, (16, 8)).astype(float)
    ignores = label_sensitivity_summary({"gold": same, "flipped": same.copy()}, zero_shot=same)
    assert ignores["verdict"] == "ignores labels" and "zero_shot" in ignores["accuracy"]
    noisy = label_sensitivity_summary({"gold": rng.integers(0, 2, (4, 2)), "flipped": rng.integers(0, 2, (4, 2))})
    assert noisy["verdict"] == "inconclusive"
    for seed in range(30):  # the 95% interval excludes 0 exactly when p < 0.05
        r = np.random.default_rng(seed)
        s = label_sensitivity_summary({"gold": r.random((10, 4)) + 0.2 * r.random(), "flipped": r.random((10, 4))})
        c = s["contrasts"]["gold-flipped"]
        assert (c["p"] < 0.05) == (c["ci_low"] > 0 or c["ci_high"] < 0)


def test_engine_on_the_tiny_model(tiny):
    task = get_task("sentiment")
    result = label_sensitivity(tiny, task, k=2, sets=2, queries_per_set=2, seed=0)
    assert set(result.correct) == set(LABEL_CONDITIONS)
    assert all(v.shape == (2, 2) for v in result.correct.values()) and result.zero_shot.shape == (2, 2)
    assert json.loads(json.dumps(result.to_dict()))["k"] == 2
    with pytest.raises(ValueError, match="classification"):
        label_sensitivity(tiny, get_task("translation-en-cs"), k=1, sets=1, queries_per_set=1)


def test_cli_diagnose(tiny, monkeypatch, tmp_path):
    monkeypatch.setattr(iclit.models, "load_model", lambda name, **kw: tiny)
    out = tmp_path / "diag.json"
    result = CliRunner().invoke(
        app,
        [
            "models",
            "--diagnose",
            "tiny-random-llama",
            "--k",
            "2",
            "--sets",
            "2",
            "--queries-per-set",
            "2",
            "--json",
            str(out),
        ],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    for word in ("gold", "flipped", "random", "zero-shot", "gold-flipped", "verdict:"):
        assert word in result.output
    saved = json.loads(out.read_text())
    assert saved["summary"]["sets"] == 2 and set(saved["correct"]) == set(LABEL_CONDITIONS)
    bad = CliRunner().invoke(app, ["models", "--diagnose", "x", "--prompt-format", "jinja"])
    assert bad.exit_code == 2 and "raw, chat" in bad.output
