"""The spec's schema: one set of pydantic models, torch-free, printed by `iclit spec-schema`,
valid for every YAML in configs/, documented in configs/README.md; the recipe is one too."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml
from exp_helpers import REPO, TINY_SPEC
from typer.testing import CliRunner

from iclit.experiments.spec import (
    ARM_NAMES,
    BASELINE_NAMES,
    SAMPLER_NAMES,
    ExperimentSpec,
    SpecError,
    TemplateFields,
    loads_spec,
    parse_spec,
)
from iclit.experiments.spec.docs import BEGIN, END, keys_markdown, spec_schema, with_keys
from iclit.tuning import TuningRecipe
from iclit.tuning.recipe import RecipeError

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_the_allowed_names_are_the_registries() -> None:
    from iclit.analysis import BASELINES
    from iclit.engine.arms import ARMS
    from iclit.tasks import SAMPLERS

    assert set(ARM_NAMES) == set(ARMS)
    assert BASELINE_NAMES == tuple(BASELINES)
    assert set(SAMPLER_NAMES) == set(SAMPLERS)


def test_template_fields_are_the_templates() -> None:
    from iclit.tasks import Template

    assert list(TemplateFields.model_fields) == [f.name for f in dataclasses.fields(Template) if f.name != "name"]


_TORCH_FREE = """
import sys
from pathlib import Path
from typer.testing import CliRunner
import iclit.experiments.spec as spec
for path in sorted(Path("configs").rglob("*.yaml")):
    try:  # the resource check too; a model not installed here (the ladder's) fails it
        spec.load_spec(path)
    except spec.SpecError:
        spec.load_spec(path, check_resources=False)
