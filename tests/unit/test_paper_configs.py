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
    "n_demos.yaml": 120,
    "wrong_labels.yaml": 90,
    "models.yaml": 60,
    "instruction.yaml": 60,
    "translation.yaml": 30,
    "lora_vs_full.yaml": 20,
    "dose.yaml": 30,
    "causal.yaml": 300,  # 30 sets x 10 queries (the crossed design)
    "tasks_antonyms.yaml": 300,
    "tasks_translation_words.yaml": 300,
    "tasks_addition.yaml": 300,
    "tasks_reverse_words.yaml": 300,
}
RESAMPLES = {"lora_vs_full.yaml": 10, "dose.yaml": 10}  # the rest: the paper's 30


def test_the_list_is_complete():
    assert sorted(p.name for p in PAPER.glob("*.yaml")) == sorted(TRIALS)


@pytest.mark.parametrize("name", sorted(TRIALS))
def test_paper_spec_validates_and_plans(name):
    spec = load_spec(PAPER / name)
    assert spec.resamples == RESAMPLES.get(name, 30)
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


def _base_keys(name: str) -> set[str]:
    """Trial keys of the spec's base cell (every factor at its base value)."""
    plan = make_plan(load_spec(PAPER / name))
    base = plan.describe()["base"]
    cells = [c for c in plan.cells if all(c.labels[f] == base[f] for f in plan.factor_names)]
    assert len(cells) == 1, name
    return {k for ch in plan.chunks if ch.cell is cells[0] for k in ch.keys}


def test_one_factor_specs_share_their_base_cell():
    """The suite computes the base cell once (cross_task) and the others reuse it (--reuse):
    its trials must have the same keys in every one-factor spec."""
    shared = _base_keys("cross_task.yaml")
    assert len(shared) == 30
    for name in ("similarity.yaml", "n_demos.yaml", "wrong_labels.yaml", "instruction.yaml", "models.yaml"):
        assert _base_keys(name) == shared, name
    lora = _base_keys("lora_vs_full.yaml")  # its 10 resamples are the first chunk of the base cell
    assert len(lora) == 10 and lora <= shared


KEYS = {  # sha256 of each spec's trial keys, one a line in plan order: a changed key means stored trials are recomputed
    "cross_task.yaml": "196bceecc3a389a8",
    "dose.yaml": "fa6ecd18d4ce3250",
    "instruction.yaml": "fcf1a55817607bdd",
    "layers.yaml": "a229c43f7ae344a9",
    "lora_vs_full.yaml": "7f695cc38974fc38",
    "main.yaml": "a229c43f7ae344a9",
    "models.yaml": "859cf49960944815",
    "n_demos.yaml": "723d58968e23b0bd",
    "similarity.yaml": "9834963cf4412c85",
    "translation.yaml": "7742b07352f953db",
    "wrong_labels.yaml": "9d876ef58ef64063",
    "causal.yaml": "5e7b0b0eae257d76",
    "tasks_addition.yaml": "db9a2d9109fbcef4",
    "tasks_antonyms.yaml": "70c9f536deefb2ff",
    "tasks_reverse_words.yaml": "d59c8f8ce71b0989",
    "tasks_translation_words.yaml": "584a90ed63f0ac1f",
}


@pytest.mark.parametrize("name", sorted(TRIALS))
def test_trial_keys_stay_as_they_were(name):
    """The keys of runs already stored: unchanged by a new spec key or a new schema (bump
    KEY_VERSION and these digests only when what a trial computes changes)."""
    import hashlib

    keys = make_plan(load_spec(PAPER / name)).trial_keys()
    assert hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16] == KEYS[name]
