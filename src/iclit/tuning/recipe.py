"""The IT recipe and a tuning run's result: plain data, no torch (the spec and ``iclit --help``
import this without loading torch or transformers).

:class:`TuningRecipe` is a frozen pydantic dataclass: its fields' types, defaults and
descriptions are the schema of a spec's ``recipe:`` (and of ``iclit spec-schema``), and it
stays a dataclass for ``dataclasses.replace`` / ``asdict`` / ``fields``, which validate too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic.dataclasses import dataclass, is_pydantic_dataclass

from iclit.schema import ERROR_TYPE, expect, kind, problem, unset_defaults

__all__ = ["TuningRecipe", "TuningResult", "RecipeError", "RecipeOverrides", "recipe_overrides"]


class RecipeError(ValueError):
    """An invalid recipe built in Python: ``TuningRecipe(epochs=0)``, ``dataclasses.replace(...)``.

    ``messages``: one line per problem (``tuning epochs must be >= 1, not 0``)."""

    def __init__(self, messages: list[str]) -> None:
        self.messages = messages
        super().__init__("; ".join(messages))


def _one_or_list(v: Any) -> Any:
    return [v] if isinstance(v, (str, int)) and not isinstance(v, bool) else v


def _steps(v: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(set(v)))


def _tuning(what: str, rule: str) -> Any:
    """A recipe field's failure: ``must be {what}`` in a spec, ``tuning {field} {rule}`` in Python."""
    return expect(what, message="tuning {field} " + rule + ", not {got}")


