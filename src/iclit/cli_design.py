"""What a design can reject, before and after a run: the smallest p each cell's nulls allow
(printed by ``iclit run --check``, ``iclit compare --show-spec`` and before ``iclit compare``)
and ``iclit power`` from a pilot run (:mod:`iclit.analysis.power`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from iclit.cli_common import console, fail, show

__all__ = ["print_floors", "power", "register"]


def print_floors(plan, to: Console = console, table: bool = True) -> bool:
    """Print, per cell and null, the smallest p the design allows before and after Holm (with
    ``table``); warn for each that cannot reach 0.05. True when every null of every cell can."""
    from iclit.analysis.power import plan_cells, plan_floors

    floors = plan_floors(plan_cells(plan))
    if not len(floors):
        return True
    if table:
        floors_table(floors, to)
    for r in floors[~floors["reachable"]].itertuples():
        need = (
            f"it needs at least {r.blocks_needed} query blocks ({r.blocks_needed * r.group_size} sets per seed)"
            if r.blocks_needed
            else "more permutations are needed, not more blocks"
        )
        to.print(
            f"[bold yellow]warning:[/] {r.cell}: the {r.null.replace('_', '-')} test cannot reject at 0.05 "
            f"after Holm over {r.family} tests (smallest p {r.p_min:.3g} with {r.blocks} blocks); {need}",
            highlight=False,
            soft_wrap=True,
        )
    return bool(floors["reachable"].all())


def floors_table(floors, to: Console) -> None:
    table = Table(
        "cell",
        "null",
        "blocks",
        "test",
        "smallest p",
        "tests per layer",
        "smallest Holm p",
        title="what each cell's tests can reject (1000 permutations, alpha 0.05)",
    )
    for r in floors.itertuples():
        test = f"exact ({r.patterns:.0f} pairings)" if r.exact else "Monte Carlo"
        table.add_row(
            r.cell,
            r.null.replace("_", "-"),
            str(r.blocks),
            test,
            f"{r.p_min:.3g}",
            str(r.family),
            f"{r.holm_floor:.3g}" + ("" if r.reachable else " ✗"),
        )
    to.print(table)


def power(
    run: Path = typer.Argument(..., help="a pilot run directory"),
    blocks: int | None = typer.Option(
        None, help="plan a design with this many query blocks per cell (default: the pilot's own)"
    ),
    alpha: float = typer.Option(0.05, help="family-wise level"),
    power_: float = typer.Option(0.8, "--power", help="the power asked for"),
    format: str = typer.Option("table", "--format", "-f", help="table or csv"),
) -> None:
    """From a pilot run: per test, the effect a design can detect and the query blocks it needs."""
    from iclit.analysis import load_run
    from iclit.analysis.power import power_table

    if format not in ("table", "csv"):
        fail(f"--format must be table or csv, not {format!r}")
    if blocks is not None and blocks < 2:
        fail(f"--blocks must be at least 2, not {blocks}")
    try:
        data = load_run(run)
    except FileNotFoundError as e:
        fail(str(e))
    except (RuntimeError, ValueError) as e:
        fail(f"{run}: {e}")
    df = power_table(data.tests, blocks=blocks, alpha=alpha, power=power_)
    if df.empty:
        fail(f"{run}: no null tests to plan from (a crossed run: --queries-per-set 2 or more)")
    show(df, format, None, 200, nested=False)


def register(app: typer.Typer) -> None:
    """Add ``power`` to the app."""
    app.command("power")(power)
