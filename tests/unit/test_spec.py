"""Experiment specs: YAML → typed config, every problem reported with its path; plans and trial keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from exp_helpers import SMOKE, TINY_SPEC, write_spec
from typer.testing import CliRunner

from iclit.experiments import ExperimentSpec, SpecError, load_spec, loads_spec, make_plan, parse_spec
from iclit.tuning import TuningRecipe


def problems(text: str, **kw) -> list[str]:
    with pytest.raises(SpecError) as info:
        loads_spec(text, **kw)
    return [str(p) for p in info.value.problems]


def test_smoke_spec_is_valid_and_small() -> None:
    spec = load_spec(SMOKE)
    assert spec.model == "gemma-3-270m"
    assert len(spec.factors) == 2
    plan = make_plan(spec)
    assert plan.n_trials <= 12  # about two minutes on the default model
    assert spec.recipe.epochs == TuningRecipe().epochs


def test_parse_full_spec_round_trips() -> None:
    text = """
name: full
model: tiny-random-llama
task: sentiment
template: qa
instruction: false
k: 3
resamples: 5
seed: 7
similarity: most
wrong_labels: 0.25
demo_task: translation-en-cs
recipe: {method: lora, rank: 4, alpha: 8, targets: [q_proj], lr: 0.002, epochs: 2}
recipes:
  full: {method: full, epochs: 1}
design: separate
factors:
  k: [1, 3]
  similarity: [random, most, least]
  wrong_labels: [0, 0.5, 1]
  demo_task: [null, translation-en-cs]
  template: [default, qa]
  instruction: [true, false]
  model: [tiny-random-llama]
  recipe: [base, full, {epochs: 4}]
chunk_size: 4
"""
    spec = loads_spec(text)
    assert spec.seeds == (7,)
    assert spec.recipe == TuningRecipe(rank=4, alpha=8.0, targets=("q_proj",), lr=0.002, epochs=2)
    assert spec.factors["demo_task"] == (None, "translation-en-cs")
    assert spec.resolve_recipe("full") == (
        "full",
        TuningRecipe(method="full", rank=4, alpha=8.0, targets=("q_proj",), lr=0.002, epochs=1),
    )
    label, recipe = spec.resolve_recipe({"epochs": 4})
    assert label == "epochs=4" and recipe.epochs == 4 and recipe.rank == 4
    again = parse_spec(yaml.safe_load(spec.to_yaml()))
    assert again == spec
    assert spec.validate() == spec


def test_python_built_spec_validates() -> None:
    spec = ExperimentSpec(model="tiny-random-llama", resamples=2, factors={"k": (1, 2)})
    assert spec.validate() is not spec and spec.validate() == spec
    with pytest.raises(SpecError, match=r"factors.k\[1\]: must be an integer >= 0"):
        ExperimentSpec(model="tiny-random-llama", factors={"k": (1, -1)}).validate()


def test_every_problem_is_reported_with_path_and_line() -> None:
    text = """name: bad
model: tiny-random-llama
resamples: 0
seeds: [0, -1]
similarity: closest
wrong_labels: 1.5
recipe:
  method: qlora
  rank: 0
  bogus: 1
factors:
  k: [2, 4, -3, 1000]
  similarity: [random, most, nearest]
  wrong_labels: [0, 2]
  colour: [red]
  template: [default, nope]
  model: [tiny-random-llama, ./no/such/model]
  recipe: [base, full, {epochs: 0}]
  demo_task: [null, nosuchtask]
