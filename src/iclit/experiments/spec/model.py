"""The typed spec: :class:`ExperimentSpec`, a pydantic model.

With the models of its values (:mod:`~iclit.experiments.spec.values`) and the recipe
(:class:`~iclit.tuning.TuningRecipe`) it is the single source of a spec's keys, types,
defaults, allowed values and documentation: the Field descriptions are the user docs
(``iclit spec-schema``, configs/README.md). Checks that span keys run in validators that see
the keys validated before them, so they are reported beside every other problem.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    Discriminator,
    Field,
    PlainValidator,
    PrivateAttr,
    Strict,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from iclit.experiments.spec.cluster import ClusterOptions
from iclit.experiments.spec.problems import SpecError, problems_of
from iclit.experiments.spec.values import (
    ANALYSIS_NAMES,
    BASELINE_NAMES,
    DESIGNS,
    DTYPES,
    FROZEN,
    REQUIRED_ARMS,
    SAMPLER_NAMES,
    AnalysisField,
    ArmField,
    BaselineField,
    DemoTaskField,
    Design,
    DType,
    EquivalenceMargins,
    Factors,
    FactorValue,
    LayersField,
    OverridesField,
    RecipeNameField,
    SamplerName,
    ScalesField,
    SimilarityField,
    StrField,
    TaskOptions,
    TextField,
    listed,
    none_is,
    one_of,
    parse_factors,
    plain,
    recipe_label,
)
from iclit.schema import (
    Fraction,
    NonEmptyStr,
    NonNegInt,
    PosInt,
    StrictBool,
    distinct,
    expect,
    parse_bytes,
    problem,
    raise_problems,
)
from iclit.tasks.chat import PROMPT_FORMATS, PromptFormat
from iclit.tasks.draws import BLOCK_SETS, BlockSets
from iclit.tuning.recipe import RecipeError, RecipeOverrides, TuningRecipe, recipe_overrides

__all__ = ["ExperimentSpec"]


class _Both:
    """`seed` and `seeds` both given (the `seed` field reports it)."""


def _no_both(v: Any) -> Any:
    if isinstance(v, _Both):
        raise problem("give `seed` or `seeds`, not both")
    return v


class ExperimentSpec(BaseModel):
    """A validated experiment: what is fixed, what varies, how to run it.

    Build it from YAML with :func:`load_spec` / :func:`parse_spec`, or in Python (the schema
    is checked at once, :class:`SpecError`) and call :meth:`validate` to also check that the
    models, tasks and templates exist (the runner does). Fields: ``iclit spec-schema``.
    """

    model_config = FROZEN

    name: NonEmptyStr = Field("experiment", description="the experiment's name (run directories, reports)")
    description: TextField = Field("", description="what the experiment asks, for the report")
    model: NonEmptyStr = Field("gemma-3-270m", description="embedded alias, local directory, .gguf file or hub id")
    task: NonEmptyStr = Field(
        "sentiment", description="built-in task name or a data file (.jsonl, .json, .csv, .parquet)"
    )
    task_options: TaskOptions | None = Field(None, description="a data file's fields and kind, and the task's template")
    template: NonEmptyStr = Field("default", description="a named template of the task")
    instruction: StrictBool = Field(True, description="keep the template's instruction")
    prompt_format: Annotated[PromptFormat, one_of(PROMPT_FORMATS)] = Field(
        "raw",
        description="raw: the template's text as it is, on every model (the default; a model factor compares "
        "the same text); chat: every whole prompt (anchor query, ICL prompt, IT training prompt) as "
        "one user message of the model's chat template, the answer starting the assistant's reply "
        "(instruct models; iclit.tasks.chat)",
    )
    arms: Annotated[
        tuple[ArmField, ...],
        distinct("an arm"),
        BeforeValidator(listed),
        expect("a list of arm names", as_kind=True),
        none_is(REQUIRED_ARMS),
    ] = Field(
        REQUIRED_ARMS,
        description="arms to run; must include anchor, icl and it (it_seed2: IT with another seed; "
        "icl_reordered: ICL with the demonstrations rotated by one)",
    )
    k: NonNegInt = Field(4, description="demonstrations per resample (0: zero-shot, every arm reads the query alone)")
    resamples: PosInt = Field(
        8,
        description="demonstration sets drawn per cell and seed (with one query per set: "
        "the (query, demonstrations) draws)",
    )
    queries_per_set: PosInt = Field(
        1,
        description="queries read with each demonstration set (the crossed design): one "
        "ICL prefix and one IT adapter answer them all; distinct, never among "
        "the set's demonstrations, label-balanced; 1: one query per set",
    )
    sets_per_query: Annotated[
        Annotated[int, Strict(), Field(ge=1)] | None, expect(message="must be a positive integer or null, not {got}")
    ] = Field(
        None,
        description="demonstration sets that share the same queries (the demo-swap null compares a query's arms "
        "across them); null: 1 with one query per set, else 2",
    )
    block_sets: Annotated[BlockSets, one_of(BLOCK_SETS)] = Field(
        "drawn",
        description="how the later sets of a query block get their demonstrations: drawn (each its own draw) or "
        "flipped (the block's first set with every label changed: sets that must differ, the positive control of "
        "the demo-swap test; classification tasks, sets_per_query >= 2)",
    )
    it_seeds: PosInt = Field(
        1,
        description="IT adapters per demonstration set, each with its own seed (LoRA init, data "
        "order, dropout), trained in the same batched pass: `it` is seed 1's, "
        "it_seed2 … the others'; their spread is the IT seed noise",
    )
    equivalence_margin: Annotated[
        Annotated[Annotated[float, Strict(), Field(gt=0.0, le=1.0, allow_inf_nan=False)], Tag("number")]
        | Annotated[EquivalenceMargins, Tag("mapping")],
        Discriminator(lambda v: "mapping" if isinstance(v, (Mapping, EquivalenceMargins)) else "number"),
        expect("a number in (0, 1] or a mapping of margins per quantity"),
    ] = Field(
        EquivalenceMargins(),
        description="declared before the run, per quantity (raw, centred, update cosines: a number or 'ceiling'; "
        "agreement; kl; ceiling_fraction): the largest excess over a null that counts as no effect; an "
        "excess whose 90% CI lies inside ±margin is 'equivalent within ±margin'. A number: every cosine "
        "quantity. Default: the cosines follow the ceiling rule, a quarter of the excess of the cell's "
        "positive control (IT seed 1 vs 2, else ICL vs reordered ICL)",
    )
    seed: Annotated[NonNegInt | None, BeforeValidator(_no_both), expect("an integer >= 0")] = Field(
        None, description="one seed: the same as `seeds: [seed]`", exclude=True
    )
    seeds: Annotated[
        tuple[NonNegInt, ...],
        Field(min_length=1),
        distinct("a seed"),
        expect("a non-empty list of integers >= 0", as_kind=True),
    ] = Field((0,), description="seeds of the draws and the tuning")
    sampler: Annotated[SamplerName | None, one_of(tuple(sorted(SAMPLER_NAMES)), null=True)] = Field(
        None, description="base demonstration sampler; null: balanced for classification, random otherwise"
    )
    similarity: SimilarityField = Field(
        "random",
        description="random (the base sampler), most or least similar demonstrations (all-MiniLM-L6-v2 embeddings)",
    )
    wrong_labels: Fraction = Field(0.0, description="fraction of demonstrations given a wrong label")
    demo_task: DemoTaskField = Field(
        None, description="demonstrations from another task; null or 'same': the query's task"
    )
    recipe: Annotated[
        TuningRecipe,
        none_is({}),
        expect(f"a mapping of recipe fields ({', '.join(RecipeOverrides.model_fields)})", as_kind=True),
    ] = Field(default_factory=TuningRecipe, description="the IT recipe (see TuningRecipe)")
    recipes: Annotated[
        dict[RecipeNameField, OverridesField], none_is({}), expect("a mapping of name -> recipe fields", as_kind=True)
    ] = Field(default_factory=dict, description="named recipes for the `recipe` factor, each laid over `recipe`")
    design: Annotated[Design, one_of(DESIGNS)] = Field(
        "grid",
        description="grid: every combination of the factors' values; "
        "separate: one factor at a time around the base values",
    )
    factors: Annotated[
        dict[str, tuple[Any, ...]], PlainValidator(parse_factors, json_schema_input_type=Factors | None)
    ] = Field(default_factory=dict, description="factor -> list of values (see Factors)")
    chunk_size: PosInt = Field(
        8,
        description="resamples run and stored together; fixed by the spec, so a resumed run "
        "computes what an uninterrupted one would",
    )
    batch_size: PosInt = Field(16, description="prompts per forward pass")
    max_new_tokens: PosInt = Field(48, description="tokens generated per answer (generation tasks)")
    device: Annotated[StrField | None, expect("a non-empty string or null")] = Field(
        None, description="cpu, cuda, cuda:1 …; null: cuda if available, else cpu"
    )
    dtype: Annotated[DType | None, one_of(DTYPES, null=True)] = Field(
        None, description="null: bfloat16 on cuda, float32 on cpu"
    )
    record_similarity: Annotated[
        Annotated[bool, Strict()] | None, expect(message="must be true or false or null, not {got}")
    ] = Field(
        None,
        description="record the demonstration–query similarity per trial; null: when `similarity` is varied or set",
    )
    fast: StrictBool = Field(
        True, description="the fast engine (prefix cache, batched adapters); false: the reference path"
    )
    store_states: StrictBool = Field(
        True,
        description="keep the hidden states (states/*.safetensors), from which every "
        "similarity is computed; false: behaviour only (predictions, scores, "
        "losses), for very large runs",
    )
    memory_budget: Annotated[StrField | None, expect("a memory size such as 8GiB, or null")] = Field(
        None,
        description="memory the batched IT path may plan for (e.g. 8GiB); null: half the free memory (RAM on the "
        "CPU, CUDA memory on a GPU). Changes speed and peak memory, not results",
    )
    adapters_per_pass: Annotated[
        Annotated[int, Strict(), Field(ge=1)] | None, expect(message="must be a positive integer or null, not {got}")
    ] = Field(
        None, description="LoRA adapters trained together in one pass; null: planned from memory_budget (at most 64)"
    )
    max_train_tokens: Annotated[
        Annotated[int, Strict(), Field(ge=1)] | None, expect(message="must be a positive integer or null, not {got}")
    ] = Field(
        None,
        description="padded tokens per training micro-batch; null: planned (at most 768 on the CPU, 32768 on a GPU)",
    )
    baselines: Annotated[
        tuple[BaselineField, ...],
        distinct("a baseline"),
        BeforeValidator(listed),
        expect("a list of baselines (" + ", ".join(BASELINE_NAMES) + ")", as_kind=True),
        none_is(()),
    ] = Field(
        (),
        description="extra similarities per trial x layer, computed from the stored states: centered "
        "(anisotropy-corrected cosines), shuffled (ICL of trial i vs IT of trial i+1 among a cell's trials), "
        "update (cosine of the ICL and IT updates from the anchor), noise_ceiling (IT vs IT with another "
        "seed: one more tuning), cka (linear CKA of each arm pair across all of a cell's queries, >= 3), "
        "query_mean (the three pairs over the query's mean state)",
    )
    analyses: Annotated[
        tuple[AnalysisField, ...],
        distinct("an analysis"),
        BeforeValidator(listed),
        expect("a list of analyses (" + ", ".join(ANALYSIS_NAMES) + ")", as_kind=True),
        none_is(()),
    ] = Field(
        (),
        description="causal tests run in the engine with the model, stored per trial (`iclit results --metric patch "
        "/ steer`, the report). patch: the query's last-token state at state index l replaced by its ICL "
        "state or its IT state in the anchor run, the ICL state in the tuned model's query run, the IT state "
        "in the ICL run; steer: the mean update h_arm - h_anchor of the set's other queries (ICL or IT) "
        "added, times each scale, to the query's anchor run, beside random directions of the same norm "
        "(needs queries_per_set >= 2). Classification: label distributions over the task's labels; "
        "generation: the log-probability of the gold answer's first token. Cost: one last-token forward "
        "per layer and run, see configs/paper/causal.yaml",
    )
    patch_layers: LayersField = Field(
        None,
        description="state indices l patched (0: block 0's input, L: the final norm's output, as the stored "
        "states); null: every 2nd, L, L-2, ... down to 1; 'all': 1..L",
    )
    steer_layers: LayersField = Field(
        None, description="state indices l steered; null: every 3rd, L, L-3, ... down to 1; 'all': 1..L"
    )
    steer_scales: ScalesField = Field(
        (0.5, 1.0, 2.0, 4.0), description="multipliers of the steering vectors (1: the mean update itself)"
    )
    steer_null_draws: PosInt = Field(
        1,
        description="random directions per query, layer and scale, each scaled to the norm of the ICL and of the IT "
        "vector (the null of steering)",
    )

    cluster: ClusterOptions | None = Field(
        None,
        description="how the run spreads over Ray actors or SLURM jobs (actors per GPU, threads, retries, the "
        "SLURM job array); changes no trial",
    )

    _recipes: dict[str, tuple[str, TuningRecipe]] = PrivateAttr(default_factory=dict)

    # --- checks that span keys (each at its key's path, beside every other problem) -----

    @model_validator(mode="before")
    @classmethod
    def _seed_or_seeds(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "seed" in data and "seeds" in data:
            return {**data, "seed": _Both()}
        return data

    @field_validator("memory_budget", mode="after")
    @classmethod
    def _memory_size(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                parse_bytes(v)
            except ValueError as e:
                raise problem(str(e)) from None
        return v

    @field_validator("arms", mode="after")
    @classmethod
    def _required_arms(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        missing = [a for a in REQUIRED_ARMS if a not in v]
        if missing:
            raise problem(f"must include {', '.join(REQUIRED_ARMS)} (missing: {', '.join(missing)})")
        return v

    @field_validator("recipes", mode="after")
    @classmethod
    def _recipes_fit(cls, v: dict[str, dict[str, Any]], info: ValidationInfo) -> dict[str, dict[str, Any]]:
        base = info.data.get("recipe")
        if base is not None:
            raise_problems("recipes", [((name,), m, r) for name, r in v.items() for m in _misfits(base, r)])
        return v

    @field_validator("factors", mode="wrap")
    @classmethod
    def _recipe_values(cls, v: Any, handler: Any, info: ValidationInfo) -> dict[str, tuple[Any, ...]]:
        """Names of the ``recipe`` factor defined; inline recipes fit over ``recipe`` (also
        when other factor values have problems)."""
        base, named = info.data.get("recipe"), info.data.get("recipes")
        try:
            out, failed = handler(v), None
        except ValidationError as e:
            out, failed = None, e
        values = out.get("recipe") if out is not None else (v.get("recipe") if isinstance(v, Mapping) else None)
        found = []
        for i, value in enumerate(values if isinstance(values, (list, tuple)) else ()):
            if isinstance(value, str):
                if value != "base" and named is not None and value not in named:
                    found.append(
                        (
                            ("recipe", i),
                            f"must be 'base', a name in `recipes` ({', '.join(named) or 'none defined'}) "
                            f"or a mapping of recipe fields, not {value!r}",
                            value,
                        )
                    )
            elif out is not None and base is not None:
                found += [(("recipe", i), m, value) for m in _misfits(base, value)]
        raise_problems("factors", found, along=failed)
        return out

    @field_validator("block_sets", mode="after")
    @classmethod
    def _flipped_needs_blocks(cls, v: str, info: ValidationInfo) -> str:
        m, q = info.data.get("sets_per_query"), info.data.get("queries_per_set")
        if v == "flipped" and (m == 1 or (m is None and q == 1)):
            raise problem("flipped needs query blocks of two or more sets (sets_per_query >= 2)")
        return v

    @field_validator("analyses", mode="after")
    @classmethod
    def _steer_needs_queries(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        q = info.data.get("queries_per_set")
        if "steer" in v and q is not None and q < 2:
            raise problem(
                f"steer needs queries_per_set >= 2 (a query's steering vectors are the mean updates of the "
                f"other queries of its set), not {q}"
            )
        return v

    @field_validator("patch_layers", "steer_layers", "steer_scales", "steer_null_draws", mode="after")
    @classmethod
    def _used(cls, v: Any, info: ValidationInfo) -> Any:
        """A setting of an analysis not asked for is a mistake (a default written out is not)."""
        analysis = "patch" if info.field_name == "patch_layers" else "steer"
        asked = info.data.get("analyses")
        name = info.field_name
        assert name is not None  # a field validator's
        if asked is not None and analysis not in asked and v != cls.model_fields[name].default:
            raise problem(f"set, but `analyses` does not include {analysis}")
        return v

    @model_validator(mode="after")
    def _resolve(self) -> ExperimentSpec:
        """``seed`` folded into ``seeds``; each recipe factor value resolved to its recipe, once."""
        if self.seed is not None:
            object.__setattr__(self, "seeds", (self.seed,))
            object.__setattr__(self, "seed", None)
        resolved = {"base": ("base", self.recipe)}
        resolved.update({name: (name, self.recipe.replace(**r)) for name, r in self.recipes.items()})
        for value in self.factors.get("recipe", ()):
            if isinstance(value, Mapping):
                resolved[_recipe_key(value)] = (recipe_label(value), self.recipe.replace(**value))
        self._recipes = resolved
        return self

    # --- conversions --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :func:`parse_spec` turns back into an equal spec."""
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "model": self.model,
            "task": self.task,
        }
        if self.task_options is not None:  # only when given: spec files of other runs stay as they were
            out["task_options"] = self.task_options.to_dict()
        for name in type(self).model_fields:
            if name not in out and name not in ("seed", "task_options", "cluster"):
                out[name] = plain(getattr(self, name))
        out["recipe"] = plain(_recipe_fields(self.recipe))
        if self.cluster is not None:  # only when given, like task_options
            out["cluster"] = self.cluster.to_dict()
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def validate(self, *, check_resources: bool = True) -> ExperimentSpec:  # type: ignore[override]
        """Check everything (also that models, tasks and templates exist); raise :class:`SpecError`."""
        from iclit.experiments.spec.parse import parse_spec

        return parse_spec(self.to_dict(), check_resources=check_resources)

    def replace(self, **changes: Any) -> ExperimentSpec:
        """A copy with ``changes``, validated (:class:`SpecError`)."""
        fields = {name: getattr(self, name) for name in type(self).model_fields if name != "seed"}
        return type(self)(**{**fields, **changes})

    # --- what the plan needs ------------------------------------------------------------

    @property
    def margins(self) -> float | dict[str, Any]:
        """``equivalence_margin`` as plain data (a number, or the mapping per quantity)."""
        m = self.equivalence_margin
        return m if isinstance(m, float) else m.model_dump()

    @property
    def query_sharing(self) -> int:
        """Sets per query block (``sets_per_query`` resolved)."""
        if self.sets_per_query is not None:
            return self.sets_per_query
        return 1 if self.queries_per_set == 1 else 2

    @property
    def pairs(self) -> int:
        """(query, demonstration set) pairs per cell and seed: ``resamples * queries_per_set``."""
        return self.resamples * self.queries_per_set

    def factor_values(self, name: str) -> tuple[FactorValue, ...]:
        """The values of a factor: its list if it is varied, else its base value alone."""
        if name in self.factors:
            return tuple(self.factors[name])
        return (self.base_value(name),)

    def base_value(self, name: str) -> FactorValue:
        return "base" if name == "recipe" else getattr(self, name)

    def resolve_recipe(self, value: FactorValue) -> tuple[str, TuningRecipe]:
        """(label, recipe) of a ``recipe`` factor value: ``base``, a name in ``recipes`` or an
        inline mapping. The spec's own values were resolved when it was validated."""
        key = _recipe_key(value) if isinstance(value, Mapping) else value
        hit = self._recipes.get(key)
        if hit is not None:
            return hit
        if isinstance(value, Mapping):
            return recipe_label(value), self.recipe.replace(**recipe_overrides(value))
        return str(value), self.recipe.replace(**self.recipes[value])  # KeyError: not a named recipe

    @property
    def resolved_recipes(self) -> tuple[tuple[str, TuningRecipe], ...]:
        """(label, recipe) of each value of the ``recipe`` factor (the base recipe alone if not varied)."""
        return tuple(self.resolve_recipe(v) for v in self.factor_values("recipe"))

    def task_loader_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`iclit.tasks.get_task` for ``task`` (none without ``task_options``)."""
        return self.task_options.loader_options() if self.task_options is not None else {}

    def causal_settings(self) -> dict[str, Any] | None:
        """The causal analyses' settings (:class:`iclit.engine.causal.CausalSettings` fields),
        None without ``analyses``."""
        if not self.analyses:
            return None
        out: dict[str, Any] = {"analyses": [a for a in ANALYSIS_NAMES if a in self.analyses]}
        if "patch" in self.analyses:
            out["patch_layers"] = plain(self.patch_layers)
        if "steer" in self.analyses:
            out.update(
                steer_layers=plain(self.steer_layers),
                steer_scales=[float(x) for x in self.steer_scales],
                steer_null_draws=self.steer_null_draws,
            )
        return out

    @property
    def uses_similarity(self) -> bool:
        return any(v != "random" for v in self.factor_values("similarity"))

    @property
    def records_similarity(self) -> bool:
        return self.uses_similarity if self.record_similarity is None else self.record_similarity


_validating_init = ExperimentSpec.__init__


def __init__(self: ExperimentSpec, /, **data: Any) -> None:
    try:
        _validating_init(self, **data)
    except ValidationError as e:
        raise SpecError(problems_of(e, data)) from None


# Set after the class, so that pydantic's own validation (model_validate) does not go through it.
ExperimentSpec.__init__ = __init__  # type: ignore[assignment]  # deliberate: see TuningRecipe.__init__


def _recipe_key(value: Mapping[str, Any]) -> str:
    return json.dumps(plain(value), sort_keys=True)


def _recipe_fields(recipe: TuningRecipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def _misfits(base: TuningRecipe, overrides: Mapping[str, Any]) -> list[str]:
    """What is wrong with ``overrides`` laid over ``base`` (its fields are valid alone)."""
    try:
        base.replace(**overrides)
    except RecipeError as e:
        return e.messages
    return []
