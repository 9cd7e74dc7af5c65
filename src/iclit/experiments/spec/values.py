"""The value types of a spec's keys: the allowed names, the constrained types, the factors,
the task options and the template fields (pydantic models).

The allowed arms, baselines and samplers are written out here, so reading a spec imports no
torch; tests/unit/test_spec_schema.py keeps them equal to the registries.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, Strict

from iclit.schema import (
    Fraction,
    NonEmptyStr,
    NonNegInt,
    StrictBool,
    distinct,
    expect,
    kind,
    problem,
    raise_problems,
    shown,
    unset_defaults,
)
from iclit.tuning.recipe import RecipeOverrides, recipe_overrides

__all__ = [
    "FACTORS",
    "SIMILARITY_MODES",
    "DESIGNS",
    "DTYPES",
    "ARM_NAMES",
    "REQUIRED_ARMS",
    "BASELINE_NAMES",
    "SAMPLER_NAMES",
    "TASK_KINDS",
    "ANALYSIS_NAMES",
    "Factors",
    "TaskOptions",
    "TemplateFields",
    "factor_label",
    "recipe_label",
]

FactorName = Literal["k", "similarity", "wrong_labels", "demo_task", "template", "instruction", "model", "recipe"]
Similarity = Literal["random", "most", "least"]
Design = Literal["grid", "separate"]
DType = Literal["float32", "bfloat16", "float16"]
ArmName = Literal["anchor", "icl", "it", "it_seed2", "icl_reordered"]  # iclit.engine.arms.ARMS
Baseline = Literal["centered", "shuffled", "update", "noise_ceiling", "cka", "query_mean"]  # iclit.analysis.BASELINES
SamplerName = Literal["random", "balanced", "most-similar", "least-similar"]  # iclit.tasks.SAMPLERS
TaskKind = Literal["classification", "generation"]
AnalysisName = Literal["patch", "steer"]  # iclit.engine.causal.ANALYSES

FACTORS: tuple[str, ...] = get_args(FactorName)
"""The factors a spec can vary, in the order cells are enumerated."""
SIMILARITY_MODES: tuple[str, ...] = get_args(Similarity)
DESIGNS: tuple[str, ...] = get_args(Design)
DTYPES: tuple[str, ...] = get_args(DType)
ARM_NAMES: tuple[str, ...] = get_args(ArmName)
REQUIRED_ARMS: tuple[ArmName, ...] = ("anchor", "icl", "it")
BASELINE_NAMES: tuple[str, ...] = get_args(Baseline)
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)
TASK_KINDS: tuple[str, ...] = get_args(TaskKind)
ANALYSIS_NAMES: tuple[str, ...] = get_args(AnalysisName)
FactorValue = Any  # int | float | bool | str | None | Mapping (inline recipe)

FROZEN = ConfigDict(extra="forbid", frozen=True)
_PARTIAL = ConfigDict(extra="forbid", frozen=True, json_schema_extra=unset_defaults)  # fields unset unless given
_UNSET: Any = None  # the default of a _PARTIAL model's field: None, though its type is not nullable (null is no value)


def one_of(options: tuple[str, ...], *, null: bool = False) -> Any:
    return expect(("null or " if null else "") + "one of " + ", ".join(options))


def none_is(empty: Any) -> BeforeValidator:
    return BeforeValidator(lambda v: empty if v is None else v)


def listed(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


_Item = TypeVar("_Item")
Values = Annotated[
    tuple[_Item, ...], Field(min_length=1), distinct("a value"), expect("a non-empty list of values", as_kind=True)
]
"""``Values[item]``: a non-empty list of ``item`` (a tuple), each value once."""


SimilarityField = Annotated[Similarity, one_of(SIMILARITY_MODES)]
StrField = Annotated[str, Strict(), Field(min_length=1, pattern=r"\S")]  # NonEmptyStr, worded by the caller
DemoTaskField = Annotated[
    StrField | None,
    BeforeValidator(lambda v: None if v == "same" else v, json_schema_input_type=str | None),
    expect("a task name, 'same' or null"),
]
ArmField = Annotated[ArmName, expect(message="unknown arm {got} (arms: " + ", ".join(sorted(ARM_NAMES)) + ")")]
BaselineField = Annotated[Baseline, one_of(BASELINE_NAMES)]
AnalysisField = Annotated[AnalysisName, one_of(ANALYSIS_NAMES)]


def _layers(v: Any) -> Any:
    """null, 'all', or a non-empty list of distinct state indices (sorted)."""
    if v is None or v == "all":
        return v
    if not isinstance(v, (list, tuple)) or not v:
        raise problem(f"must be null, 'all' or a non-empty list of state indices (integers >= 0), not {shown(v)}")
    bad = [
        ((i,), f"must be a state index (an integer >= 0), not {shown(x)}", x)
        for i, x in enumerate(v)
        if isinstance(x, bool) or not isinstance(x, int) or x < 0
    ]
    raise_problems("layers", bad)
    if len(set(v)) != len(v):
        raise problem("lists a state index twice")
    return tuple(sorted(v))


def _non_empty(v: tuple) -> tuple:
    if not v:
        raise problem("must be a non-empty list of positive numbers, not an empty list")
    return v


LayersField = Annotated[Any, PlainValidator(_layers, json_schema_input_type=Literal["all"] | list[NonNegInt] | None)]
_Scale = Annotated[float, Strict(), Field(gt=0.0, allow_inf_nan=False), expect("a positive number")]
ScalesField = Annotated[
    tuple[_Scale, ...],
    AfterValidator(_non_empty),
    distinct("a scale"),
    BeforeValidator(listed),
    expect("a non-empty list of positive numbers", as_kind=True),
]
TextField = Annotated[str, Strict(), expect("a string")]
OverridesField = Annotated[dict[str, Any], PlainValidator(recipe_overrides, json_schema_input_type=RecipeOverrides)]


def _not_base(v: str) -> str:
    if v == "base":
        raise ValueError("'base'")
    return v


RecipeNameField = Annotated[
    str,
    Strict(),
    Field(min_length=1),
    AfterValidator(_not_base),
    expect(message="a recipe name must be a non-empty string other than 'base'"),
]


def _recipe_value(v: Any) -> str | dict[str, Any]:
    if isinstance(v, str) and v.strip():
        return v
    if isinstance(v, Mapping):
        return recipe_overrides(v)
    raise problem(f"must be 'base', a name in `recipes` or a mapping of recipe fields, not {shown(v)}")


_RecipeValue = Annotated[
    str | dict[str, Any], PlainValidator(_recipe_value, json_schema_input_type=str | RecipeOverrides)
]


def _short(v: Any) -> str:
    return "+".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def recipe_label(value: Mapping[str, Any]) -> str:
    """The label of an inline recipe: ``epochs=4,lr=0.001`` (``base`` when empty)."""
    return ",".join(f"{k}={_short(v)}" for k, v in value.items()) or "base"


def factor_label(name: str, value: FactorValue) -> Any:
    """How a factor value is shown and stored: ``demo_task: null`` is ``"same"``, etc."""
    if name == "demo_task":
        return "same" if value is None else str(value)
    if name == "recipe" and isinstance(value, Mapping):
        return recipe_label(value)
    if name == "wrong_labels":
        return float(value)
    return value


def plain(v: Any) -> Any:
    """Tuples as lists, mappings (and nested models) as dicts, all the way down (for YAML)."""
    if isinstance(v, BaseModel):
        v = v.model_dump()
    if isinstance(v, Mapping):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


_CosineMargin = Annotated[
    Annotated[float, Strict(), Field(gt=0.0, le=1.0, allow_inf_nan=False)] | Literal["ceiling"],
    expect(message="must be a number in (0, 1] or 'ceiling', not {got}"),
]


class EquivalenceMargins(BaseModel):
    """The equivalence margins, declared before the run, per quantity on its own scale: an
    excess whose 90% CI lies inside ±margin is "equivalent within ±margin". A cosine quantity
    may follow the ceiling rule instead of a number: ``ceiling_fraction`` × the excess of the
    cell's positive control (IT seed 1 vs IT seed 2, else ICL vs reordered ICL) at the same
    null, centring and layer; a cell without a ceiling then claims no equivalence."""

    model_config = FROZEN

    raw: _CosineMargin = Field("ceiling", description="raw cosines' excess over a null")
    centred: _CosineMargin = Field("ceiling", description="centred cosines' excess (anchor or reference centring)")
    update: _CosineMargin = Field("ceiling", description="the update pair's excess (ICL − anchor vs IT − anchor)")
    agreement: Annotated[float, Strict(), Field(gt=0.0, le=1.0, allow_inf_nan=False)] = Field(
        0.05, description="prediction agreement's excess (a proportion)"
    )
    kl: Annotated[float, Strict(), Field(gt=0.0, allow_inf_nan=False)] = Field(
        0.05, description="KL divergence's excess (nats)"
    )
    between: Annotated[float, Strict(), Field(gt=0.0, le=1.0, allow_inf_nan=False)] = Field(
        0.02,
        description="between-cell contrasts (and two quantities of one cell): a difference of cosines, or of "
        "their excess over a null, on the cosine scale",
    )
    ceiling_fraction: Annotated[float, Strict(), Field(gt=0.0, le=1.0, allow_inf_nan=False)] = Field(
        0.25, description="the ceiling rule's fraction of the positive control's excess"
    )


class Factors(BaseModel):
    """factor -> the list of its values; a factor not listed keeps its base value (the
    top-level key of the same name)."""

    model_config = _PARTIAL

    k: Values[NonNegInt] = Field(_UNSET, description="demonstrations per resample")
    similarity: Values[SimilarityField] = Field(_UNSET, description="random, most or least similar demonstrations")
    wrong_labels: Values[Fraction] = Field(_UNSET, description="fractions of demonstrations given a wrong label")
    demo_task: Values[DemoTaskField] = Field(
        _UNSET, description="task of the demonstrations; null or 'same': the query's"
    )
    template: Values[NonEmptyStr] = Field(_UNSET, description="named templates of the task")
    instruction: Values[StrictBool] = Field(_UNSET, description="keep the template's instruction or not")
    model: Values[NonEmptyStr] = Field(_UNSET, description="models (each runs its cells in one stretch)")
    recipe: Values[_RecipeValue] = Field(
        _UNSET,
        description="IT recipes: 'base' (= `recipe`), a name in `recipes`, "
        "or a mapping of recipe fields laid over `recipe`",
    )


def parse_factors(v: Any) -> dict[str, tuple[Any, ...]]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise problem(f"must be a mapping of factor -> list of values, not {kind(v)}")
    parsed = Factors.model_validate(v)
    return {name: getattr(parsed, name) for name in v}  # in the order given


class TemplateFields(BaseModel):
    """Fields of the query template (``iclit.tasks.Template``) laid over the task's own; a
    data file's own is ``Input: {input}`` / ``Output: {answer}`` with no instruction. One
    demonstration renders as
    ``{instruction}{instruction_sep}{input_prefix}{input}{io_sep}{output_prefix}{answer_sep}{output}``."""

    model_config = _PARTIAL

    instruction: Annotated[Annotated[str, Strict()] | None, expect("a string or null")] = Field(
        None, description="the instruction that heads every prompt; null: none"
    )
    input_prefix: TextField = Field(_UNSET, description="text before each input (a data file's: 'Input: ')")
    output_prefix: TextField = Field(
        _UNSET, description="text after the input that ends the prompt (a data file's: 'Output:')"
    )
    io_sep: TextField = Field(_UNSET, description="between the input and the output prefix (default: a newline)")
    answer_sep: TextField = Field(_UNSET, description="between the output prefix and the answer (default: a space)")
    demo_sep: TextField = Field(_UNSET, description="between demonstrations (default: a blank line)")
    instruction_sep: TextField = Field(_UNSET, description="after the instruction (default: a blank line)")

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in type(self).model_fields if k in self.model_fields_set}


class TaskOptions(BaseModel):
    """How a data file becomes a task (``iclit compare --input-field …``), and its template.
    The file's fields and kind apply only to a data file; ``template`` to any task."""

    model_config = _PARTIAL

    input_field: NonEmptyStr = Field(_UNSET, description="the field holding the input (default: input)")
    output_field: NonEmptyStr = Field(_UNSET, description="the field holding the output (default: output)")
    id_field: NonEmptyStr = Field(_UNSET, description="the field holding example ids (default: FILE_STEM-N)")
    kind: Annotated[TaskKind, one_of(TASK_KINDS)] = Field(_UNSET, description="classification (default) or generation")
    labels: Annotated[
        tuple[NonEmptyStr, ...],
        Field(min_length=2),
        BeforeValidator(listed),
        expect("a list of at least two label words", as_kind=True),
    ] = Field(
        _UNSET,
        description="classification: the label words, in order "
        "(default: the verbalizer's words, else the sorted outputs)",
    )
    verbalizer: Annotated[
        dict[str, NonEmptyStr],
        BeforeValidator(lambda v: {str(k): x for k, x in v.items()} if isinstance(v, Mapping) else v),
        expect("a mapping of raw output -> label word", as_kind=True),
    ] = Field(_UNSET, description="raw output (compared as text) -> label word, e.g. {0: negative, 1: positive}")
    template: TemplateFields = Field(
        _UNSET, description="the task's template, laid over its own (selected by `template: default`)"
    )

    def to_dict(self) -> dict[str, Any]:
        """The options given, as plain data (what the cell's settings and the spec file hold)."""
        out = {k: plain(getattr(self, k)) for k in type(self).model_fields if k in self.model_fields_set}
        if self.template is not None:
            out["template"] = self.template.to_dict()
        return out

    def loader_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`iclit.tasks.get_task`."""
        out = {k: getattr(self, k) for k in type(self).model_fields if k in self.model_fields_set}
        if self.template is not None:
            out["template"] = self.template.to_dict()
        return out