extra: 1
"""
    found = problems(text)
    expected = [
        "resamples: must be a positive integer, not 0 (line 3)",
        "seeds[1]: must be an integer >= 0, not -1 (line 4)",
        "similarity: must be one of random, most, least, not 'closest' (line 5)",
        "wrong_labels: must be a number in [0, 1], not 1.5 (line 6)",
        "recipe.method: must be one of lora, full, not 'qlora' (line 8)",
        "recipe.rank: must be a positive integer, not 0 (line 9)",
        "factors.k[2]: must be an integer >= 0, not -3 (line 12)",
        "factors.similarity[2]: must be one of random, most, least, not 'nearest' (line 13)",
        "factors.wrong_labels[1]: must be a number in [0, 1], not 2 (line 14)",
        "factors.recipe[2].epochs: must be a positive integer, not 0 (line 18)",
    ]
    for e in expected:
        assert e in found, f"missing {e!r} in {found}"
    starts = [
        "recipe.bogus: unknown recipe field",
        "factors.colour: unknown factor",
        "factors.k[3]: k=1000 is too large for task 'sentiment': it has 344 examples",
        "factors.template[1]: task 'sentiment' has no template 'nope'",
        "factors.model[1]: ./no/such/model",
        "factors.recipe[1]: must be 'base', a name in `recipes`",
        "factors.demo_task[1]: unknown task 'nosuchtask'",
        "extra: unknown key",
    ]
    for s in starts:
        assert any(f.startswith(s) for f in found), f"missing {s!r} in {found}"
    # in file order
    lines = [int(f.rsplit("(line ", 1)[1].rstrip(")")) for f in found if "(line " in f]
    assert lines == sorted(lines)


def test_resource_problems() -> None:
    found = problems("model: tiny-random-llama\ntask: nosuchtask\n")
    assert found[0].startswith("task: unknown task 'nosuchtask'")
    found = problems("model: tiny-random-llama\nk: 400\nresamples: 400\n")
    assert any(f.startswith("k: k=400 is too large for task 'sentiment'") for f in found)
    assert any(f.startswith("resamples: 400 resamples need as many distinct queries") for f in found)
    found = problems("model: tiny-random-llama\ndemo_task: translation-en-cs\nfactors:\n  k: [4, 300]\n")
    assert any(f.startswith("factors.k[1]: k=300 is too large for task 'translation-en-cs'") for f in found)
    found = problems("model: tiny-random-llama\narms: [anchor, icl]\n")
    assert any(f.startswith("arms: must include anchor, icl, it") for f in found)


def test_structural_problems() -> None:
    assert problems("- a list\n") == ["a spec must be a mapping of keys to values, not a list"]
    assert problems("k: [\n")[0].startswith("not valid YAML")
    found = problems("model: tiny-random-llama\nfactors:\n  k: 3\n  similarity: []\n")
    assert "factors.k: must be a non-empty list of values, not an integer (line 3)" in found
    assert "factors.similarity: must be a non-empty list of values, not an empty list (line 4)" in found
    found = problems("model: tiny-random-llama\nfactors:\n  k: [2, 2]\n")
    assert "factors.k: lists a value twice (line 3)" in found
    assert problems("model: tiny-random-llama\nk: true\n") == ["k: must be an integer >= 0, not True (line 2)"]


def test_cli_run_rejects_an_invalid_spec_and_writes_nothing(tmp_path: Path) -> None:
    from iclit.cli import app

    spec = tmp_path / "bad.yaml"
    spec.write_text("model: tiny-random-llama\nfactors:\n  k: [2, 4, -1]\n  wrong_labels: [0, 3]\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(out)])
    assert result.exit_code == 2
    text = result.output
    assert "2 problems in the spec" in text
    assert "factors.k[2]: must be an integer >= 0, not -1 (line 3)" in text
    assert "factors.wrong_labels[1]: must be a number in [0, 1], not 3 (line 4)" in text
    assert not out.exists()


def test_cli_check_shows_the_plan(tmp_path: Path) -> None:
    from iclit.cli import app

    spec = write_spec(tmp_path / "tiny.yaml")
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(tmp_path / "run"), "--check"])
    assert result.exit_code == 0, result.output
    assert "4 cells × 1 seed(s) × 6 resamples = 24 trials in 12 chunks" in result.output
    assert not (tmp_path / "run").exists()


# --- plans and keys ------------------------------------------------------------------------


def tiny(**changes) -> ExperimentSpec:
    return parse_spec({**TINY_SPEC, **changes})


def test_grid_and_separate_designs() -> None:
    grid = make_plan(tiny())
    assert len(grid.cells) == 4 and grid.n_trials == 24 and len(grid.chunks) == 12
    assert [c.resamples for c in grid.chunks[:3]] == [(0, 1), (2, 3), (4, 5)]
    sep = make_plan(tiny(design="separate", k=2, wrong_labels=0.0))
    # k in {1, 2} at wrong_labels 0, and wrong_labels in {0, 1} at k 2: the (2, 0) cell is shared
    assert sorted((c.k, c.wrong_labels) for c in sep.cells) == [(1, 0.0), (2, 0.0), (2, 1.0)]
    assert len({c.key for c in sep.cells}) == 3


def test_trial_keys_are_stable_and_cover_what_matters() -> None:
    a, b = make_plan(tiny()), make_plan(tiny())
    assert a.trial_keys() == b.trial_keys()
    assert len(set(a.trial_keys())) == a.n_trials
    base = set(a.trial_keys())
    # more resamples: the first ones keep their keys
    more = make_plan(tiny(resamples=8))
    assert base < set(more.trial_keys())
    for change in (
        {"recipe": {"epochs": 4}},
        {"template": "qa"},
        {"instruction": False},
        {"seeds": [1]},
        {"chunk_size": 3},
        {"sampler": "random"},
        {"demo_task": "translation-en-cs"},
        {"batch_size": 8},
        {"max_new_tokens": 8},
        {"similarity": "most"},
        {"fast": False},
    ):
        other = set(make_plan(tiny(**change)).trial_keys())
        assert not (other & base), change


def test_draws_depend_only_on_cell_seed_and_index() -> None:
    plan = make_plan(tiny(factors={"wrong_labels": [0.0, 0.5]}, k=4))
    clean, wrong = plan.cells
    d_clean = clean.draws(0, [3, 4])
    assert d_clean == clean.draws(0, [0, 1, 2, 3, 4])[3:]
    d_wrong = wrong.draws(0, [3, 4])
    for c, w in zip(d_clean, d_wrong, strict=True):
        assert c.query == w.query
        assert [d.id for d in c.demonstrations] == [d.id for d in w.demonstrations]
        flipped = [d for d in w.demonstrations if "true_output" in d.meta]
        assert len(flipped) == 2
        assert all(d.output != d.meta["true_output"] for d in flipped)


def test_the_documented_example_spec_parses() -> None:
    import textwrap

    import iclit.experiments.spec as module

    block = module.__doc__.split("::\n\n", 1)[1].split("\n\nWith ")[0]
    spec = loads_spec(textwrap.dedent(block), check_resources=False)
    assert set(spec.factors) == {
        "k",
        "similarity",
        "wrong_labels",
        "demo_task",
        "template",
        "instruction",
        "model",
        "recipe",
    }
    assert spec.resolve_recipe("full")[1].method == "full"


# --- a data file as the task: task_options ----------------------------------------------------


def _reviews(tmp_path: Path) -> Path:
    rows = ["text,label"] + [f"review number {i},{i % 2}" for i in range(12)]
    path = tmp_path / "reviews.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_task_options_load_a_data_file_as_compare_does(tmp_path: Path) -> None:
    from iclit.tasks import get_task

    path = _reviews(tmp_path)
    text = f"""model: tiny-random-llama
