"""Every spec of configs/paper validates (models, tasks, templates exist) and plans to its
documented number of trials; configs/paper/README.md lists each with its trial count."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from iclit.experiments import load_spec, make_plan

PAPER = Path(__file__).resolve().parents[2] / "configs" / "paper"
TRIALS = {
    "main.yaml": 30,
    "layers.yaml": 30,
    "cross_task.yaml": 60,
    "similarity.yaml": 90,
    "n_demos.yaml": 150,
    "wrong_labels.yaml": 150,
    "models.yaml": 60,
    "instruction.yaml": 60,
    "translation.yaml": 30,
    "lora_vs_full.yaml": 60,
    "dose.yaml": 540,
}


def test_the_list_is_complete():
    assert sorted(p.name for p in PAPER.glob("*.yaml")) == sorted(TRIALS)


@pytest.mark.parametrize("name", sorted(TRIALS))
def test_paper_spec_validates_and_plans(name):
    spec = load_spec(PAPER / name)
    assert spec.resamples == 30
    plan = make_plan(spec)
    assert plan.n_trials == TRIALS[name]
    assert len(set(plan.trial_keys())) == plan.n_trials


@pytest.mark.parametrize("name", sorted(TRIALS))
def test_readme_lists_the_spec_its_trials_and_command(name):
    readme = (PAPER / "README.md").read_text(encoding="utf-8")
    row = next((line for line in readme.splitlines() if line.startswith(f"| `{name}`")), None)
    assert row is not None, name
    assert re.search(rf"\|\s*{TRIALS[name]}\s*\|", row), row
    assert f"iclit run configs/paper/{name}" in readme


def test_layers_is_the_main_cell():
    main, layers = make_plan(load_spec(PAPER / "main.yaml")), make_plan(load_spec(PAPER / "layers.yaml"))
    assert main.trial_keys() == layers.trial_keys()
