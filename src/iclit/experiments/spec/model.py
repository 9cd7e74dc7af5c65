"""The typed spec: :class:`ExperimentSpec`, a pydantic model.

Its fields (:class:`~iclit.experiments.spec.fields.SpecFields`), with the models of their
values (:mod:`~iclit.experiments.spec.values`) and the recipe (:class:`~iclit.tuning.TuningRecipe`),
are the single source of a spec's keys, types, defaults, allowed values and documentation: the
Field descriptions are the user docs (``iclit spec-schema``, configs/README.md). This module adds
the checks that span keys, in validators that see the keys validated before them, so they are
reported beside every other problem; the conversions (dict, YAML); and what the plan reads.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator

from iclit.experiments.spec.fields import SpecFields
from iclit.experiments.spec.problems import SpecError, problems_of
from iclit.experiments.spec.values import ANALYSIS_NAMES, REQUIRED_ARMS, FactorValue, plain, recipe_label
from iclit.schema import parse_bytes, problem, raise_problems
from iclit.tuning.recipe import RecipeError, TuningRecipe, recipe_overrides

__all__ = ["ExperimentSpec"]


class ExperimentSpec(SpecFields):
    """A validated experiment: what is fixed, what varies, how to run it.

    Build it from YAML with :func:`load_spec` / :func:`parse_spec`, or in Python (the schema
    is checked at once, :class:`SpecError`) and call :meth:`validate` to also check that the
    models, tasks and templates exist (the runner does). Fields: ``iclit spec-schema``.
    """

    _recipes: dict[str, tuple[str, TuningRecipe]] = PrivateAttr(default_factory=dict)

    # --- checks that span keys (each at its key's path, beside every other problem) -----

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