task: {path}
task_options:
  input_field: text
  output_field: label
  kind: classification
  verbalizer: {{0: negative, 1: positive}}
  template:
    instruction: Is the review positive or negative?
    input_prefix: "Review: "
    output_prefix: "Sentiment:"
    demo_sep: "\\n---\\n"
k: 2
resamples: 4
chunk_size: 2
factors:
  instruction: [true, false]
"""
    spec = loads_spec(text)
    assert spec.task_options.verbalizer == {"0": "negative", "1": "positive"}
    assert parse_spec(yaml.safe_load(spec.to_yaml())) == spec
    plan = make_plan(spec)
    with_instruction, without = plan.cells
    flags = get_task(
        path, input_field="text", output_field="label", kind="classification", verbalizer={0: "negative", 1: "positive"}
    )  # what `iclit compare --input-field …` loads
    assert [e.output for e in with_instruction.task.examples] == [e.output for e in flags.examples]
    assert with_instruction.task.template.instruction == "Is the review positive or negative?"
    assert (
        with_instruction.task.template.demo_sep == "\n---\n"
        and with_instruction.task.template.input_prefix == "Review: "
    )
    assert without.task.template.instruction is None and without.task.template.output_prefix == "Sentiment:"
    assert with_instruction.settings["task_options"] == spec.task_options.to_dict()
    # the options are part of the keys; a spec without them has no such setting
    other = make_plan(spec.replace(task_options={**spec.task_options.to_dict(), "template": {"input_prefix": "R: "}}))
    assert set(other.trial_keys()).isdisjoint(plan.trial_keys())
    assert "task_options" not in make_plan(tiny()).cells[0].settings


def test_task_options_problems(tmp_path: Path) -> None:
    path = _reviews(tmp_path)
    found = problems("model: tiny-random-llama\ntask: sentiment\ntask_options:\n  input_field: text\n")
    assert found[0].startswith(
        "task_options: task 'sentiment' is built in; loader options ['input_field'] apply only to files"
    )
    found = problems(
        f"model: tiny-random-llama\ntask: {path}\ntask_options:\n  input_field: body\n  colour: red\n"
        "  kind: ranking\n  template: {prefix: x, instruction: 3}\n"
    )
    assert any(f.startswith("task_options.colour: unknown task option") for f in found)
    assert "task_options.kind: must be one of classification, generation, not 'ranking' (line 6)" in found
    assert any(
        f.startswith("task_options.template.prefix: unknown template field (fields: instruction, input_prefix")
        for f in found
    )
    assert "task_options.template.instruction: must be a string or null, not 3 (line 7)" in found
    found = problems(
        f"model: tiny-random-llama\ntask: {path}\ntask_options: {{input_field: body, output_field: label}}\n"
    )
    assert found[0].startswith("task: ") and "header has no column 'body'" in found[0]
