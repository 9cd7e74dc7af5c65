"""Recorded timings as data: the performance tables of the documentation, from one CSV file.

Every benchmark and timing run the project reports is one row of
``benchmarks/results/runs.csv`` (columns :data:`COLUMNS`); :func:`performance_table` renders
them as Markdown, one table per kind of run (``what``), newest first. The documentation site
builds its performance page with it, so a timing is stated once, with its date and machine.

Only the standard library: no torch, no pandas.
"""

from __future__ import annotations

import csv
import re
from datetime import date
from pathlib import Path

__all__ = ["COLUMNS", "RunsFileError", "read_runs", "performance_table"]

COLUMNS = ("date", "what", "command", "machine", "gflops", "wall_s", "compute_s", "peak_rss_gib", "ratio", "note")
"""The columns of a runs file, in order.

date: ``YYYY-MM-DD`` of the run; what: the kind of run (one table per value); command: what
was run; machine: a description; gflops: a 2048² fp32 matrix multiply measured on the machine
in that session (GFLOP/s, one number or a range ``a–b``; empty where it was not measured);
wall_s: wall-clock seconds (for a benchmark comparison: iclit's side); compute_s: seconds of
compute the run itself recorded; peak_rss_gib: peak resident memory, GiB; ratio: the speedup
(or the stated ratio) the run printed; note: anything a reader needs to compare the row.
"""

_REQUIRED = ("date", "what", "command", "machine")
_NUMBERS = ("wall_s", "compute_s", "peak_rss_gib", "ratio")
_RANGE = re.compile(r"^\d+(\.\d+)?(–\d+(\.\d+)?)?$")
_HEADERS = {
    "date": "date",
    "command": "command",
    "machine": "machine",
    "gflops": "matmul GFLOP/s",
    "wall_s": "wall",
    "compute_s": "compute",
    "peak_rss_gib": "peak RSS",
    "ratio": "ratio",
    "note": "note",
}


class RunsFileError(ValueError):
    """A runs file that does not follow :data:`COLUMNS` (the message names the line and column)."""


def read_runs(path: str | Path) -> list[dict[str, str]]:
    """The rows of a runs file, checked: the header is :data:`COLUMNS`, every row has a date,
    a kind, a command and a machine, and the numeric columns are numbers (or empty)."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise RunsFileError(
                f"{path}: the header must be {','.join(COLUMNS)}, not {','.join(reader.fieldnames or ())}"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            if None in row or any(v is None for v in row.values()):
                raise RunsFileError(f"{path}:{line}: expected {len(COLUMNS)} fields")
            row = {k: v.strip() for k, v in row.items()}
            for key in _REQUIRED:
                if not row[key]:
                    raise RunsFileError(f"{path}:{line}: {key} is empty")
            try:
                date.fromisoformat(row["date"])
            except ValueError:
                raise RunsFileError(f"{path}:{line}: date {row['date']!r} is not YYYY-MM-DD") from None
            for key in _NUMBERS:
                if row[key]:
                    try:
                        float(row[key])
                    except ValueError:
                        raise RunsFileError(f"{path}:{line}: {key} {row[key]!r} is not a number") from None
            if row["gflops"] and not _RANGE.match(row["gflops"]):
                raise RunsFileError(f"{path}:{line}: gflops {row['gflops']!r} is not a number or a range a–b")
            rows.append(row)
    return rows


def _duration(text: str) -> str:
    seconds = float(text)
    if seconds < 60:
        return f"{seconds:g} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min {rest} s"


def _cell(key: str, value: str) -> str:
    if not value:
        return ""
    if key in ("wall_s", "compute_s"):
        return _duration(value)
    if key == "peak_rss_gib":
        return f"{float(value):g} GiB"
    if key == "ratio":
        return f"{float(value):g}×"
    if key == "command":
        return f"`{value}`"
    return value.replace("|", "\\|")


def performance_table(path: str | Path) -> str:
    """Markdown: for each kind of run (``what``, in the file's order), a ``###`` heading and a
    table of its runs, newest first (the file's order within a day), with only the columns
    that some row of the kind fills."""
    groups: dict[str, list[dict[str, str]]] = {}
    for row in read_runs(path):
        groups.setdefault(row["what"], []).append(row)
    out: list[str] = []
    for what, rows in groups.items():
        rows = sorted(rows, key=lambda r: r["date"], reverse=True)  # stable: same-day rows keep their order
        keys = [k for k in _HEADERS if any(r[k] for r in rows)]
        out += [
            f"### {what}",
            "",
            "| " + " | ".join(_HEADERS[k] for k in keys) + " |",
            "| " + " | ".join("---" for _ in keys) + " |",
        ]
        out += ["| " + " | ".join(_cell(k, r[k]) for k in keys) + " |" for r in rows]
        out.append("")
    return "\n".join(out)
