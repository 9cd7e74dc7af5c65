"""A spec's problems: where (the key path and the line of the YAML file) and what.

pydantic reports an error at a location, a tuple of keys and list indices (``('factors',
'k', 2)``); :func:`problems_of` walks that location through the data as given to name the
path as the file spells it (``factors.k[2]``: a mapping's key after a dot, a list's index in
brackets) and looks the path up in the file's line map (:func:`line_map`), falling back to
the nearest enclosing key that has a line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from iclit.schema import ERROR_TYPE

__all__ = ["SpecProblem", "SpecError", "line_map", "line_of", "path_of", "problems_of"]


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
        super().__init__(
            f"{head}{n} problem{'s' if n != 1 else ''} in the spec:\n" + "\n".join(f"  {p}" for p in self.problems)
        )


def line_map(text: str) -> dict[str, int]:
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


def line_of(path: str, lines: Mapping[str, int]) -> int | None:
    """The line of ``path``, else of the nearest enclosing node that has one."""
    p = path
    line = lines.get(p)
    while p and line is None:
        p = p.rsplit("[", 1)[0] if p.endswith("]") else (p.rsplit(".", 1)[0] if "." in p else "")
        line = lines.get(p)
    return line


_TAGS = ("number", "mapping")


def path_of(loc: Sequence[Any], data: Any) -> tuple[str, tuple[Any, ...]]:
    """(path as the file spells it, the part of ``loc`` found in ``data``) of an error location.

    Parts of a location that are not in the data (``[key]`` for a mapping key's own error, a
    list made of one string) end the walk: the path is the deepest node the data has."""
    text, found, node = "", [], data
    for part in loc:
        if part in _TAGS and not (isinstance(node, Mapping) and part in node):
            continue  # a tagged union's branch (equivalence_margin: a number or a mapping)
        if isinstance(node, Mapping) and part in node:
            text = f"{text}.{part}" if text else str(part)
        elif isinstance(node, (list, tuple)) and isinstance(part, int) and 0 <= part < len(node):
            text = f"{text}[{part}]"
        else:
            break
        found.append(part)
        node = node[part]
    return text, tuple(found)


def _unknown(parent: tuple[Any, ...]) -> str:
    from iclit.experiments.spec.model import ExperimentSpec
    from iclit.experiments.spec.values import FACTORS, TaskOptions, TemplateFields
    from iclit.tuning.recipe import FIELDS

    if not parent:
        return f"unknown key (keys: {', '.join(sorted(ExperimentSpec.model_fields))})"
    if parent == ("equivalence_margin",):
        from iclit.experiments.spec.values import EquivalenceMargins

        return f"unknown margin quantity (quantities: {', '.join(EquivalenceMargins.model_fields)})"
    if parent == ("factors",):
        return f"unknown factor (factors: {', '.join(FACTORS)})"
    if parent == ("task_options",):
        return f"unknown task option (options: {', '.join(TaskOptions.model_fields)})"
    if parent == ("task_options", "template"):
        return f"unknown template field (fields: {', '.join(TemplateFields.model_fields)})"
    if parent and parent[0] == "cluster":
        from iclit.experiments.spec.cluster import ClusterOptions, SlurmOptions

        fields = SlurmOptions.model_fields if parent[1:] == ("slurm",) else ClusterOptions.model_fields
        return f"unknown {'.'.join(map(str, parent))} key (keys: {', '.join(fields)})"
    return f"unknown recipe field (fields: {', '.join(FIELDS)})"


def message_of(err: Mapping[str, Any], parent: tuple[Any, ...] = ()) -> str:
    """A pydantic error as the spec words it."""
    ctx = err.get("ctx") or {}
    if err["type"] == ERROR_TYPE and "what" in ctx:
        return f"must be {ctx['what']}, not {ctx['got']}"
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return _unknown(parent)
    return str(err["msg"])


def problems_of(e: ValidationError, data: Any, lines: Mapping[str, int] | None = None) -> list[SpecProblem]:
    """Every error of a validation as a :class:`SpecProblem` with its path and line."""
    out = []
    for err in e.errors(include_url=False):
        path, found = path_of(err["loc"], data)
        out.append(SpecProblem(path, message_of(err, found[:-1]), line_of(path, lines or {})))
    return out