from iclit.cli import app
runner = CliRunner()
for args in (["--help"], ["spec-schema"], ["run", "configs/examples/smoke.yaml", "--out", sys.argv[1], "--check"]):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (args, result.output)
loaded = [m for m in ("torch", "transformers") if m in sys.modules]
assert not loaded, loaded
print("torch-free")
"""


def test_reading_specs_and_the_cli_import_no_torch(tmp_path: Path) -> None:
    """Every config loads (resources checked), `iclit --help`, `spec-schema` and `run --check`
    run, and neither torch nor transformers is imported."""
    out = subprocess.run(
        [sys.executable, "-c", _TORCH_FREE, str(tmp_path / "run")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "torch-free" in out.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_is_valid_under_the_json_schema(path: Path) -> None:
    jsonschema.validate(yaml.safe_load(path.read_text(encoding="utf-8")), spec_schema())


def test_the_json_schema_rejects_what_the_models_reject() -> None:
    schema = spec_schema()
    for bad in (
        {"k": -1},
        {"extra": 1},
        {"recipe": {"method": "qlora"}},
        {"factors": {"colour": ["red"]}},
        {"factors": {"k": []}},
        {"task_options": {"template": {"prefix": "x"}}},
        {"baselines": ["centred"]},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        with pytest.raises(SpecError):
            parse_spec(bad, check_resources=False)
    documented = spec_schema_examples()
    assert len(documented) == 2
    for data in documented:
        jsonschema.validate(data, schema)
        parse_spec(data, check_resources=False)


def spec_schema_examples() -> list:
    import iclit.experiments.spec as module

    blocks = module.__doc__.split("::\n\n")[1:3]
    return [
        yaml.safe_load(textwrap.dedent(b.split("\n\n")[0] if i else b.split("\n\nWith ")[0]))
        for i, b in enumerate(blocks)
    ]


def test_cli_prints_the_schema_and_the_keys() -> None:
    from iclit.cli import app

    result = CliRunner().invoke(app, ["spec-schema"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == ExperimentSpec.model_json_schema()
    result = CliRunner().invoke(app, ["spec-schema", "--markdown"])
    assert result.exit_code == 0 and result.output == keys_markdown()


def test_the_readme_documents_every_key() -> None:
    readme = (REPO / "configs" / "README.md").read_text(encoding="utf-8")
    assert BEGIN in readme and END in readme
    assert with_keys(readme) == readme, (
        "configs/README.md is stale: regenerate its keys with `iclit spec-schema --markdown`"
    )
    for key in ExperimentSpec.model_fields:
        assert f"| `{key}` |" in readme, key
    for key in (f.name for f in dataclasses.fields(TuningRecipe)):
        assert f"| `{key}` |" in readme, key


def test_field_descriptions_are_the_docs() -> None:
    schema = spec_schema()
    for name, prop in schema["properties"].items():
        assert prop.get("description"), name
    for definition in schema["$defs"].values():
        for name, prop in definition["properties"].items():
            assert prop.get("description"), name


# --- the recipe ---------------------------------------------------------------------------


def test_recipe_is_a_validating_dataclass() -> None:
    r = TuningRecipe(alpha=8, targets="q_proj", capture_steps=[4, 1])
    assert r.alpha == 8.0 and r.targets == ("q_proj",) and r.capture_steps == (1, 4)
    assert TuningRecipe.rank == 8 and TuningRecipe.epochs == 12  # class defaults, as `iclit compare --help` shows them
    assert (
        dataclasses.replace(r, capture_steps=())
        == r.replace(capture_steps=())
        == TuningRecipe(alpha=8, targets=("q_proj",))
    )
    assert [f.name for f in dataclasses.fields(TuningRecipe)][:3] == ["method", "rank", "alpha"]
    assert dataclasses.asdict(r)["targets"] == ("q_proj",)
    with pytest.raises(RecipeError, match="tuning epochs must be >= 1, not 0"):
        dataclasses.replace(r, epochs=0)
    with pytest.raises(ValueError, match="unknown recipe field 'bogus'"):
        TuningRecipe(bogus=1)
    with pytest.raises(ValueError, match="tuning dropout must be in"):
        TuningRecipe(dropout=1.0)
    assert hash(r) == hash(TuningRecipe(alpha=8.0, targets=("q_proj",), capture_steps=(1, 4)))


def test_recipe_factor_values_resolve_once() -> None:
    spec = parse_spec(
        {**TINY_SPEC, "recipes": {"full": {"method": "full"}}, "factors": {"recipe": ["base", "full", {"epochs": 5}]}}
    )
    labels = [label for label, _ in spec.resolved_recipes]
    assert labels == ["base", "full", "epochs=5"]
    for value, (_label, recipe) in zip(spec.factors["recipe"], spec.resolved_recipes, strict=True):
        assert spec.resolve_recipe(value)[1] is recipe  # a lookup, not a new recipe
    assert spec.resolve_recipe("full")[1] == TuningRecipe(method="full", epochs=3)
    assert spec.resolve_recipe({"rank": 2})[1].rank == 2  # a value the spec does not list: resolved on demand


# --- Python-built specs and cross-key checks ---------------------------------------------------


def test_python_construction_raises_spec_error_with_paths() -> None:
    with pytest.raises(SpecError) as info:
        ExperimentSpec(k=-1, factors={"k": (1, -1)}, recipe={"rank": 0})
    assert [str(p) for p in info.value.problems] == [
        "k: must be an integer >= 0, not -1",
        "recipe.rank: must be a positive integer, not 0",
        "factors.k[1]: must be an integer >= 0, not -1",
    ]
    spec = ExperimentSpec(model="tiny-random-llama")
    assert spec.replace(k=2).k == 2
    with pytest.raises(SpecError, match="resamples: must be a positive integer"):
        spec.replace(resamples=0)


def test_cross_key_problems_come_with_the_others() -> None:
    found = [
        str(p)
        for p in pytest.raises(
            SpecError,
            loads_spec,
            "seed: 1\nseeds: [2]\nk: -1\narms: [anchor, icl, anchor]\n"
            "recipe: {epochs: 4, capture_steps: [8]}\nfactors: {wrong_labels: [0, 0.0]}\n",
            check_resources=False,
        ).value.problems
    ]
    assert "seed: give `seed` or `seeds`, not both (line 1)" in found
    assert "k: must be an integer >= 0, not -1 (line 3)" in found
    assert any(f.startswith("arms: lists an arm twice (line 4)") for f in found)
    assert any(f.startswith("recipe: tuning capture_steps [8] go past the last step") for f in found)
    assert "factors.wrong_labels: lists a value twice (line 6)" in found
    assert loads_spec("seed: 3\n", check_resources=False).seeds == (3,)
    assert loads_spec("seed: 3\n", check_resources=False) == loads_spec("seeds: [3]\n", check_resources=False)
