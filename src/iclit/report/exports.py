"""The files of a one-cell comparison, written from a run directory: trials.jsonl, summary.csv,
tests.csv (each pair against its nulls, per layer), metrics.json, config.json, layers.png.

``iclit compare`` writes them after its run; ``write_exports(RUN)`` rewrites them from the
store and the states alone (no model). Every file goes to a temporary name first and is
moved into place, so a failure leaves no half-written file.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from iclit.analysis.cells import last_layer_rows
from iclit.analysis.rundata import RunData, load_run
from iclit.analysis.tables import cell_cosine_tables, comparison_metrics, comparison_summary, single_cell

__all__ = [
    "EXPORTS",
    "to_json",
    "comparison_trials",
    "comparison_config",
    "comparison_tests",
    "comparison_parts",
    "write_files",
    "write_exports",
]

EXPORTS = ("trials.jsonl", "summary.csv", "tests.csv", "metrics.json", "config.json", "layers.png")
_COSINES_AFTER = "it_training_texts"  # where the per-layer cosines go in a trial record


def _finite(value: Any) -> Any:
    """NaN and infinities → None, recursively, so the JSON is strict (jq, JavaScript)."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def to_json(value: Any, indent: int | None = None) -> str:
    """Strict JSON (NaN written as null), UTF-8 text kept as is."""
    return json.dumps(_finite(value), indent=indent, ensure_ascii=False, allow_nan=False)


def comparison_trials(run: RunData) -> list[dict[str, Any]]:
    """One record per trial: the stored outputs with each pair's per-layer cosines (rounded
    to 6 digits) after ``it_training_texts``, in resample order."""
    from iclit.rundir.store import open_store

    cell, seed = single_cell(run)
    cos = cell_cosine_tables(run, cell, seed)  # by resample: a trial without stored states has none
    o = run.outputs[(run.outputs["cell_key"] == cell) & (run.outputs["seed"] == seed)].sort_values("resample")
    records = []
    with open_store(run.path, readonly=True) as store:
        for resample, key in zip(o["resample"], o["trial_key"], strict=True):
            stored = store.trial_outputs(key)
            record: dict[str, Any] = {}
            for name, value in stored.items():
                record[name] = value
                if name == _COSINES_AFTER:
                    record.update(
                        {
                            pair: [round(float(x), 6) for x in c.loc[resample]]
                            for pair, c in cos.items()
                            if resample in c.index
                        }
                    )
            records.append(record)
    return records


