"""Inputs that must fail loudly: one clear message, exit ≠ 0, before any model work; and IT
recipes that do not fit their demonstrations are flagged, not reported like any other run."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from iclit.engine.evaluate import FIT_LOSS, ContextLengthError, check_context
from iclit.experiments.runner import RunDirError, check_run_dir
from iclit.models import prepare
from iclit.models.tiny import build_tiny_llama
from iclit.tasks import draw_resamples, get_task
from iclit.tuning import TuningDivergedError, TuningRecipe


@pytest.fixture()
def refuse_models(monkeypatch):
    """Any model load fails the test: these errors must come first."""
    import iclit.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the input is invalid")

    monkeypatch.setattr(iclit.models, "load_model", refuse)


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_out_naming_a_file_fails_before_loading(tmp_path: Path, refuse_models) -> None:
    from iclit.cli import app

    target = tmp_path / "taken"
    target.write_text("not a directory")
    result = CliRunner().invoke(
        app, ["compare", "--model", "tiny-random-llama", "--k", "1", "--resamples", "2", "--out", str(target)]
    )
    assert result.exit_code == 2
    assert "exists and is not a directory" in _flat(result.output) and str(target) in _flat(result.output)
    assert target.read_text() == "not a directory"


def test_out_that_cannot_be_created(tmp_path: Path, refuse_models) -> None:
    from iclit.cli import app

    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "run"
    result = CliRunner().invoke(
        app, ["compare", "--model", "tiny-random-llama", "--k", "1", "--resamples", "2", "--out", str(out)]
    )
    assert result.exit_code == 2
    assert "cannot be created" in _flat(result.output) and "is a file" in _flat(result.output)
    with pytest.raises(RunDirError, match="not a directory"):
        check_run_dir(blocker)


def test_icl_prompt_longer_than_the_context_window(tiny_tokenizer) -> None:
    model = build_tiny_llama(len(tiny_tokenizer))
    model.config.max_position_embeddings = 40
    lm = prepare(model, tiny_tokenizer, name="tiny-short", device="cpu")
    task = get_task("sentiment")
    draws = draw_resamples(task, 4, 2, 0)
    with pytest.raises(ContextLengthError, match=r"more than the 40 positions tiny-short was trained for"):
        check_context(lm, task, draws)
    check_context(lm, task, draw_resamples(task, 0, 2, 0)[:0])  # nothing to check: no error


def test_run_stops_on_a_long_prompt_before_any_chunk(tiny_tokenizer, tmp_path: Path) -> None:
    from iclit.experiments.compare import comparison_spec, spec_of
    from iclit.experiments.runner import run_experiment

    model = build_tiny_llama(len(tiny_tokenizer))
    model.config.max_position_embeddings = 130
    lm = prepare(model, tiny_tokenizer, name="tiny-short", device="cpu")
    spec = spec_of(
        comparison_spec("tiny-short", "sentiment", k=4, resamples=3, recipe=TuningRecipe(epochs=1)),
        check_resources=False,
    )
    with pytest.raises(ContextLengthError):
        run_experiment(spec, tmp_path / "run", models={"tiny-short": lm})
    assert not (tmp_path / "run").exists()  # nothing written: no spec, no store, no states
    ok = spec_of(
        comparison_spec("tiny-short", "sentiment", k=1, resamples=2, recipe=TuningRecipe(epochs=1)),
        check_resources=False,
    )
    run_experiment(ok, tmp_path / "run", models={"tiny-short": lm})
    before = (tmp_path / "run" / "spec.yaml").read_text()
    with pytest.raises(ContextLengthError):  # a failing spec into an existing run leaves it as it was
        run_experiment(spec, tmp_path / "run", models={"tiny-short": lm})
    from iclit.rundir.store import open_store

    assert (tmp_path / "run" / "spec.yaml").read_text() == before
    with open_store(tmp_path / "run", readonly=True) as store:
        assert store.count()["runs"] == 1 and store.latest_run()["finished"]


def test_unfitted_it_is_flagged_and_warned(tiny, tmp_path: Path) -> None:
    import iclit

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = iclit.run_comparison(
            tiny, "sentiment", k=2, resamples=2, recipe=TuningRecipe(epochs=1, lr=1e-6), out=tmp_path / "run"
        )
    losses = [t["it_final_loss"] for t in result.trials]
    assert all(loss >= FIT_LOSS for loss in losses)  # one tiny step at lr 1e-6 learns nothing
    assert [t["it_fitted"] for t in result.trials] == [False, False]
    messages = [str(w.message) for w in caught]
    assert any("did not fit its demonstrations in 2 of 2" in m for m in messages)
    from iclit.report import write_report

    page = write_report(tmp_path / "run").read_text(encoding="utf-8")
    assert "IT did not fit" in page and "⚠ 2" in page


def test_fitted_it_is_not_flagged(tiny, tmp_path: Path) -> None:
    import iclit

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = iclit.run_comparison(
            tiny,
            "sentiment",
            k=2,
            resamples=2,  # full fine-tuning fits the tiny model
            recipe=TuningRecipe(method="full", epochs=30, lr=1e-2),
        )
    assert all(t["it_final_loss"] < FIT_LOSS for t in result.trials)
    assert [t["it_fitted"] for t in result.trials] == [True, True]
    assert not any("did not fit" in str(w.message) for w in caught)


def test_non_finite_loss_stops_the_trial(tiny, tmp_path: Path) -> None:
    import torch

    import iclit

    with torch.no_grad():  # a model whose answer loss is NaN from the first step on
        tiny.model.get_input_embeddings().weight[:] = float("nan")
    with pytest.raises(TuningDivergedError, match=r"the IT answer loss became nan at optimiser step 1"):
        iclit.run_comparison(tiny, "sentiment", k=2, resamples=2, recipe=TuningRecipe(epochs=3), out=tmp_path / "run")
    assert not list((tmp_path / "run").glob("states/*.safetensors"))


def test_lora_targets_are_checked_against_the_model_before_any_chunk(tiny, tmp_path: Path, monkeypatch) -> None:
    import iclit
    from iclit.experiments import runner

    ran = []
    monkeypatch.setattr(runner, "execute", lambda *a, **k: ran.append(1))
    with pytest.raises(ValueError, match=r"LoRA targets \['q_prj'\].*'q_prj' \(matches no module\).*linear layers"):
        iclit.run_comparison(
            tiny, "sentiment", k=1, resamples=2, recipe=TuningRecipe(epochs=1, targets=("q_prj",)), out=tmp_path / "run"
        )
    assert ran == []


def test_cli_targets_option(tmp_path: Path) -> None:
    from iclit.cli import app

    result = CliRunner().invoke(
        app,
        [
            "compare",
            "--model",
            "tiny-random-llama",
            "--k",
            "1",
            "--resamples",
            "2",
            "--epochs",
            "1",
            "--targets",
            "q_proj,k_proj,v_proj",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 0, result.output
    import json

    trials = [json.loads(line) for line in (tmp_path / "r" / "trials.jsonl").read_text().splitlines()]
    assert trials[0]["it_targets"] == ["q_proj", "k_proj", "v_proj"]
    bad = CliRunner().invoke(
        app,
        [
            "compare",
            "--model",
            "tiny-random-llama",
            "--k",
            "1",
            "--resamples",
            "2",
            "--targets",
            "nope",
            "--out",
            str(tmp_path / "r2"),
        ],
    )
    assert bad.exit_code == 2 and "matches no module" in _flat(bad.output)


def test_a_spec_that_is_not_text(tmp_path: Path, refuse_models) -> None:
    from iclit.cli import app

    spec = tmp_path / "picture.yaml"
    spec.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(out)])
    assert result.exit_code == 2
    assert "not a text file" in _flat(result.output) and str(spec) in _flat(result.output)
    assert "Traceback" not in result.output and not out.exists()


def test_a_long_prompt_fails_before_the_weights_load(tiny_tokenizer, tmp_path: Path, monkeypatch) -> None:
    import transformers

    from iclit.cli import app

    model = build_tiny_llama(len(tiny_tokenizer))
    model.config.max_position_embeddings = 100
    folder = tmp_path / "short-model"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded although the prompts do not fit")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    result = CliRunner().invoke(
        app, ["compare", "--model", str(folder), "--k", "4", "--resamples", "2", "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 2, result.output
    assert "more than the 100 positions" in _flat(result.output)
    assert not (tmp_path / "run").exists()
