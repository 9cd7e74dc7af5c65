"""`iclit compare --model PATH` on a saved local checkpoint of every family of the grid: the
model folder is written with ``save_pretrained`` (weights + config + tokenizer), then the CLI
runs one small comparison on it end to end and `iclit results` reads the run back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_architectures import CONFIGS, build
from typer.testing import CliRunner

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "gpt_neox", "gpt2"]
assert set(FAMILIES) <= set(CONFIGS)


@pytest.fixture(autouse=True)
def _fresh_model_cache():
    from iclit.experiments import workers

    workers.clear_model_cache()
    yield
    workers.clear_model_cache()


@pytest.mark.parametrize("family", FAMILIES)
def test_compare_on_a_saved_local_checkpoint(family: str, tiny_tokenizer, tmp_path: Path) -> None:
    from iclit.cli import app

    folder = tmp_path / f"tiny-{family}"
    build(family, len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["compare", "--model", str(folder), "--k", "1", "--resamples", "2", "--epochs", "1", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == str(folder) and config["n_layers"] == 2
    assert len((out / "trials.jsonl").read_text().splitlines()) == 2
    shown = CliRunner().invoke(app, ["results", str(out), "--metric", "summary", "-f", "csv"])
    assert shown.exit_code == 0 and "icl_it" in shown.output