def comparison_config(run: RunData) -> dict[str, Any]:
    """Everything needed to rerun the comparison: its arguments, template, recipe, device,
    dtype, model shape, library versions, the command line and when it ran — from the store
    alone (the task data need not be at hand)."""
    from iclit.experiments.spec import loads_spec
    from iclit.tasks import is_builtin

    latest = run.latest or {}
    spec = loads_spec(latest["spec_yaml"], check_resources=False)
    cell, _ = single_cell(run)
    settings = run.settings[cell]
    model = _model_info(run, settings["model"])
    started, finished = latest.get("started"), latest.get("finished")
    seconds = (
        (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds()
        if started and finished
        else float("nan")
    )
    return {
        "command": "compare",
        "model": settings["model"],
        "model_source": model.get("source"),
        "task": settings["task"]["name"],
        "task_source": "builtin" if is_builtin(spec.task) else spec.task,
        "k": settings["k"],
        "resamples": spec.resamples,
        "queries_per_set": spec.queries_per_set,
        "sets_per_query": spec.query_sharing,
        "pairs": spec.pairs,
        "it_seeds": spec.it_seeds,
        "equivalence_margin": spec.margins,
        "seed": spec.seeds[0],
        "sampler": spec.sampler,
        "template": settings["template"],
        "template_name": spec.template,
        "instruction": spec.instruction,
        "recipe": settings["recipe"],
        "baselines": list(spec.baselines),
        "batch_size": spec.batch_size,
        "max_new_tokens": spec.max_new_tokens,
        "fast": spec.fast,
        "device": model.get("device"),
        "dtype": model.get("dtype"),
        "n_layers": model.get("n_layers"),
        "hidden_size": model.get("hidden_size"),
        "argv": sys.argv,
        "started": started,
        "seconds": round(seconds, 1),
        "versions": latest.get("versions", {}),
        "run_dir": str(run.path),
        "spec": spec.to_dict(),
    }


def _model_info(run: RunData, name: str) -> dict[str, Any]:
    """What the last run that loaded ``name`` recorded of it (a resume that computed nothing loads none)."""
    from iclit.rundir.store import open_store

    with open_store(run.path, readonly=True) as store:
        return store.model_info(name)


def comparison_tests(run: RunData) -> Any:
    """The one cell's tests (:data:`iclit.analysis.nulls.TEST_COLUMNS`, without cell_key): every
    pair × centring × layer × null; empty with one query per set and one set per query."""
    cell, _ = single_cell(run)
    tests = run.tests
    return tests[tests["cell_key"] == cell].drop(columns="cell_key").reset_index(drop=True)


def last_layer_tests(tests: Any) -> list[dict[str, Any]]:
    """metrics.json's ``tests``: the raw-centring rows at the last layer, one per pair × null
    (the ceilings' rows with role ``control``)."""
    if not len(tests):
        return []
    raw = last_layer_rows(tests[tests["centring"] == "raw"])
    keep = [
        "pair",
        "null",
        "role",
        "observed",
        "null_mean",
        "diff",
        "se",
        "ci_low",
        "ci_high",
        "p",
        "p_adj",
        "p_holm",
        "q_bh",
        "p_min",
        "exact",
        "margin",
        "tost_low",
        "tost_high",
        "p_tost",
        "ceiling",
        "ceiling_diff",
        "fraction",
        "fraction_low",
        "fraction_high",
        "verdict",
        "n_units",
        "n_blocks",
    ]
    return raw[keep].to_dict("records")


def write_files(
    out: str | Path,
    trials: list[dict[str, Any]],
    summary: Any,
    metrics: dict[str, Any],
    config: dict[str, Any],
    tests: Any = None,
) -> Path:
    """Write :data:`EXPORTS` to ``out`` from their contents; returns ``out``."""
    import pandas as pd

    from iclit.analysis.nulls import TEST_COLUMNS
    from iclit.report import plot_layers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".partial-") as tmp:
        t = Path(tmp)
        with open(t / "trials.jsonl", "w", encoding="utf-8") as f:
            for trial in trials:
                f.write(to_json(trial) + "\n")
        summary.to_csv(t / "summary.csv", index=False)
        tests = tests if tests is not None else pd.DataFrame(columns=list(TEST_COLUMNS))
        tests.to_csv(t / "tests.csv", index=False)
        (t / "metrics.json").write_text(to_json(metrics, indent=2), encoding="utf-8")
        (t / "config.json").write_text(to_json(config, indent=2), encoding="utf-8")
        design = (
            f"{config['resamples']} sets × {config.get('queries_per_set', 1)} queries"
            if config.get("queries_per_set", 1) > 1
            else f"{config['resamples']} resamples"
        )
        title = f"{config['model']} · {config['task']} · k={config['k']} · {design}"
        steps = summary["pair"].str.contains("_step")  # the dose pairs: in summary.csv, not drawn
        raw = tests[tests["centring"] == "raw"] if len(tests) else None
        plot_layers(summary[~steps], t / "layers.png", title=title, nulls=raw)
        for name in EXPORTS:
            os.replace(t / name, out / name)
    return out


def write_exports(run: RunData | str | Path, out: str | Path | None = None) -> Path:
    """Write :data:`EXPORTS` for a one-cell run (a run directory or its :class:`RunData`) to
    ``out`` (default: the run directory); returns ``out``."""
    run = run if isinstance(run, RunData) else load_run(run)
    parts = comparison_parts(run)
    return write_files(
        out if out is not None else run.path,
        parts["trials"],
        parts["summary"],
        parts["metrics"],
        parts["config"],
        parts["tests"],
    )


def comparison_parts(run: RunData) -> dict[str, Any]:
    """What the exports hold, from a one-cell run: trials, summary, metrics (with the
    last-layer ``tests``, ``geometry`` and ``seeds`` rows and the ``behaviour`` rows), config, tests."""
    tests = comparison_tests(run) if not run.frame.empty else None
    metrics = comparison_metrics(run)
    metrics["tests"] = last_layer_tests(tests) if tests is not None else []
    if not run.frame.empty:
        geometry = run.geometry
        metrics["geometry"] = (
            last_layer_rows(geometry).drop(columns="cell_key").to_dict("records") if len(geometry) else []
        )
    metrics["behaviour"] = run.behaviour.drop(columns="cell_key").to_dict("records") if len(run.behaviour) else []
    seeds = run.cells["seeds"] if not run.frame.empty else None
    metrics["seeds"] = (
        last_layer_rows(seeds).drop(columns="cell_key").to_dict("records") if seeds is not None and len(seeds) else []
    )
    return {
        "trials": comparison_trials(run),
        "summary": comparison_summary(run),
        "metrics": metrics,
        "config": comparison_config(run),
        "tests": tests,
    }