_Method = Annotated[
    Literal["lora", "full"], expect("one of lora, full", message="tuning method must be 'lora' or 'full', not {got}")
]
_Count = Annotated[int, Strict(), Field(ge=1), _tuning("a positive integer", "must be >= 1")]
_Positive = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False), _tuning("a positive number", "must be > 0")]
_Step = Annotated[int, Strict(), Field(ge=1), _tuning("an integer >= 1", "must be >= 1")]
_Module = Annotated[str, Strict(), Field(min_length=1), expect("a module name")]


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class TuningRecipe:
    """How the IT arm tunes the base model on the k demonstrations.

    The defaults (LoRA r=8, alpha=16 on q/v, lr 1e-3, 12 full-batch epochs) fit k = 4
    sentiment demonstrations on Gemma-3-270M to a final answer loss of about 1e-3 or less on
    every resample (higher learning rates were unstable, fewer epochs left some resamples
    above 0.02); the per-resample final loss is reported with every run.
    """

    method: Annotated[
        _Method,
        Field(
            description="lora: a fresh LoRA adapter on `targets` (the paper's choice); "
            "full: all weights of a fresh copy"
        ),
    ] = "lora"
    rank: Annotated[_Count, Field(description="LoRA rank")] = 8
    alpha: Annotated[_Positive, Field(description="LoRA alpha (the update is scaled by alpha / rank)")] = 16.0
    dropout: Annotated[
        float,
        Strict(),
        Field(ge=0, lt=1, description="LoRA dropout"),
        _tuning("a number in [0, 1)", "must be in [0, 1)"),
    ] = 0.0
    targets: Annotated[
        tuple[_Module, ...],
        Field(min_length=1, description="modules that get a LoRA adapter (one name: a list of one)"),
        BeforeValidator(_one_or_list, json_schema_input_type=_Module | Annotated[list[_Module], Field(min_length=1)]),
        expect("a non-empty list of module names"),
    ] = ("q_proj", "v_proj")
    lr: Annotated[
        Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)] | None,
        Field(description="learning rate; null: 1e-3 for LoRA, 1e-5 for full fine-tuning"),
        _tuning("a positive number or null", "must be > 0"),
    ] = None
    epochs: Annotated[_Count, Field(description="passes over the k demonstrations")] = 12
    batch_size: Annotated[
        int,
        Strict(),
        Field(ge=0, description="demonstrations per optimiser step; 0: all of them (one epoch is one step)"),
        _tuning("an integer >= 0", "must be >= 0"),
    ] = 0
    max_grad_norm: Annotated[_Positive, Field(description="gradients are clipped to this norm")] = 1.0
    weight_decay: Annotated[
        float,
        Strict(),
        Field(ge=0, allow_inf_nan=False, description="AdamW weight decay"),
        _tuning("a number >= 0", "must be >= 0"),
    ] = 0.0
    capture_steps: Annotated[
        tuple[_Step, ...],
        Field(
            description="optimiser steps (1-based) after which the IT arm also reads the tuned model's states and "
            "answers, so one training run gives the whole dose curve; empty: only the end of training"
        ),
        BeforeValidator(_one_or_list, json_schema_input_type=_Step | list[_Step]),
        AfterValidator(_steps),
        expect("a list of optimiser steps (integers >= 1)"),
    ] = ()

    @model_validator(mode="after")
    def _steps_fit(self) -> TuningRecipe:
        if self.batch_size == 0 and self.capture_steps and self.capture_steps[-1] > self.epochs:
            raise problem(
                f"tuning capture_steps {list(self.capture_steps)} go past the last step: {self.epochs} "
                f"full-batch epochs are {self.epochs} optimiser steps"
            )
        return self

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.method == "lora" else 1e-5

    def replace(self, **changes: Any) -> TuningRecipe:
        """A copy with ``changes`` (validated), like ``dataclasses.replace``."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        d["lr"] = self.learning_rate
        if self.capture_steps:
            d["capture_steps"] = list(self.capture_steps)
        else:  # absent when unused, so trial keys of plain recipes stay as they were
            del d["capture_steps"]
        return d


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TuningRecipe))


def _messages(e: ValidationError) -> list[str]:
    out = []
    for err in e.errors(include_url=False):
        if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            out.append(f"unknown recipe field {err['loc'][0]!r} (fields: {', '.join(FIELDS)})")
        elif err["type"] == ERROR_TYPE or not err["loc"]:
            out.append(err["msg"])
        else:
            out.append(f"tuning {'.'.join(map(str, err['loc']))}: {err['msg']}")
    return out


_validating_init = TuningRecipe.__init__


def __init__(self: TuningRecipe, *args: Any, **kwargs: Any) -> None:  # one readable line per problem
    try:
        _validating_init(self, *args, **kwargs)
    except ValidationError as e:
        raise RecipeError(_messages(e)) from None


# deliberate: replacing __init__ keeps pydantic's typed field signature for callers (a spec validates
# through the schema, not __init__)
TuningRecipe.__init__ = __init__  # type: ignore[method-assign]


def _override_fields() -> dict[str, Any]:
    recipe = TuningRecipe
    assert is_pydantic_dataclass(recipe)  # narrows it to a type with __pydantic_fields__
    return {
        name: (Annotated[fi.annotation, *fi.metadata], Field(None, description=fi.description))
        for name, fi in recipe.__pydantic_fields__.items()
    }


RecipeOverrides: type[BaseModel] = create_model(
    "RecipeOverrides",
    __config__=ConfigDict(extra="forbid", frozen=True, json_schema_extra=unset_defaults),
    __doc__="Fields of a TuningRecipe laid over the spec's `recipe` (a named recipe, an inline `recipe` factor value).",
    **_override_fields(),
)
"""Every field of :class:`TuningRecipe`, none required and none defaulted: what a named recipe
or an inline ``recipe`` factor value changes."""


def recipe_overrides(data: Any) -> dict[str, Any]:
    """The recipe fields a mapping sets, validated and in its order (raises ValidationError)."""
    if not isinstance(data, Mapping):
        raise problem(f"must be a mapping of recipe fields ({', '.join(FIELDS)}), not {kind(data)}")
    parsed = RecipeOverrides.model_validate(data)
    return {k: getattr(parsed, k) for k in data if k in parsed.model_fields_set}


@dataclasses.dataclass
class TuningResult:
    """losses: the training loss at each optimiser step; final_loss: the answer loss of the
    tuned model on all demonstrations after the last step."""

    losses: list[float] = dataclasses.field(default_factory=list)
    final_loss: float = float("nan")
    seconds: float = 0.0
