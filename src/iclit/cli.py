"""The ``iclit`` command line: a thin layer over the Python API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from iclit.cli_common import console, err, fail, message
from iclit.cli_design import print_floors
from iclit.tuning import TuningRecipe

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Is in-context learning implicit instruction tuning?"
)

from iclit.cli_models import models_app  # noqa: E402  (after the app: a sub-command group of it)

app.add_typer(models_app, name="models")


@app.command()
def tasks() -> None:
    """List the built-in tasks and where their data comes from (other names: a .jsonl, .csv or .parquet file)."""
    from iclit.tasks import task_table

    table = Table("name", "kind", "examples", "source", "description")
    for t in task_table():
        table.add_row(
            t.name, t.kind, f"missing: {t.missing}" if t.examples is None else str(t.examples), t.source, t.description
        )
    console.print(table)


_RECIPE = TuningRecipe()  # the defaults shown by `iclit compare --help`


def _parse_settings(items: list[str] | None) -> dict:
    """``--set key=value`` (value read as YAML: 8, 0.5, null, [1, 2], {a: 1}); repeatable."""
    import yaml

    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            fail(f"--set takes KEY=VALUE (a spec key, e.g. similarity=most or recipe.rank=4), not {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            fail(f"--set {key.strip()}: the value is not valid YAML ({e})")
    return out


def _spec_failure(source: str, e) -> None:
    n = len(e.problems)
    err.print(
        f"[bold red]error:[/] {source}: {n} problem{'s' if n != 1 else ''} in the spec", highlight=False, soft_wrap=True
    )
    for problem in e.problems:
        err.print(f"  {problem}", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def compare(
    model: str = typer.Option("gemma-3-270m", help="embedded name, local directory, .gguf file or hub id"),
    task: str = typer.Option("sentiment", help="built-in task name or a data file"),
    k: int = typer.Option(4, help="number of demonstrations"),
    resamples: int = typer.Option(
        30, help="demonstration sets drawn (with --queries-per-set 1: (query, demonstrations) draws)"
    ),
    queries_per_set: int = typer.Option(
        1,
        help="queries read with each demonstration set (the crossed design; >= 2 "
        "gives the query-swap and demo-swap nulls)",
    ),
    it_seeds: int = typer.Option(
        1,
        help="IT adapters per set, each with its own seed, trained in one pass (the IT "
        "seed noise; >= 2 adds the it_seed2 arm)",
    ),
    seed: int = typer.Option(0),
    out: Path = typer.Option(
        Path("runs/compare"),
        help="run directory (an ordinary one: `iclit results`, `iclit report`; the same command again resumes)",
    ),
    input_field: str | None = typer.Option(None, help="data file: field holding the input (default: input)"),
    output_field: str | None = typer.Option(None, help="data file: field holding the output (default: output)"),
    kind: str | None = typer.Option(None, help="data file: classification (default) or generation"),
    instruction_text: str | None = typer.Option(
        None, "--instruction-text", help="data file: the instruction that heads every prompt"
    ),
    input_prefix: str | None = typer.Option(None, help="data file: text before each input (default 'Input: ')"),
    output_prefix: str | None = typer.Option(None, help="data file: text before each answer (default 'Output:')"),
    separator: str | None = typer.Option(None, help="data file: text between demonstrations (default a blank line)"),
    template: str | None = typer.Option(None, help="named alternative template of the task"),
    no_instruction: bool = typer.Option(False, "--no-instruction", help="drop the task instruction"),
    sampler: str | None = typer.Option(None, help="demonstration sampler: balanced, random"),
    similarity: str | None = typer.Option(
        None, help="demonstrations: random (default), most or least similar to the query"
    ),
    wrong_labels: float | None = typer.Option(None, help="fraction of demonstrations given a wrong label"),
    demo_task: str | None = typer.Option(None, help="demonstrations from another task"),
    method: str = typer.Option("lora", help="IT method: lora or full"),
    rank: int = typer.Option(_RECIPE.rank, help="LoRA rank"),
    alpha: float = typer.Option(_RECIPE.alpha, help="LoRA alpha"),
    dropout: float = typer.Option(_RECIPE.dropout, help="LoRA dropout"),
    lr: float | None = typer.Option(None, help="learning rate (default 1e-3 LoRA, 1e-5 full)"),
    epochs: int = typer.Option(_RECIPE.epochs, help="tuning epochs over the k demonstrations"),
    targets: str | None = typer.Option(
        None,
        help="LoRA target modules, comma-separated (default: the architecture's "
        "query and value projections; all-linear: every linear layer)",
    ),
    capture_steps: str | None = typer.Option(
        None, help="also read IT after these optimiser steps, e.g. 1,2,4,8 (the dose curve)"
    ),
    baselines: str | None = typer.Option(
        None, help="comma-separated: centered, shuffled, update, noise_ceiling, cka, query_mean"
    ),
    batch_size: int = typer.Option(16, help="prompts per forward pass"),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 … (default: cuda if available)"),
    dtype: str | None = typer.Option(None, help="float32, bfloat16, float16 (default: bf16 on CUDA, fp32 on CPU)"),
    slow: bool = typer.Option(
        False,
        "--slow",
        help="force the straightforward path (no prefix cache, one PEFT adapter at a time), for checking",
    ),
    set_: list[str] | None = typer.Option(
        None,
        "--set",
        help="any other spec key, KEY=VALUE (e.g. chunk_size=5, "
        "recipe.weight_decay=0.01, store_states=false); repeatable",
    ),
    show_spec: bool = typer.Option(False, "--show-spec", help="print the one-cell spec this command runs, and stop"),
) -> None:
    """Compare anchor, ICL and IT hidden states: a one-cell experiment run into --out, then
    trials.jsonl, summary.csv, metrics.json, config.json and layers.png written there."""
    from iclit.analysis.similarity import BASELINES
    from iclit.experiments.compare import check_comparison, comparison_spec, resolve_task, spec_of
    from iclit.experiments.spec import SpecError
    from iclit.tasks import TaskDataError, get_task

    chosen = [b.strip() for b in (baselines or "").split(",") if b.strip()]
    unknown = [b for b in chosen if b not in BASELINES]
    if unknown:
        fail(f"--baselines: unknown {', '.join(unknown)} (known: {', '.join(BASELINES)})")
    try:
        steps = tuple(int(x) for x in capture_steps.split(",") if x.strip()) if capture_steps else ()
    except ValueError:
        fail(f"--capture-steps must be comma-separated integers, not {capture_steps!r}")
    try:
        chosen_targets = tuple(x.strip() for x in targets.split(",") if x.strip()) if targets else _RECIPE.targets
        recipe = TuningRecipe(
            method=method,  # type: ignore[arg-type]  # any string: the recipe validates it (a RecipeError)
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            lr=lr,
            epochs=epochs,
            capture_steps=steps,
            targets=chosen_targets,
        )
    except ValueError as e:
        fail(str(e))
    settings: dict[str, Any] = {
        key: value
        for key, value in (("similarity", similarity), ("wrong_labels", wrong_labels), ("demo_task", demo_task))
        if value is not None
    }
    options: dict[str, Any] = {
        key: value
        for key, value in (("input_field", input_field), ("output_field", output_field), ("kind", kind))
        if value is not None
    }
    layout = {
        key: value
        for key, value in (
            ("instruction", instruction_text),
            ("input_prefix", input_prefix),
            ("output_prefix", output_prefix),
            ("demo_sep", separator),
        )
        if value is not None
    }
    try:  # the same checks, and messages, as iclit.run_comparison, before the spec's
        check_comparison(
            k,
            resamples,
            resolve_task(get_task(task, template=layout or None, **options), template, not no_instruction),
            queries_per_set,
        )
    except (TaskDataError, ValueError, KeyError) as e:
        fail(message(e))
    if layout:
        options["template"] = layout
    if options:
        settings["task_options"] = options
    settings.update(_parse_settings(set_))
    data = comparison_spec(
        model,
        task,
        k=k,
        resamples=resamples,
        queries_per_set=queries_per_set,
        it_seeds=it_seeds,
        seed=seed,
        recipe=recipe,
        template=template,
        instruction=not no_instruction,
        sampler=sampler,
        batch_size=batch_size,
        fast=not slow,
        device=device,
        dtype=dtype,
        baselines=chosen,
        settings=settings,
    )
    try:
        spec = spec_of(data)
    except SpecError as e:
        _spec_failure("compare", e)
    if show_spec:
        from iclit.experiments.plan import make_plan

        console.print(spec.to_yaml(), highlight=False, markup=False, soft_wrap=True)
        print_floors(make_plan(spec), to=err)  # stderr: the spec on stdout stays a spec file
        return
    _run_comparison(spec, out)


def _run_comparison(spec, out: Path) -> None:
    from iclit.api import run_comparison_spec
    from iclit.experiments.plan import make_plan
    from iclit.models import ModelNotFoundError
    from iclit.report.console import print_summary
    from iclit.report.exports import EXPORTS
    from iclit.tasks import TaskDataError

    print_floors(make_plan(spec), to=err, table=False)  # a null this design cannot reject: said before compute
    try:
        summary = run_comparison_spec(spec, out, progress=True)
    except (TaskDataError, ModelNotFoundError, ValueError, RuntimeError) as e:
        fail(message(e))
    print_summary(json.loads((out / "metrics.json").read_text()), json.loads((out / "config.json").read_text()))
    _warn_fit(summary)
    console.print(
        f"wrote {out}/{', '.join(EXPORTS)} (run directory: `iclit results {out}`, `iclit report {out}`)",
        highlight=False,
        soft_wrap=True,
    )


# --- declarative experiments: iclit run / results / report ------------------------------------


@app.command("spec-schema")
def spec_schema(
    markdown: bool = typer.Option(False, "--markdown", help="the keys as Markdown tables (configs/README.md) instead"),
) -> None:
    """Print the JSON Schema of an experiment spec (every key: type, default, allowed values, meaning)."""
    from iclit.experiments.spec.docs import keys_markdown
    from iclit.experiments.spec.docs import spec_schema as schema

    typer.echo(keys_markdown().rstrip("\n") if markdown else json.dumps(schema(), indent=2, ensure_ascii=False))


@app.command("run")
def run_spec(
    spec: Path | None = typer.Argument(None, help="YAML experiment spec; omitted: the spec.yaml of --out (resume)"),
    out: Path = typer.Option(..., "--out", "-o", help="run directory; running into the same directory resumes"),
    backend: str = typer.Option(
        "local",
        help="local; ray: Ray actors (an existing cluster or a local one); slurm: a "
        "job array over --shards (submitit), waited for and merged (docs/cluster.md)",
    ),
    address: str | None = typer.Option(None, help="address of an existing Ray cluster (default: start a local one)"),
    workers: int | None = typer.Option(
        None, help="Ray actors (default: as many as the cluster's CPUs or GPU shares fit)"
    ),
    actors_per_gpu: int | None = typer.Option(
        None, min=1, help="Ray: actors sharing one GPU (default: spec cluster.actors_per_gpu)"
    ),
    worker_threads: int | None = typer.Option(None, min=1, help="Ray: torch threads (and CPUs) per actor (default: 1)"),
    max_retries: int | None = typer.Option(
        None, min=0, help="Ray: retries of a chunk whose worker died; slurm: of a failed shard job (default 2)"
    ),
    allocator: str | None = typer.Option(
        None, help="Ray: the actors' malloc: auto (tcmalloc where the machine has it), tcmalloc or system"
    ),
    shard: str | None = typer.Option(
        None,
        help="I/N: compute only shard I of N of the plan's chunks, into "
        "OUT/shards/I-of-N (e.g. $SLURM_ARRAY_TASK_ID/32); `iclit merge OUT` folds them in",
    ),
    shards: int | None = typer.Option(
        None, min=1, help="slurm: jobs in the array (default: spec cluster.slurm.shards)"
    ),
    slurm: list[str] | None = typer.Option(
        None,
        "--slurm",
        help="slurm: a job setting KEY=VALUE (partition, account, "
        "time_min, gpus_per_task, cpus_per_task, mem_gb, array_parallelism, constraint); repeatable",
    ),
    slurm_cluster: str | None = typer.Option(
        None, help="slurm: submitit's executor, slurm (default) or local (the jobs as processes here)"
    ),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="slurm: wait for the jobs and merge them, or only submit"),
    calibrate: bool = typer.Option(
        False, "--calibrate", help="with --check: time one chunk here for the time estimate (loads the model)"
    ),
    threads: int | None = typer.Option(None, help="torch CPU threads in this process (default: torch's)"),
    max_chunks: int | None = typer.Option(None, help="stop after this many chunks (to try a spec out)"),
    check: bool = typer.Option(
        False,
        "--check",
        help="validate the spec and show the plan, its cost and what each cell's tests can reject; run nothing",
    ),
    strict: bool = typer.Option(
        False,
        "--strict",
        help="with --check: a cell whose nulls cannot reach p < 0.05 after adjustment is an error (exit 2)",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bar over trials"),
    reuse: list[Path] | None = typer.Option(
        None,
        "--reuse",
        help="an earlier run directory whose stored chunks with the same trial keys are copied, "
        "not computed (read-only; repeatable, tried in order)",
    ),
) -> None:
    """Run an experiment spec into a run directory (results.sqlite); skips finished trials."""
    from iclit.cli_cluster import print_cost, run_slurm
    from iclit.experiments.plan import make_plan
    from iclit.experiments.raypool import ray_options_of
    from iclit.experiments.runner import SPEC_NAME, ReuseError, open_reuse_stores, run_experiment
    from iclit.experiments.shards import ShardError, parse_shard
    from iclit.experiments.spec import SpecError, load_spec

    if backend not in ("local", "ray", "slurm"):
        fail(f"--backend must be local, ray or slurm, not {backend!r}")
    try:
        shard_of = parse_shard(shard) if shard is not None else None
    except ShardError as e:
        fail(str(e))
    if backend == "slurm" and (shard_of is not None or reuse or max_chunks is not None):
        fail("--backend slurm submits every shard of the whole plan: without --shard, --reuse or --max-chunks")
    source = spec if spec is not None else out / SPEC_NAME
    if spec is None and not source.exists():
        fail(f"no SPEC given and {source} does not exist: `iclit run SPEC.yaml --out {out}`")
    try:
        parsed = load_spec(source)
    except SpecError as e:
        _spec_failure(str(source), e)
    reuse = list(reuse or [])
    try:  # every --reuse source readable before anything is planned or written
        for _, store in open_reuse_stores(reuse, out):
            store.close()
    except ReuseError as e:
        fail(str(e))
    plan = make_plan(parsed)
    factors = ", ".join(f"{k} ({len(v)})" for k, v in parsed.factors.items()) or "none"
    console.print(
        f"{parsed.name}: {len(plan.cells)} cells × {len(parsed.seeds)} seed(s) × {parsed.resamples} resamples "
        f"= {plan.n_trials} trials in {len(plan.chunks)} chunks; factors: {factors}",
        highlight=False,
        soft_wrap=True,
    )
    print_cost(plan, out, calibrate=check and calibrate, strict=check)
    if check:
        if not print_floors(plan) and strict:
            fail("a cell's tests cannot reach p < 0.05 after adjustment (--strict); add query blocks (resamples)")
        return
    if backend == "slurm":
        run_slurm(
            parsed,
            out,
            shards=shards,
            settings=_parse_settings(slurm),
            wait=wait,
            max_retries=max_retries,
            cluster=slurm_cluster,
            progress=progress,
        )
        return
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        summary = run_experiment(
            parsed,
            out,
            backend=backend,  # type: ignore[arg-type]  # any string: run_experiment validates it
            address=address,
            workers=workers,
            progress=progress,
            max_chunks=max_chunks,
            reuse=reuse,
            shard=shard_of,
            ray_options=ray_options_of(
                parsed,
                actors_per_gpu=actors_per_gpu,
                threads=worker_threads,
                max_retries=max_retries,
                allocator=allocator,
            ),
        )
    except (ReuseError, ValueError, RuntimeError, LookupError, OSError) as e:  # a source removed since the check
        fail(message(e))  # above; a run dir locked, not writable, a prompt or recipe that does not fit; an old store
    if summary.reused:  # the reused cells' analysis tables come along (content-keyed, computed once)
        from iclit.analysis.cache import copy_entries

        for source in reuse:
            copy_entries(source, out)
    console.print(str(summary), highlight=False, soft_wrap=True)
    _warn_fit(summary)


def _warn_fit(summary) -> None:
    warning = summary.fit_warning()
    if warning:
        err.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)


def _register() -> None:
    from iclit import cli_cluster, cli_design, cli_results

    cli_results.register(app)  # iclit results, iclit report
    cli_cluster.register(app)  # iclit merge
    cli_design.register(app)  # iclit power


_register()

if __name__ == "__main__":
    app()
