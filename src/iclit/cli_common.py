"""What every ``iclit`` command shares: the consoles, one error path (a message and exit 2),
and one way to print a table (terminal, CSV or Parquet)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["console", "err", "fail", "message", "show"]

console = Console()
err = Console(stderr=True)


def message(e: Exception) -> str:
    """The text of an exception (a KeyError's str() adds quotes around it)."""
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


PRECISE = {
    "cosine",
    "value",
    "last_layer",
    "mean_over_layers",
    "demo_similarity",
    "it_final_loss",
    "mean",
    "std",
    "max",
    "agreement",
    "mean_value",
    "mean_reference",
    "mean_diff",
    "ci_low",
    "ci_high",
    "cohens_d",
    "p_value",
}


def show(df, format: str, out: Path | None, limit: int, nested: bool) -> None:
    """A table on the terminal, or CSV / Parquet (lists and dicts as JSON text)."""
    columns = (
        [
            c
            for c in df.columns  # only per-trial outputs hold lists/dicts; the long frames never do
            if df[c].dtype == object and df[c].map(lambda v: isinstance(v, (list, dict))).any()
        ]
        if nested
        else []
    )
    if format in ("csv", "parquet") and columns:  # per-step losses, dose records: as JSON text
        df = df.assign(**{c: df[c].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v) for c in columns})
    if format == "csv":
        if out is None:
            df.to_csv(typer.get_text_stream("stdout"), index=False)
        else:
            df.to_csv(out, index=False)
            console.print(f"wrote {len(df)} rows to {out}")
        return
    if format == "parquet":
        df.to_parquet(out, index=False)
        console.print(f"wrote {len(df)} rows to {out}")
        return
    if df.empty:
        console.print("no trials stored yet")
        return
    show = df.drop(
        columns=[c for c in ("trial_key", "cell_key", *columns) if c in df.columns]
    )  # nested: -f csv/parquet
    constant = [c for c in show.columns if show[c].nunique(dropna=False) == 1 and c not in ("pair", "layer")]
    table = Table(title=("fixed: " + ", ".join(f"{c}={show[c].iloc[0]}" for c in constant)) if constant else None)
    for c in show.columns:
        if c not in constant:
            table.add_column(c, overflow="fold")
    shown = show.drop(columns=constant)
    for row in shown.head(limit).itertuples(index=False):
        table.add_row(
            *[
                f"{v:.4f}" if isinstance(v, float) and c in PRECISE else (f"{v:g}" if isinstance(v, float) else str(v))
                for c, v in zip(shown.columns, row, strict=True)
            ]
        )
    console.print(table)
    if len(df) > limit:
        console.print(f"{limit} of {len(df)} rows; all of them: --format csv or parquet", highlight=False)
