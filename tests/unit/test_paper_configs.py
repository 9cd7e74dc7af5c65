"""Every spec of configs/paper validates (models, tasks, templates exist) and plans to its
documented number of trials; configs/paper/README.md lists each with its trial count."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from iclit.experiments import load_spec, make_plan

PAPER = Path(__file__).resolve().parents[2] / "configs" / "paper"
TRIALS = {  # (query, set) pairs: sets x queries_per_set x cells
    "main.yaml": 300,  # 30 sets x 10 queries
    "layers.yaml": 300,
    "cross_task.yaml": 600,  # 10 sets x 30 queries per cell
    "similarity.yaml": 900,
    "n_demos.yaml": 1200,
    "wrong_labels.yaml": 900,
    "models.yaml": 900,  # + the control model (gemma-3-270m@random)
    "instruction.yaml": 600,
    "translation.yaml": 300,
    "lora_vs_full.yaml": 600,
    "dose.yaml": 900,
    "causal.yaml": 300,
    "tasks_antonyms.yaml": 300,
    "tasks_translation_words.yaml": 300,
    "tasks_addition.yaml": 300,
    "tasks_reverse_words.yaml": 300,
}
SETS = {"main.yaml": 30, "layers.yaml": 30, "causal.yaml": 30}  # the rest: 10 sets of 30 queries


def test_the_list_is_complete():
    assert sorted(p.name for p in PAPER.glob("*.yaml")) == sorted(TRIALS)


@pytest.mark.parametrize("name", sorted(TRIALS))
def test_paper_spec_validates_and_plans(name):
    spec = load_spec(PAPER / name)
    assert spec.resamples == SETS.get(name, 10)
    plan = make_plan(spec)
    assert plan.n_trials == TRIALS[name]
    assert plan.n_trials // len(plan.cells) >= 300  # the floor of (query, set) pairs per cell
    assert len(set(plan.trial_keys())) == plan.n_trials


@pytest.mark.parametrize("name", sorted(TRIALS))
def test_paper_spec_declares_its_margins(name):
    """Every paper spec declares its equivalence margins, each quantity on its own scale."""
    import yaml

    declared = yaml.safe_load((PAPER / name).read_text(encoding="utf-8")).get("equivalence_margin")
    assert isinstance(declared, dict) and {"raw", "centred", "update", "agreement", "kl"} <= set(declared)
    assert load_spec(PAPER / name).margins == declared | {"ceiling_fraction": declared.get("ceiling_fraction", 0.25)}


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
    assert len(shared) == 300
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
    "causal.yaml": "5e7b0b0eae257d76",
    "cross_task.yaml": "821185bf5419d9f7",
    "dose.yaml": "791261a9e7c49e03",
    "instruction.yaml": "035d13a254414bf4",
    "layers.yaml": "385ac14bdc1945b3",
    "lora_vs_full.yaml": "8bd7ce24771dde01",
    "main.yaml": "385ac14bdc1945b3",
    "models.yaml": "f47a0ad8461f00c8",  # its first 600 keys: b1f1d1ca6912e703, as before the control cell
    "n_demos.yaml": "00baea025dd734a7",
    "similarity.yaml": "558085de3792b168",  # most/least cells: block_sets disjoint (2026-12-02)
    "tasks_addition.yaml": "d88db02030a15e58",
    "tasks_antonyms.yaml": "beb2129cfd3e63cc",
    "tasks_reverse_words.yaml": "fe26d2904a321bca",
    "tasks_translation_words.yaml": "c337f771f816a440",
    "translation.yaml": "28736f85cf21313e",
    "wrong_labels.yaml": "7460eae123e6f026",
}


@pytest.mark.parametrize("name", sorted(TRIALS))
def test_trial_keys_stay_as_they_were(name):
    """The keys of runs already stored: unchanged by a new spec key or a new schema (bump
    KEY_VERSION and these digests only when what a trial computes changes)."""
    import hashlib

    keys = make_plan(load_spec(PAPER / name)).trial_keys()
    assert hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16] == KEYS[name]
