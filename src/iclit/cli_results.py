"""The commands that read a run directory back, with no model: ``iclit results`` (tidy tables
and registered metrics, printed or exported) and ``iclit report`` (the HTML report, or a
one-cell comparison's tables as Markdown)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from iclit.cli_common import console, err, fail, message, show

__all__ = ["register", "report", "results"]


def results(
    run: Path = typer.Argument(..., help="run directory"),
    format: str = typer.Option("table", "--format", "-f", help="table, csv or parquet"),
    out: Path | None = typer.Option(None, "--out", "-o", help="file to write (csv: default stdout)"),
    metric: str | None = typer.Option(
        None,
        "--metric",
        "-m",
        help="a registered metric, computed from the stored states and outputs (no model): see --list-metrics",
    ),
    list_metrics: bool = typer.Option(False, "--list-metrics", help="list the metrics and stop"),
    outputs: bool = typer.Option(
        False, "--outputs", help="one row per trial (predictions, scores, …) instead of per trial × layer × pair"
    ),
    summary: bool = typer.Option(
        False, "--summary", help="= --metric summary: per cell × pair, last-layer and mean-over-layers cosine"
    ),
    all_trials: bool = typer.Option(
        False, "--all", help="every stored trial, not only those of the last spec run here"
    ),
    effects: bool = typer.Option(
        False,
        "--effects",
        help="= --metric effects: per factor, each value vs the base value on "
        "the ICL–IT cosine (paired bootstrap CI, Cohen's d, permutation p)",
    ),
    tests: bool = typer.Option(
        False,
        "--tests",
        help="= --metric tests: each pair against its query-swap and demo-swap "
        "nulls per layer (diff, CI, p, max-T p_adj, Holm, BH, TOST, verdict)",
    ),
    contrasts: bool = typer.Option(
        False,
        "--contrasts",
        help="= --metric contrasts: per factor, each value vs the base "
        "value with query blocks as units (paired t or Welch, CI, Holm, TOST, verdict)",
    ),
    limit: int = typer.Option(30, help="rows shown by --format table"),
) -> None:
    """Print or export the results of a run as a tidy table (default: the cosines, trial × layer × pair)."""
    from iclit.analysis import compute_metric, get_metric, load_run
    from iclit.analysis import list_metrics as metrics
    from iclit.cli_cluster import fold_shards

    if list_metrics:
        table = Table("metric", "what")
        for m in metrics():
            table.add_row(m.name, m.help)
        console.print(table)
        return
    if format not in ("table", "csv", "parquet"):
        fail(f"--format must be table, csv or parquet, not {format!r}")
    if format == "parquet" and out is None:
        fail("--format parquet needs --out FILE")
    if format == "table" and out is not None:
        fail("--out needs --format csv or parquet")
    chosen = [
        name
        for name, on in (("summary", summary), ("effects", effects), ("tests", tests), ("contrasts", contrasts))
        if on
    ]
    if metric:
        chosen.append(metric)
    if len(chosen) + outputs > 1:
        if effects:
            fail("--effects goes alone, without --outputs, --summary or --metric")
        fail("give one of --metric, --summary, --effects, --tests, --contrasts, --outputs")
    name = chosen[0] if chosen else ("cosines" if not outputs else None)
    if name is not None:
        try:
            get_metric(name)
        except KeyError as e:
            fail(message(e))
    fold_shards(run)  # shards of `iclit run --shard` not merged yet
    try:
        data = load_run(run, all_trials=all_trials, cka=True if name and get_metric(name).needs_cka else None)
    except FileNotFoundError as e:
        fail(str(e))
    except (RuntimeError, ValueError) as e:
        fail(f"{run}: {e}")
    for note in data.notes if name is not None else ():  # what similarities could not be computed
        err.print(f"note: {note}", highlight=False, soft_wrap=True)
    try:
        df = data.outputs if name is None else compute_metric(data, name)
    except (ValueError, KeyError) as e:
        fail(f"{run}: --metric {name}: {message(e)}")
    if name is not None and df.empty and data.frame.empty and data.notes and not data.outputs.empty:
        fail(
            f"{run}: --metric {name} is computed from stored hidden states, and {data.notes[0]} "
            "(--outputs and --metric scores, agreement, it_loss need none)"
        )
    if name in ("effects", "contrasts") and df.empty and not data.outputs.empty:
        console.print("no factor with two or more values: no effects to show")
        return
    show(df, format, out, limit, nested=name is None)


def report(
    run: Path = typer.Argument(..., help="run directory"),
    out: Path | None = typer.Option(None, "--out", "-o", help="HTML file (default RUN/report.html)"),
    markdown: bool = typer.Option(
        False, "--markdown", help="print a one-cell comparison's results tables as Markdown (from its exports) instead"
    ),
) -> None:
    """Write one self-contained HTML report of a run: figures per factor, accuracy, spec, versions."""
    from iclit.cli_cluster import fold_shards
    from iclit.report.html import write_report

    fold_shards(run)

    if markdown:
        from iclit.report.markdown import comparison_markdown

        if not (run / "metrics.json").exists():
            fail(
                f"{run}: no metrics.json (the Markdown tables are a one-cell comparison's: iclit compare … --out {run})"
            )
        typer.echo(comparison_markdown(run), nl=False)
        return
    try:
        path = write_report(run, out)
    except FileNotFoundError as e:
        fail(str(e))
    except (RuntimeError, ValueError) as e:  # an old or foreign store; states a baseline needs are missing
        fail(f"{run}: {e}")
    console.print(f"wrote {path}")


def register(app: typer.Typer) -> None:
    """Add ``results`` and ``report`` to the app."""
    app.command()(results)
    app.command()(report)
