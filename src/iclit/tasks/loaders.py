"""Loading user task data: JSONL, CSV, Parquet files and Hugging Face datasets.

Every problem a user can fix is a :class:`TaskDataError` whose message names the file, the
line (or row) as an editor shows it, the field and the bad value, e.g.::

    data/x.jsonl line 7: missing field 'text'
    data/x.csv line 3: field 'label' value 'neutral' is not one of the labels ['negative', 'positive']

Line numbers are 1-based. In a CSV file the header is line 1, so the first data row is
line 2. Parquet files and datasets have no lines; their records are counted as ``row N``
(1-based).

Values are converted with ``str()`` (an integer label ``1`` becomes ``"1"``, a float that
is a whole number such as ``1.0`` becomes ``"1"``) and stripped of surrounding whitespace.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import Example, Task, TaskKind, Template

__all__ = [
    "TaskDataError",
    "SUPPORTED_EXTENSIONS",
    "DEFAULT_TEMPLATE",
    "load_examples",
    "load_task",
    "load_hf_dataset",
    "check_enough",
]

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".jsonl", ".json", ".ndjson", ".csv", ".parquet")
DEFAULT_TEMPLATE = Template(input_prefix="Input: ", output_prefix="Output:")
_KINDS: tuple[str, ...] = ("classification", "generation")


class TaskDataError(ValueError):
    """A problem with task data that the user can fix (the message says where and what)."""


# A record is (location, fields): location is "line 7" / "row 3" or "" when unknown.
_Record = tuple[str, Mapping[str, Any]]


def _fail(where: str, loc: str, msg: str) -> TaskDataError:
    return TaskDataError(f"{where} {loc}: {msg}" if loc else f"{where}: {msg}")


def _read_jsonl(path: Path) -> Iterator[_Record]:
    """JSON Lines; blank lines are skipped. A ``.json`` file holding one array also works."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise _fail(str(path), "", f"not UTF-8 text ({e})") from None
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise _fail(str(path), f"line {e.lineno}", f"not valid JSON ({e.msg})") from None
        for i, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                raise _fail(str(path), f"row {i}", f"expected a JSON object, got {type(row).__name__}")
            yield f"row {i}", row
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(str(path), f"line {lineno}", f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise _fail(str(path), f"line {lineno}", f"expected a JSON object, got {type(row).__name__}")
        yield f"line {lineno}", row


def _read_csv(path: Path, required: Sequence[str]) -> Iterator[_Record]:
    """CSV with a header line; every value stays a string (no type guessing)."""
    where = str(path)
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            for name in required:
                if name not in header:
                    raise _fail(where, "line 1", f"header has no column {name!r} (columns: {header})")
            end = reader.line_num
            for row in reader:
                start, end = end + 1, reader.line_num
                if not row or all(not v.strip() for v in row):
                    continue
                if len(row) != len(header):
                    raise _fail(where, f"line {start}", f"has {len(row)} values but the header has {len(header)}")
                yield f"line {start}", dict(zip(header, row, strict=True))
    except UnicodeDecodeError as e:
        raise _fail(where, "", f"not UTF-8 text ({e})") from None
    except csv.Error as e:
        raise _fail(where, "", f"not valid CSV ({e})") from None


def _read_parquet(path: Path, required: Sequence[str]) -> Iterator[_Record]:
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise _fail(str(path), "", f"not a readable Parquet file ({e})") from None
    columns = [str(c) for c in df.columns]
    for name in required:
        if name not in columns:
            raise _fail(str(path), "", f"has no column {name!r} (columns: {columns})")
    for i, row in enumerate(df.to_dict("records"), start=1):
        yield f"row {i}", {str(k): v for k, v in row.items()}


def _read_file(path: Path, required: Sequence[str]) -> list[_Record]:
    if not path.is_file():
        raise TaskDataError(f"{path}: file not found")
    ext = path.suffix.lower()
    if ext in (".jsonl", ".json", ".ndjson"):
        return list(_read_jsonl(path))
    if ext == ".csv":
        return list(_read_csv(path, required))
    if ext == ".parquet":
        return list(_read_parquet(path, required))
    raise TaskDataError(
        f"{path}: unsupported file extension {ext or '(none)'!r} (use one of {', '.join(SUPPORTED_EXTENSIONS)})"
    )


def _is_missing(value: Any) -> bool:
    if value is None or type(value).__name__ == "NAType":  # None, pandas.NA
        return True
    try:
        return isinstance(value, float) and math.isnan(value)
    except TypeError:
        return False


def _to_str(value: Any) -> str:
    """``str()`` of a value, with whole-number floats (pandas' int columns with gaps) as ints."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()  # numpy scalar -> python scalar
        except (TypeError, ValueError):
            pass
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _plain(value: Any) -> Any:
    """A meta value as a plain python object (numpy scalars unwrapped)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


def _examples_from_records(
    records: Iterable[_Record],
    where: str,
    *,
    input_field: str,
    output_field: str,
    id_field: str | None,
    verbalizer: Mapping[Any, str] | None,
    labels: Sequence[str] | None,
    meta_fields: Sequence[str] | None,
    id_stem: str,
    empty: str = "file is empty",
) -> list[Example]:
    verb = {str(k).strip(): str(v) for k, v in verbalizer.items()} if verbalizer is not None else None
    allowed = [str(x) for x in labels] if labels is not None else None
    used = {input_field, output_field} | ({id_field} if id_field else set())
    examples: list[Example] = []
    seen: dict[str, str] = {}

    def field_value(loc: str, row: Mapping[str, Any], name: str) -> str:
        if name not in row:
            raise _fail(where, loc, f"missing field {name!r}")
        value = row[name]
        if _is_missing(value) or not _to_str(value):
            raise _fail(where, loc, f"field {name!r} is empty")
        return _to_str(value)

    for n, (loc, row) in enumerate(records, start=1):
        text = field_value(loc, row, input_field)
        raw = field_value(loc, row, output_field)
        output = raw
        if verb is not None:
            if raw not in verb:
                raise _fail(
                    where, loc, f"field {output_field!r} value {raw!r} is not in the verbalizer (keys: {sorted(verb)})"
                )
            output = verb[raw]
        if allowed is not None and output not in allowed:
            shown = f"{output!r} (verbalised from {raw!r})" if output != raw else repr(output)
            raise _fail(where, loc, f"field {output_field!r} value {shown} is not one of the labels {allowed}")
        ex_id = field_value(loc, row, id_field) if id_field else f"{id_stem}-{n}"
        if ex_id in seen:
            raise _fail(where, loc, f"field {id_field!r} value {ex_id!r} is a duplicate (first on {seen[ex_id]})")
        seen[ex_id] = loc or f"record {n}"
        if meta_fields is None:
            meta = {k: _plain(v) for k, v in row.items() if k not in used}
        else:
            missing = [m for m in meta_fields if m not in row]
            if missing:
                raise _fail(where, loc, f"missing field {missing[0]!r}")
            meta = {m: _plain(row[m]) for m in meta_fields}
        examples.append(Example(id=ex_id, input=text, output=output, meta=meta))
    if not examples:
        raise TaskDataError(f"{where}: {empty}")
    return examples


def load_examples(
    path: str | Path,
    *,
    input_field: str,
    output_field: str,
    id_field: str | None = None,
    verbalizer: Mapping[Any, str] | None = None,
    labels: Sequence[str] | None = None,
    meta_fields: Sequence[str] | None = None,
) -> list[Example]:
    """Read examples from a ``.jsonl``/``.json``/``.ndjson``, ``.csv`` or ``.parquet`` file.

    Args:
        input_field, output_field: the fields holding the input text and the output.
        id_field: the field holding the example id; without it ids are ``{stem}-{n}``
            (``n`` counts examples from 1).
        verbalizer: maps raw outputs (compared as strings, e.g. ``{"0": "negative"}``)
            to label words; a raw output not in it is an error.
        labels: if given, every (verbalised) output must be one of them.
        meta_fields: fields kept in ``Example.meta``; ``None`` keeps all the other fields,
            ``()`` keeps none.
    """
    path = Path(path)
    required = [input_field, output_field] + ([id_field] if id_field else [])
    records = _read_file(path, required)
    return _examples_from_records(
        records,
        str(path),
        input_field=input_field,
        output_field=output_field,
        id_field=id_field,
        verbalizer=verbalizer,
        labels=labels,
        meta_fields=meta_fields,
        id_stem=path.stem,
    )


def _make_task(
    examples: list[Example],
    where: str,
    *,
    name: str,
    kind: str,
    labels: Sequence[str] | None,
    verbalizer: Mapping[Any, str] | None,
    template: Template | None,
    description: str,
    source: str,
) -> Task:
    if kind not in _KINDS:
        raise TaskDataError(f"{where}: unknown task kind {kind!r} (use one of {list(_KINDS)})")
    task_labels: tuple[str, ...] | None = None
    if kind == "classification":
        if labels is not None:
            task_labels = tuple(str(x) for x in labels)
        elif verbalizer is not None:
            task_labels = tuple(dict.fromkeys(str(v) for v in verbalizer.values()))
        else:
            task_labels = tuple(sorted({e.output for e in examples}))
        if len(task_labels) < 2:
            raise TaskDataError(
                f"{where}: a classification task needs at least 2 labels, found {list(task_labels)} "
                "(pass kind='generation' for free-text outputs)"
            )
    elif labels is not None:
        raise TaskDataError(f"{where}: labels apply only to classification tasks, not {kind!r}")
    kind_: TaskKind = "classification" if kind == "classification" else "generation"
    return Task(
        name=name,
        kind=kind_,
        examples=tuple(examples),
        template=template if template is not None else DEFAULT_TEMPLATE,
        labels=task_labels,
        description=description,
        source=source,
    )


def load_task(
    path: str | Path,
    *,
    name: str | None = None,
    kind: str = "classification",
    input_field: str = "input",
    output_field: str = "output",
    id_field: str | None = None,
    labels: Sequence[str] | None = None,
    verbalizer: Mapping[Any, str] | None = None,
    template: Template | None = None,
    meta_fields: Sequence[str] | None = None,
) -> Task:
    """Load a :class:`Task` from a file (see :func:`load_examples` for the fields).

    For a classification task without ``labels`` the labels are the verbalizer's words (in
    its order) or else the sorted set of outputs; fewer than 2 is an error. The template
    defaults to :data:`DEFAULT_TEMPLATE` (``Input: …`` / ``Output:``, no instruction).
    """
    path = Path(path)
    if kind not in _KINDS:
        raise TaskDataError(f"{path}: unknown task kind {kind!r} (use one of {list(_KINDS)})")
    examples = load_examples(
        path,
        input_field=input_field,
        output_field=output_field,
        id_field=id_field,
        verbalizer=verbalizer,
        labels=labels if kind == "classification" else None,
        meta_fields=meta_fields,
    )
    return _make_task(
        examples,
        str(path),
        name=name or path.stem,
        kind=kind,
        labels=labels,
        verbalizer=verbalizer,
        template=template,
        description=f"loaded from {path}",
        source=str(path),
    )


def load_hf_dataset(
    name: str,
    *,
    split: str = "train",
    config: str | None = None,
    input_field: str,
    output_field: str,
    id_field: str | None = None,
    kind: str = "classification",
    labels: Sequence[str] | None = None,
    verbalizer: Mapping[Any, str] | None = None,
    template: Template | None = None,
    meta_fields: Sequence[str] | None = None,
    task_name: str | None = None,
) -> Task:
    """Load a :class:`Task` from a Hugging Face dataset (needs ``datasets`` and network).

    If the output column is a ``ClassLabel`` and no verbalizer is given, its names are used
    as the verbalizer (``0 -> names[0]``, …).
    """
    where = f"dataset {name!r}" + (f" ({config})" if config else "") + f" split {split!r}"
    try:
        import datasets
    except ImportError:
        raise TaskDataError(
            f"{where}: loading Hugging Face datasets needs the 'datasets' library: "
            "pip install datasets (it downloads the data, so it needs network access)"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, unknown name, bad split: all user-fixable
        raise TaskDataError(f"{where}: could not load ({type(e).__name__}: {e})") from None
    columns = list(ds.column_names)
    for col in [input_field, output_field] + ([id_field] if id_field else []):
        if col not in columns:
            raise TaskDataError(f"{where}: has no column {col!r} (columns: {columns})")
    if verbalizer is None:
        feature = ds.features.get(output_field)
        names = getattr(feature, "names", None)
        if names:
            verbalizer = {str(i): str(n) for i, n in enumerate(names)}
    records = ((f"row {i}", row) for i, row in enumerate(ds, start=1))
    examples = _examples_from_records(
        records,
        where,
        input_field=input_field,
        output_field=output_field,
        id_field=id_field,
        verbalizer=verbalizer,
        labels=labels if kind == "classification" else None,
        meta_fields=meta_fields,
        id_stem=name.rsplit("/", 1)[-1],
        empty="has no examples",
    )
    return _make_task(
        examples,
        where,
        name=task_name or name.rsplit("/", 1)[-1],
        kind=kind,
        labels=labels,
        verbalizer=verbalizer,
        template=template,
        description=f"Hugging Face dataset {name}" + (f" ({config})" if config else "") + f", split {split}",
        source=f"hf:{name}" + (f":{config}" if config else "") + f":{split}",
    )


def check_enough(task: Task, k: int, path_hint: str | None = None) -> None:
    """Raise :class:`TaskDataError` unless ``task`` has ``k`` demonstrations plus a query."""
    n = len(task.examples)
    if n < k + 1:
        where = path_hint or (task.source if task.source != "builtin" else f"task {task.name!r}")
        raise TaskDataError(f"{where}: needs at least k+1 = {k + 1} examples ({k} demonstrations + 1 query), found {n}")
