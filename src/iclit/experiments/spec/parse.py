"""Reading a spec: YAML text or a dict → :class:`ExperimentSpec`, or one :class:`SpecError`
with every problem, each at its key path and line.

The schema (the pydantic models) is checked first; the resources (models, tasks, templates
exist; k fits the task) after it, on what parsed: when the schema found problems, the keys
and factor values they are at are left out and the rest is checked too, so one pass reports
everything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from iclit.experiments.spec.model import ExperimentSpec
from iclit.experiments.spec.problems import SpecError, SpecProblem, line_map, line_of, problems_of
from iclit.experiments.spec.resources import resource_problems
from iclit.schema import kind

__all__ = ["parse_spec", "loads_spec", "load_spec"]


def parse_spec(
    data: Any, *, source: str | None = None, text: str | None = None, check_resources: bool = True
) -> ExperimentSpec:
    """A dict (e.g. parsed YAML) → :class:`ExperimentSpec`, or :class:`SpecError` listing every problem.

    ``text``: the YAML it was read from (for the problems' lines). ``check_resources``: also
    check that the models, tasks and templates exist and that every k fits the task (off:
    only the file's structure and types).
    """
    lines = line_map(text) if text is not None else {}
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SpecError([SpecProblem("", f"a spec must be a mapping of keys to values, not {kind(data)}")], source)
    try:
        spec = ExperimentSpec.model_validate(data)
    except ValidationError as e:
        found = problems_of(e, data, lines)
        if check_resources:  # also check what parsed well, so that one pass reports everything
            bad = {p.path for p in found}
            found += [p for p in _partial_resource_problems(data, e, lines) if p.path not in bad]
        raise SpecError(found, source) from None
    if check_resources:
        found = [SpecProblem(path, msg, line_of(path, lines)) for path, msg in resource_problems(spec)]
        if found:
            raise SpecError(found, source)
    return spec


def _partial_resource_problems(
    data: Mapping[str, Any], e: ValidationError, lines: Mapping[str, int]
) -> list[SpecProblem]:
    """The resource problems of ``data`` without the keys and factor values that have problems."""
    clean = dict(data)
    factors = data.get("factors") or {}
    kept: dict[str, list[int]] = {}  # factor -> places (in the file) of the values kept
    if isinstance(factors, Mapping):
        kept = {n: list(range(len(v))) for n, v in factors.items() if isinstance(v, (list, tuple))}
    errors: Sequence[Mapping[str, Any]] = e.errors(include_url=False)
    for _ in range(4):  # leaving a key out can show a problem that depended on it
        values: set[tuple[str, int]] = set()  # (factor, index in the list validated) to leave out
        for err in errors:
            loc = err["loc"]
            if not loc:
                return []
            if loc[0] != "factors":
                clean.pop(loc[0], None)
            elif len(loc) == 1:
                kept.clear()
            elif len(loc) < 3 or not isinstance(loc[2], int):
                kept.pop(loc[1], None)
            else:
                values.add((loc[1], loc[2]))
        kept = {n: [i for j, i in enumerate(places) if (n, j) not in values] for n, places in kept.items()}
        kept = {n: places for n, places in kept.items() if places}
        clean["factors"] = {n: [factors[n][i] for i in places] for n, places in kept.items()}
        try:
            spec = ExperimentSpec.model_validate(clean)
        except ValidationError as again:
            errors = again.errors(include_url=False)
            continue
        try:
            found = resource_problems(spec, kept)
        except Exception:  # a best-effort pass: never hide the problems already found
            return []
        return [SpecProblem(path, msg, line_of(path, lines)) for path, msg in found]
    return []


def load_spec(path: str | Path, *, check_resources: bool = True) -> ExperimentSpec:
    """Read and validate a YAML spec; :class:`SpecError` lists every problem with its path and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError([SpecProblem("", f"cannot read the spec: {e.strerror or e}")], str(path)) from None
    except UnicodeDecodeError as e:
        raise SpecError(
            [SpecProblem("", f"not a text file (byte {e.start} is not UTF-8): a spec is a YAML text file")], str(path)
        ) from None
    return loads_spec(text, source=str(path), check_resources=check_resources)


def loads_spec(text: str, *, source: str | None = None, check_resources: bool = True) -> ExperimentSpec:
    """A spec from YAML text (see :func:`load_spec`)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(
            [SpecProblem("", f"not valid YAML: {problem}", mark.line + 1 if mark else None)], source
        ) from None
    return parse_spec(data, source=source, text=text, check_resources=check_resources)
