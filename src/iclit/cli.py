"""The ``iclit`` command line: a thin layer over the Python API."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from iclit.tuning import TuningRecipe

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Is in-context learning implicit instruction tuning?")
console = Console()
err = Console(stderr=True)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


@app.command()
def models() -> None:
    """List the embedded models (other names: a local directory, a .gguf file or a hub id)."""
    from iclit.models import list_models
    from iclit.models.loading import resolve

    table = Table("name", "package", "installed", "description")
    for m in list_models():
        try:
            resolve(m.name)
            ok = "yes"
        except LookupError:
            ok = f"no: {m.install}"
        table.add_row(m.name, getattr(m, "package", "(built in code)"), ok, m.description)
    console.print(table)


@app.command()
def tasks() -> None:
    """List the built-in tasks (other names: a .jsonl, .csv or .parquet file)."""
    from iclit.tasks import list_tasks

    table = Table("name", "kind", "examples", "description")
    for name, kind, n, desc in list_tasks():
        table.add_row(name, kind, str(n), desc)
    console.print(table)


@app.command()
def compare(
    model: str = typer.Option("gemma-3-270m", help="embedded name, local directory, .gguf file or hub id"),
    task: str = typer.Option("sentiment", help="built-in task name or a data file"),
    k: int = typer.Option(4, help="number of demonstrations"),
    resamples: int = typer.Option(30, help="number of (query, demonstrations) draws"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("runs/compare"), help="output directory"),
    template: Optional[str] = typer.Option(None, help="named alternative template of the task"),
    no_instruction: bool = typer.Option(False, "--no-instruction", help="drop the task instruction"),
    sampler: Optional[str] = typer.Option(None, help="demonstration sampler: balanced, random"),
    method: str = typer.Option("lora", help="IT method: lora or full"),
    rank: int = typer.Option(TuningRecipe.rank, help="LoRA rank"),
    alpha: float = typer.Option(TuningRecipe.alpha, help="LoRA alpha"),
    dropout: float = typer.Option(TuningRecipe.dropout, help="LoRA dropout"),
    lr: Optional[float] = typer.Option(None, help="learning rate (default 1e-3 LoRA, 1e-5 full)"),
    epochs: int = typer.Option(TuningRecipe.epochs, help="tuning epochs over the k demonstrations"),
    batch_size: int = typer.Option(16, help="prompts per forward pass"),
    slow: bool = typer.Option(False, "--slow", help="force the straightforward path (no prefix cache, one PEFT adapter at a time), for checking"),
) -> None:
    """Compare anchor, ICL and IT hidden states; write trials.jsonl, summary.csv, layers.png, config.json."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from iclit.experiments import run_comparison
    from iclit.models import ModelNotFoundError
    from iclit.tasks import TaskDataError
    try:
        recipe = TuningRecipe(method=method, rank=rank, alpha=alpha, dropout=dropout, lr=lr, epochs=epochs)  # type: ignore[arg-type]
    except ValueError as e:
        _fail(str(e))
    columns = (TextColumn("{task.description:>7}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=False) as bar:

        def progress(arm: str, total: int):
            job = bar.add_task(arm, total=total)
            return lambda n: bar.advance(job, n)

        try:
            result = run_comparison(
                model, task, k=k, resamples=resamples, seed=seed, recipe=recipe, template=template,
                instruction=not no_instruction, sampler=sampler, batch_size=batch_size, fast=not slow, progress=progress,
            )
        except (TaskDataError, ModelNotFoundError, ValueError, KeyError) as e:
            _fail(str(e).strip("'\""))
    result.write(out)
    print_summary(result)
    console.print(f"wrote {out}/trials.jsonl, summary.csv, metrics.json, config.json, layers.png")


def print_summary(result) -> None:
    from iclit.metrics import PAIRS

    m = result.metrics
    cfg = result.config
    table = Table(title=f"{cfg['model']} · {cfg['task']} · k={cfg['k']} · n={cfg['resamples']} · seed={cfg['seed']}")
    table.add_column("pair")
    table.add_column("last layer: mean ± std [95% CI]")
    table.add_column("mean over layers [95% CI]")
    for pair in PAIRS:
        a, b = m["last_layer"][pair], m["mean_over_layers"][pair]
        table.add_row(
            pair.replace("_", "–"),
            f"{a['mean']:.3f} ± {a['std']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]",
            f"{b['mean']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}]",
        )
    console.print(table)
    score = "accuracy" if "accuracy" in m else "chrf"
    arms = Table(title=f"per-arm {score}")
    arms.add_column("arm")
    arms.add_column(f"{score} [95% CI]")
    for arm, s in m[score].items():
        arms.add_row(arm, f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]")
    console.print(arms)
    loss = m["it_final_loss"]
    console.print(
        f"ICL–IT prediction agreement {m['icl_it_agreement']:.3f}; IT final training loss "
        f"mean {loss['mean']:.4f}, max {loss['max']:.4f}; {cfg['seconds']:.0f} s on {cfg['device']}"
    )


if __name__ == "__main__":
    app()
