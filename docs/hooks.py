"""MkDocs hooks: the reference parts of the site are generated from the code at build time.

A page asks for a generated part with an HTML comment (a line of its own, or inside a table cell)::

    <!-- iclit:cli -->                           every command of the typer app (its click help)
    <!-- iclit:spec-keys -->                     every spec key (iclit.experiments.spec.docs)
    <!-- iclit:store-tables -->                  results.sqlite's tables and columns, from a fresh store
    <!-- iclit:columns iclit.analysis.nulls:TEST_COLUMNS -->   a column tuple of the package
    <!-- iclit:architectures -->                 the architecture table (iclit.models.arch)
    <!-- iclit:performance -->                   benchmarks/results/runs.csv (iclit.report.performance)

An unknown marker or a column without a description stops the build, so a page cannot silently
fall behind the code. A relative link that leaves docs/ (a repository file) keeps its text and
loses the link: the site has no copy of that file.
"""

from __future__ import annotations

import importlib
import re
import sqlite3
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def on_config(config):
    """The tree being documented is the one imported, whatever is installed (mkdocs restores
    ``sys.path`` after loading a hook, so this happens here, not at import)."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    return config


_MARKER = re.compile(r"<!-- iclit:([a-z-]+)(?: ([\w.:]+))? -->")
_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s#]+)(#[^)]*)?\)")


def cli_markdown() -> str:
    """Every command of ``iclit`` with its usage, arguments and options (typer's own docs renderer)."""
    import typer
    import typer.cli

    from iclit.cli import app

    command = typer.main.get_command(app)
    text = typer.cli.get_docs_for_click(obj=command, ctx=typer.Context(command), name="iclit", title="iclit")
    return text.split("\n", 1)[1].lstrip()  # the page has its own title


def spec_markdown() -> str:
    from iclit.experiments.spec.docs import keys_markdown

    return keys_markdown()


# What each column of results.sqlite holds. A column of the store that has no line here stops the build.
STORE_COLUMNS = {
    "meta": {
        "key": "`schema_version`",
        "value": "the store's schema version (a store of another version is refused, not migrated)",
    },
    "runs": {
        "id": "one row per `iclit run` / `iclit compare` invocation",
        "started": "UTC start time (ISO 8601)",
        "finished": "UTC end time; NULL while running or after a kill",
        "backend": "`local` or `ray`",
        "host": "machine name",
        "pid": "process id",
        "spec_yaml": "the spec that ran, as YAML",
        "plan_json": "the plan: cells, seeds, resamples, chunks (JSON)",
        "versions_json": "python, platform and library versions: iclit, torch, transformers, peft, … (JSON)",
        "planned": "trials the plan holds",
        "computed": "trials this invocation computed",
        "reused": "trials copied from other run directories (`--reuse`)",
        "reused_from_json": "trials copied per source run directory (JSON)",
        "models_json": "per model name: source, device, dtype, layers and hidden size (JSON)",
    },
    "cells": {
        "cell_key": "content hash of the cell's settings",
        "labels_json": "the cell's factor values, as the report labels it (JSON)",
        "settings_json": "everything the cell key hashes: model, task, k, template, recipe, sampler, … (JSON)",
    },
    "trials": {
        "trial_key": "content hash of everything that determines the trial (cell, seed, resample, query)",
        "cell_key": "the trial's cell (`cells.cell_key`)",
        "seed": "the experiment seed",
        "resample": "index of the (query, set) pair in its cell and seed",
        "query_id": "the query example's id",
        "n_layers": "captured states per arm: L + 1 (index 0: embeddings)",
        "demo_similarity": "mean embedding similarity of the demonstrations to the query (NULL if not computed)",
        "n_wrong": "demonstrations given a wrong label (the wrong-labels factor)",
        "scores_json": "per arm: accuracy (0/1) or chrF of the prediction (JSON)",
        "outputs_json": "prompts, predictions, label probabilities, IT losses per step, demonstration ids, … (JSON)",
        "seconds": "compute seconds, the trial's share of its chunk",
        "run_id": "the invocation that computed it (`runs.id`)",
        "written": "UTC time the row was committed",
        "states_file": "its states file, relative to the run directory (`states/<hash>.safetensors`; NULL: no states)",
        "states_row": "its row in every array of that file",
    },
}


def store_markdown() -> str:
    """The tables and columns of a fresh ``results.sqlite``, with :data:`STORE_COLUMNS`' meanings."""
    from iclit.rundir.store import SCHEMA_VERSION, Store

    with tempfile.TemporaryDirectory() as tmp:
        Store(tmp).close()
        conn = sqlite3.connect(Path(tmp) / "results.sqlite")
        try:
            tables = [
                r[0]
                for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
                )
            ]
            out = [f"Schema version {SCHEMA_VERSION}.", ""]
            for table in tables:
                about = STORE_COLUMNS.get(table)
                if about is None:
                    raise ValueError(f"docs/hooks.py: results.sqlite table {table!r} has no entry in STORE_COLUMNS")
                out += [f"### `{table}`", "", "| column | type | what |", "| --- | --- | --- |"]
                for _, name, kind, notnull, _, pk in conn.execute(f"PRAGMA table_info({table})"):
                    if name not in about:
                        raise ValueError(f"docs/hooks.py: column {table}.{name} has no entry in STORE_COLUMNS")
                    flags = " (primary key)" if pk else (" NOT NULL" if notnull else "")
                    out.append(f"| `{name}` | {kind}{flags} | {about[name]} |")
                missing = set(about) - {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
                if missing:
                    raise ValueError(
                        f"docs/hooks.py: STORE_COLUMNS names columns {table} does not have: {sorted(missing)}"
                    )
                out.append("")
        finally:
            conn.close()
    return "\n".join(out)


def columns_markdown(target: str) -> str:
    """``module:NAME``, a tuple of column names → an inline list of them."""
    module, _, name = target.partition(":")
    columns = getattr(importlib.import_module(module), name)
    return ", ".join(f"`{c}`" for c in columns) + f" (`{module}.{name}`)"


def architectures_markdown() -> str:
    from iclit.models.arch import ARCHITECTURES

    rows: dict[object, list[str]] = {}
    for model_type, spec in ARCHITECTURES.items():
        rows.setdefault(spec, []).append(model_type)
    out = [
        "| `model_type` | blocks | final norm | query | value | feed-forward |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for spec, types in rows.items():
        names = ", ".join(f"`{t}`" for t in types)
        out.append(
            f"| {names} | `{spec.layers}` | `{spec.final_norm}` | `{spec.query}` | `{spec.value}` | "
            f"{'`' + spec.mlp + '`' if spec.mlp else 'none known'} |"
        )
    return "\n".join(out) + "\n"


def performance_markdown() -> str:
    from iclit.report.performance import performance_table

    return performance_table(ROOT / "benchmarks" / "results" / "runs.csv")


GENERATORS = {
    "cli": cli_markdown,
    "spec-keys": spec_markdown,
    "store-tables": store_markdown,
    "columns": columns_markdown,
    "architectures": architectures_markdown,
    "performance": performance_markdown,
}


def _generate(match: re.Match) -> str:
    name, arg = match.group(1), match.group(2)
    if name not in GENERATORS:
        raise ValueError(f"unknown generated part <!-- iclit:{name} --> (known: {', '.join(GENERATORS)})")
    return GENERATORS[name](arg) if arg else GENERATORS[name]()


def _unlink_outside(markdown: str, page_uri: str) -> str:
    """A relative link that leaves docs/ (to a file of the repository) cannot work on the site:
    keep its text, drop the link (the text names the repository path)."""
    depth = page_uri.count("/")

    def fix(m: re.Match) -> str:
        target = m.group(2)
        if not re.match(r"^[a-z]+:", target) and target.startswith("../" * (depth + 1)):
            return m.group(1)
        return m.group(0)

    return _LINK.sub(fix, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = _MARKER.sub(_generate, markdown)
    return _unlink_outside(markdown, page.file.src_uri)
