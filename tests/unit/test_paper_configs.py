"""Every spec of configs/paper validates (models, tasks, templates exist) and plans to its
documented number of trials; configs/paper/README.md lists each with its trial count."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from iclit.experiments import load_spec, make_plan

PAPER = Path(__file__).resolve().parents[2] / "configs" / "paper"
TRIALS = {  # (query, set) pairs: 40 sets x 6 queries x cells
    "main.yaml": 480,  # Gemma-3-270M and SmolLM2-135M-Instruct
    "label_control.yaml": 480,  # the flipped-label positive control, both models
    "layers.yaml": 480,
    "cross_task.yaml": 480,
    "similarity.yaml": 720,
    "n_demos.yaml": 960,
    "wrong_labels.yaml": 720,
    "models.yaml": 720,  # + the control model (gemma-3-270m@random)
    "instruction.yaml": 480,
    "translation.yaml": 240,
    "lora_vs_full.yaml": 480,
    "dose.yaml": 720,
    "ladder.yaml": 480,  # Qwen2.5-Coder 0.5B and 1.5B
    "causal.yaml": 240,
    "tasks_antonyms.yaml": 240,
    "tasks_translation_words.yaml": 240,
    "tasks_addition.yaml": 240,
    "tasks_reverse_words.yaml": 240,
}
BLOCKS = 20  # the floor of a powered cell: 20 query blocks of two sets (issue 26)


def test_the_list_is_complete():
    assert sorted(p.name for p in PAPER.glob("*.yaml")) == sorted(TRIALS)


@pytest.mark.parametrize("name", sorted(TRIALS))
def test_paper_spec_validates_and_plans(name):
    spec = load_spec(PAPER / name, check_resources=False)
    assert spec.resamples // spec.query_sharing >= BLOCKS  # every cell powered
    assert "icl_reordered" in spec.arms  # the ICL reorder ceiling in every cell
    plan = make_plan(spec)
    assert plan.n_trials == TRIALS[name]
    assert len(set(plan.trial_keys())) == plan.n_trials


@pytest.mark.parametrize("name", sorted(TRIALS))
def test_paper_spec_declares_its_margins(name):
    """Every paper spec declares its equivalence margins, each quantity on its own scale."""
    import yaml

    declared = yaml.safe_load((PAPER / name).read_text(encoding="utf-8")).get("equivalence_margin")
    assert isinstance(declared, dict) and {"raw", "centred", "update", "agreement", "kl"} <= set(declared)
    assert load_spec(PAPER / name, check_resources=False).margins == declared | {
        "ceiling_fraction": declared.get("ceiling_fraction", 0.25)
    }


@pytest.mark.parametrize("name", sorted(TRIALS))
def test_readme_lists_the_spec_its_trials_and_command(name):
    readme = (PAPER / "README.md").read_text(encoding="utf-8")
    row = next((line for line in readme.splitlines() if line.startswith(f"| `{name}`")), None)
    assert row is not None, name
    assert re.search(rf"\|\s*{TRIALS[name]}\s*\|", row), row
    assert f"iclit run configs/paper/{name}" in readme


def test_layers_is_the_main_cell():
    main, layers = (
        make_plan(load_spec(PAPER / "main.yaml", check_resources=False)),
        make_plan(load_spec(PAPER / "layers.yaml", check_resources=False)),
    )
    assert main.trial_keys() == layers.trial_keys()


def _base_keys(name: str) -> set[str]:
    """Trial keys of the spec's base cell (every factor at its base value)."""
    plan = make_plan(load_spec(PAPER / name, check_resources=False))
    base = plan.describe()["base"]
    cells = [c for c in plan.cells if all(c.labels[f] == base[f] for f in plan.factor_names)]
    assert len(cells) == 1, name
    return {k for ch in plan.chunks if ch.cell is cells[0] for k in ch.keys}


def test_one_factor_specs_share_their_base_cell():
    """The suite computes the base cell once (cross_task) and the others reuse it (--reuse):
    its trials must have the same keys in every one-factor spec."""
    shared = _base_keys("cross_task.yaml")
    assert len(shared) == 240
    for name in (
        "similarity.yaml",
        "n_demos.yaml",
        "wrong_labels.yaml",
        "instruction.yaml",
        "models.yaml",
        "lora_vs_full.yaml",
    ):
        assert _base_keys(name) == shared, name


KEYS = {  # sha256 of each spec's trial keys, one a line in plan order: a changed key means stored trials are recomputed
    "causal.yaml": "6d69a755175098a8",
    "cross_task.yaml": "8bc12ea4841613a2",
    "dose.yaml": "39751fbcdd839880",
    "instruction.yaml": "67ac35ebdd675625",
    "label_control.yaml": "a332bfc3f9bae29e",
    "ladder.yaml": "f3176a190e0be3e4",
    "layers.yaml": "028a96fe4e5ff5cd",
    "lora_vs_full.yaml": "031529b2d2d33e0e",
    "main.yaml": "028a96fe4e5ff5cd",
    "models.yaml": "84cb56b29589f692",
    "n_demos.yaml": "b524d601d84f8b1d",
    "similarity.yaml": "5160e69377093a96",
    "tasks_addition.yaml": "18ef25ea817402f7",
    "tasks_antonyms.yaml": "1f310fe9e72d2c63",
    "tasks_reverse_words.yaml": "b599654cfa9a073f",
    "tasks_translation_words.yaml": "a63227b28f99cfd7",
    "translation.yaml": "a3f40783e11db293",
    "wrong_labels.yaml": "6d099ea6a8263ebc",
}  # 2026-12-05: every cell 40 sets x 6 queries with the icl_reordered arm (issue 26)


@pytest.mark.parametrize("name", sorted(TRIALS))
def test_trial_keys_stay_as_they_were(name):
    """The keys of runs already stored: unchanged by a new spec key or a new schema (bump
    KEY_VERSION and these digests only when what a trial computes changes)."""
    import hashlib

    keys = make_plan(load_spec(PAPER / name, check_resources=False)).trial_keys()
    assert hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16] == KEYS[name]
