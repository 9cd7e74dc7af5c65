"""Constrained field types for iclit's typed configs (the experiment spec, the IT recipe).

Each type carries its JSON-schema constraints and a failure that reads as a user message
(``must be a positive integer, not 0``), so pydantic's errors need no rewording downstream.
Torch-free: the spec and ``iclit --help`` import it.

A failure is a :class:`~pydantic_core.PydanticCustomError` of type ``"iclit"``; its context
holds ``what`` (the expectation) and ``got`` (the value as shown), and its message may be
a wording of its own (the recipe's ``tuning epochs must be >= 1, not 0``): a spec reports
``must be {what}, not {got}`` at the key's path, a direct constructor the message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any

from pydantic import Field, Strict, ValidationError, WrapValidator
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = [
    "ERROR_TYPE",
    "kind",
    "shown",
    "expect",
    "problem",
    "raise_problems",
    "distinct",
    "unset_defaults",
    "PosInt",
    "parse_bytes",
    "NonNegInt",
    "Fraction",
    "NonEmptyStr",
    "StrictBool",
]

ERROR_TYPE = "iclit"


def kind(v: Any) -> str:
    """A value's kind in YAML words: ``an integer``, ``a list``, ``null``, …"""
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)) and not v:
        return "an empty list"
    for t, name in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        ((list, tuple), "a list"),
        (dict, "a mapping"),
    ):
        if isinstance(v, t):
            return name
    return type(v).__name__


def shown(v: Any) -> str:
    """A value as an error message shows it: scalars by their repr, containers by their kind."""
    if isinstance(v, (str, int, float)):  # bool too: True
        return repr(v)
    return kind(v)


def expect(what: str | None = None, *, message: str | None = None, as_kind: bool = False) -> WrapValidator:
    """Reword a failure of the wrapped type itself as one user message (an item's failure, or
    one already worded, passes through).

    what: the expectation (``a positive integer``); message: a template of its own, with
    ``{what}``, ``{got}`` and ``{field}`` (the field's name); as_kind: show the bad value by
    its kind (``an integer``), not its repr.
    """
    template = message or "must be {what}, not {got}"

    def wrap(v: Any, handler: Any, info: Any) -> Any:
        try:
            return handler(v)
        except ValidationError as e:
            if not any(err["loc"] == () and err["type"] != ERROR_TYPE for err in e.errors()):
                raise  # an item's problem (reported at the item), or a message of its own already
            ctx = {"got": kind(v) if as_kind else shown(v), "field": info.field_name or ""}
            if what is not None:
                ctx["what"] = what
            raise PydanticCustomError(ERROR_TYPE, template, ctx) from None

    return WrapValidator(wrap)


def problem(message: str) -> PydanticCustomError:
    """A failure with a finished message (no context: braces in it are kept as they are)."""
    return PydanticCustomError(ERROR_TYPE, message)


def raise_problems(
    title: str, found: Iterable[tuple[Sequence[str | int], str, Any]], along: ValidationError | None = None
) -> None:
    """Raise one ValidationError with every ``(location, message, input)`` found and the
    errors of ``along`` (a validation that failed); nothing if there are none.

    Inside a validator the locations are relative to the value it validates."""
    details = [InitErrorDetails(type=problem(msg), loc=tuple(loc), input=value) for loc, msg, value in found]
    if along is not None:
        details = [*_details(along), *details]
    if details:
        raise ValidationError.from_exception_data(title, details)


def _details(e: ValidationError) -> list[InitErrorDetails]:
    """A ValidationError's errors as details to raise again (custom ones keep their context)."""
    out = []
    for err in e.errors(include_url=False):
        ctx = err.get("ctx")
        if err["type"] == ERROR_TYPE:
            out.append(
                InitErrorDetails(
                    type=PydanticCustomError(ERROR_TYPE, err["msg"], ctx), loc=err["loc"], input=err["input"]
                )
            )
        else:
            details = InitErrorDetails(type=err["type"], loc=err["loc"], input=err["input"])
            if ctx:
                details["ctx"] = ctx
            out.append(details)
    return out


def _canonical(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _has_twice(values: Any, key: Callable[[Any], Any]) -> bool:
    if not isinstance(values, (list, tuple)):
        return False
    keys = [key(v) for v in values]
    return len(set(keys)) != len(keys)


def distinct(what: str, key: Callable[[Any], Any] = _canonical) -> WrapValidator:
    """A list whose items must differ (``lists {what} twice``), reported beside its items' problems."""

    def wrap(v: Any, handler: Any) -> Any:
        try:
            out = handler(v)
        except ValidationError as e:
            if _has_twice(v, key):
                raise_problems(e.title, [((), f"lists {what} twice", v)], along=e)
            raise
        if _has_twice(out, key):
            raise problem(f"lists {what} twice")
        return out

    return WrapValidator(wrap)


def unset_defaults(schema: dict[str, Any]) -> None:
    """``json_schema_extra`` of a model whose fields are unset unless given (a recipe laid
    over another, the factors): no ``default: null`` beside a type that is not nullable."""
    for prop in schema.get("properties", {}).values():
        if prop.get("default", 0) is None:
            del prop["default"]


PosInt = Annotated[int, Strict(), Field(ge=1), expect("a positive integer")]
NonNegInt = Annotated[int, Strict(), Field(ge=0), expect("an integer >= 0")]
Fraction = Annotated[float, Strict(), Field(ge=0.0, le=1.0, allow_inf_nan=False), expect("a number in [0, 1]")]
NonEmptyStr = Annotated[str, Strict(), Field(min_length=1, pattern=r"\S"), expect("a non-empty string")]
StrictBool = Annotated[bool, Strict(), expect(message="must be true or false, not {got}")]


_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kb": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mb": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gb": 2**30,
    "gib": 2**30,
    "t": 2**40,
    "tb": 2**40,
    "tib": 2**40,
}


def parse_bytes(value: str | int | float) -> int:
    """``"8GiB"``, ``"512 MB"``, ``2e9`` → bytes (binary units for K/M/G/T)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"a memory size is a number with an optional unit (e.g. 8GiB, 512MB), not {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
