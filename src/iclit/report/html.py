"""The HTML report of a run directory: analysis tables and figures poured into ``templates/report.html.j2``.

It opens with :mod:`iclit.report.headline` when the run has the nulls' tests (a crossed
design) or a single cell: the headline figure, large (per layer: raw cosines, anchor-centred
cosines and the update cosine, with the query-swap and demo-swap nulls as bands and the
positive control's line), the forest plot of each pair's excess over its nulls at the last
layer (95% CIs, a line at 0, ±margin) and a short table of verdicts per cell. Below it, the
figures stay visible and every detailed table is folded in a ``<details>`` element. Numbers
are written by :mod:`iclit.report.numbers` (the template's ``num`` and ``pvalue`` filters):
three decimals or significant digits, p below 0.001 as "< 0.001".

For each factor of the spec:

* the paper-style figure: cosine similarity of the three arm pairs (anchor–ICL, anchor–IT,
  ICL–IT) against the factor's values, mean with a 95% bootstrap CI over trials, at the last
  layer and averaged over layers;
* the per-layer curves, one panel per factor value;
* a table per factor value: trials, per-arm task accuracy (or chrF) with CIs, the
  demonstration–query similarity and the number of wrong labels when recorded;
* when the spec asks for ``baselines``: the ICL–IT cosine beside its baselines (centred
  cosines, the shuffled-pair null, the noise ceiling, the update-direction cosine, linear CKA
  across all queries of a cell), per layer and per factor value, with the accuracy per arm;
* effect sizes: each value of the factor against its base value, paired over (seed,
  resample) — and the other factors' values in a grid — on the ICL–IT cosine (last layer and
  mean over layers): mean difference with a paired bootstrap 95% CI, Cohen's d and a
  sign-flip permutation p-value; and the value where ICL–IT similarity peaks;
* when the recipe reads IT after several steps (``capture_steps``): the dose curves, ICL–IT
  and anchor–IT cosine, IT accuracy and training loss against the optimiser step, one line
  per factor value, with the step where ICL–IT peaks.
* when the spec ran ``analyses`` (patching, steering): per cell the effect per layer with 95%
  CI bands over sets and the tables of :mod:`iclit.report.causal`.

With ``design: grid`` a factor's figure pools the other factors' values; with ``separate``
it shows the cells where the other factors keep their base values. Figures are PNGs embedded
as base64 (no external file, no network). A small script marks ``<body data-render="ok">``
once every image has decoded, which the tests read back from a headless browser.

The numbers come from :mod:`iclit.analysis.factors`, the images from
:mod:`iclit.report.figures`; this module only arranges them into plain data (text, numbers,
summaries) for the template, which escapes everything it prints.

Example (not run: it needs a model or a run directory)::

    write_report("runs/smoke")          # -> runs/smoke/report.html

"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from iclit.analysis.factors import (
    CKA_PAIRS,
    EXTRA_PAIRS,
    WHATS,
    design_subset,
    dose_factor,
    dose_peaks,
    dose_summary,
    factor_effects,
    factor_summary,
    factor_values,
    layer_summaries,
    peak_values,
    score_label,
)
from iclit.analysis.rundata import RunData, load_run
from iclit.report import figures
from iclit.report.causal import causal_section
from iclit.report.contrasts import contrasts_section
from iclit.report.headline import DIFF, headline_section
from iclit.report.nulls import nulls_section
from iclit.report.numbers import num, pvalue

__all__ = ["write_report", "render_report", "factor_summary", "factor_effects", "dose_summary"]

_MAIN = ("anchor_icl", "anchor_it", "icl_it")
_WHAT_TEXT = {"last_layer": "last layer", "mean_over_layers": "mean over layers"}


@functools.lru_cache(maxsize=1)
def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("iclit.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(num=num, pvalue=pvalue)  # one number formatter for every output
    return env


# ------------------------------------------------------------------ table cells (plain data)


def _cell(value: Any, fmt: str = "{:.3f}") -> dict[str, Any]:
    """A number cell: a summary → mean [CI]; a number → the number; missing → a dash (the
    template writes them with :func:`iclit.report.numbers.num` and ``fmt``)."""
    if isinstance(value, Mapping):
        if not value.get("n"):
            return {"kind": "none"}
        return {"kind": "ci", "mean": value["mean"], "lo": value["ci_low"], "hi": value["ci_high"], "fmt": fmt}
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return {"kind": "none"}
    return {"kind": "num", "value": float(value), "fmt": fmt}


def _text(value: Any) -> dict[str, Any]:
    return {"kind": "text", "value": str(value)}


def _table(summary: pd.DataFrame, factor: str, score_name: str) -> dict[str, Any]:
    arms = [c.split(":", 1)[1] for c in summary.columns if c.startswith("score:")]
    has_sim, has_wrong = "demo_similarity" in summary.columns, "n_wrong" in summary.columns
    has_unfit = "it_not_fitted" in summary.columns and bool((summary["it_not_fitted"].fillna(0) > 0).any())
    head = [factor, "trials", *(f"{score_name}: {a}" for a in arms)]
    head += [f"{figures.pair_style(p).label} (last layer)" for p in _MAIN]
    head += ["demo–query similarity"] * has_sim + ["wrong labels (mean)"] * has_wrong
    head += ["⚠ IT did not fit (trials; final answer loss ≥ 0.1)"] * has_unfit
    rows = []
    for _, row in summary.iterrows():
        cells = [_text(row[factor]), _text(row["trials"])]
        cells += [_cell(row[f"score:{a}"]) for a in arms]
        cells += [_cell(row[f"{p}:last_layer"]) for p in _MAIN]
        if has_sim:
            sim = row.get("demo_similarity")
            cells.append(_cell(sim if isinstance(sim, Mapping) else None))
        if has_wrong:
            cells.append(_cell(row.get("n_wrong"), "{:.2f}"))
        if has_unfit:
            n = row.get("it_not_fitted")
            cells.append(_text(f"⚠ {int(n)}" if n and n == n else "0"))
        rows.append(cells)
    return {"cls": None, "head": head, "rows": rows}


def _baseline_pairs(summary: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(per-trial baseline pairs, CKA pairs) with columns in a factor summary."""
    extras = [p for p in EXTRA_PAIRS if f"{p}:last_layer" in summary.columns]
    cka = [p for p in CKA_PAIRS if f"{p}:last_layer" in summary.columns]
    return extras, cka


def _baseline_table(summary: pd.DataFrame, factor: str, score_name: str) -> dict[str, Any]:
    """ICL–IT beside its baselines, last layer and mean over layers, with the accuracy per arm."""
    extras, cka = _baseline_pairs(summary)
    pairs = ["icl_it", *extras, *cka]
    arms = [c.split(":", 1)[1] for c in summary.columns if c.startswith("score:")]
    head = [factor, "trials", *(f"{score_name}: {a}" for a in arms)]
    head += [f"{figures.pair_style(p).label} ({_WHAT_TEXT[w]})" for p in pairs for w in WHATS]
    rows = []
    for _, row in summary.iterrows():
        cells = [_text(row[factor]), _text(row["trials"])] + [_cell(row[f"score:{a}"]) for a in arms]
        for p in pairs:
            for w in WHATS:
                v = row.get(f"{p}:{w}")
                cells.append(_cell(v if isinstance(v, Mapping) else None))
        rows.append(cells)
    return {"cls": "baselines", "head": head, "rows": rows}


def _effects_rows(effects: pd.DataFrame) -> list[list[dict[str, Any]]]:
    rows = []
    for r in effects.itertuples(index=False):
        diff = (
            {"kind": "ci", "mean": r.mean_diff, "lo": r.ci_low, "hi": r.ci_high, "fmt": DIFF}
            if r.n
            else {"kind": "none"}
        )
        rows.append(
            [
                _text(r.value),
                _text(r.reference),
                _text(figures.pair_style(r.pair).label),
                _text(r.what.replace("_", " ")),
                _text(r.n),
                _cell(r.mean_value),
                _cell(r.mean_reference),
                diff,
                _cell(r.cohens_d, "{:.2f}"),
                {"kind": "p", "value": r.p_value},
            ]
        )
    return rows


# ------------------------------------------------------------------ sections


def _image(alt: str, png: str) -> dict[str, str]:
    return {"alt": alt, "png": png}


def _baselines(
    frame: pd.DataFrame,
    summary: pd.DataFrame,
    factor: str | None,
    values: list[Any],
    table_factor: str,
    score_name: str,
    cka_asked: bool,
) -> dict[str, Any] | None:
    extras, cka = _baseline_pairs(summary)
    if not (extras or cka or cka_asked):
        return None
    by = f" by {factor}" if factor else ""
    images = []
    if extras:
        layers = layer_summaries(frame, factor, values, ("icl_it", *extras))
        title = f"ICL–IT and its baselines per layer{by}"
        images.append(
            _image(f"baselines per layer{by}", figures.baselines_figure(layers, factor, values, title, extras))
        )
    notes = []
    if cka:
        notes.append(
            "linear CKA: over all queries of a cell, one value per cell × seed and layer; "
            "mean with a 95% CI over the cells × seeds of each value"
        )
    elif cka_asked:
        notes.append("linear CKA ICL vs IT across a cell's queries (baseline cka): not stored for this run yet")
    return {
        "heading": f"Baselines{by}",
        "images": images,
        "notes": notes,
        "table": _baseline_table(summary, table_factor, score_name),
    }


def _plan(run: RunData) -> dict[str, Any]:
    """The plan the report describes (:func:`render_report` fills it in from the last run)."""
    if run.plan is None:
        raise FileNotFoundError(f"{run.path}: the store holds no run")
    return run.plan


def _factor_section(run: RunData, factor: str, score_name: str, cka_asked: bool) -> dict[str, Any]:
    plan, frame = _plan(run), run.frame
    factors = list(plan["factors"])
    pooled = plan["design"] != "separate" and len(factors) > 1
    values = factor_values(plan, factor)
    others = [f for f in factors if f != factor]
    note = None
    if others:
        how = "pooled over " if pooled else "with the others at their base values: "
        note = how + (", ".join(others) if pooled else ", ".join(f"{o} = {plan['base'][o]}" for o in others))
    section: dict[str, Any] = {
        "id": f"factor-{factor}",
        "heading": f"Factor: {factor}",
        "note": note,
        "images": [],
        "table": None,
        "baselines": None,
        "effects": None,
        "peak": [],
    }
    if frame.empty:
        return section
    summary = factor_summary(frame, run.outputs, plan, factor, cka=run.cka)
    sub = design_subset(frame, factor, plan)
    title = f"arm-pair similarity against {factor} (mean, 95% CI over trials)"
    layers = layer_summaries(sub, factor, values, _MAIN)
    section["images"] = [
        _image(f"similarity against {factor}", figures.factor_figure(summary, factor, title)),
        _image(
            f"per-layer similarity by {factor}",
            figures.layer_panels_figure(layers, factor, values, f"per-layer similarity by {factor}"),
        ),
    ]
    section["table"] = _table(summary, factor, score_name)
    section["baselines"] = _baselines(sub, summary, factor, values, factor, score_name, cka_asked)
    if len(values) > 1:
        section["effects"] = {
            "heading": f"Effect sizes: {factor}",
            "pooled": pooled,
            "rows": _effects_rows(factor_effects(frame, plan, factor)),
        }
        peaks = peak_values(summary, factor)
        section["peak"] = [f"{_WHAT_TEXT[w]}: {v} ({num(m)})" for w, (v, m) in peaks.items()]
    return section


def _single_cell_section(run: RunData, score_name: str, cka_asked: bool, curves: bool) -> dict[str, Any]:
    """A spec without factors: its table, and its per-layer curves unless the headline
    figure (``curves`` False) already shows them."""
    frame = run.frame
    task = str(frame["task"].iloc[0])
    single = dict(_plan(run), factors={"task": [task]}, design="grid")
    one = factor_summary(frame, run.outputs, single, "task", cka=run.cka)
    images = []
    if curves:
        layers = layer_summaries(frame, None, [], _MAIN)
        images.append(
            _image("per-layer similarity", figures.layer_panels_figure(layers, None, [], "per-layer similarity"))
        )
    return {
        "id": None,
        "heading": "All trials",
        "note": None,
        "images": images,
        "table": _table(one, "task", score_name),
        "baselines": _baselines(frame, one, None, [], "task", score_name, cka_asked),
        "effects": None,
        "peak": [],
    }


def _dose_section(run: RunData, score_name: str) -> dict[str, Any] | None:
    plan = _plan(run)
    factor = dose_factor(plan)
    dose = dose_summary(run.frame, run.outputs, plan, factor)
    if dose.empty:
        return None
    pooled = [f for f in plan["factors"] if f != factor]
    note = f"; pooled over {', '.join(pooled)}" if pooled and plan.get("design") != "separate" else ""
    rows = []
    for p in dose_peaks(dose):
        rows.append(
            [
                _text(p["value"] if factor else "all"),
                _text(p["peak_step"]),
                _cell(p["icl_it_at_peak"]),
                _cell(p["it_score_at_peak"]),
                _cell(p["train_loss_at_peak"], "{:#.3g}"),
                _text(p["peak_step_mean"]),
                _cell(p["icl_it_mean_at_peak"]),
                _text(p["last_step"]),
                _cell(p["icl_it_at_last"]),
                _cell(p["it_score_at_last"]),
            ]
        )
    head = [
        factor or "",
        "peak step (last layer)",
        "ICL–IT there",
        f"IT {score_name} there",
        "loss there",
        "peak step (mean over layers)",
        "ICL–IT there",
        "last step",
        "ICL–IT at last step",
        f"IT {score_name} at last step",
    ]
    return {
        "note": note,
        "image": _image("IT dose curves", figures.dose_figure(dose, factor, score_name)),
        "table": {"cls": "dose", "head": head, "rows": rows},
    }


# ------------------------------------------------------------------ the page


def _context(run: RunData) -> dict[str, Any]:
    latest, plan = run.latest, _plan(run)
    if latest is None:
        raise FileNotFoundError(f"{run.path}: the store holds no run")
    spec_yaml = latest["spec_yaml"]
    try:
        import yaml

        spec = yaml.safe_load(spec_yaml) or {}
    except Exception:  # noqa: BLE001 - the report still shows the text
        spec = {}
    if not isinstance(spec, Mapping):
        spec = {}
    score_name = score_label(run.outputs)
    cka_asked = "cka" in (spec.get("baselines") or ())
    factors = list(plan["factors"])
    headline = headline_section(run)
    sections = [_factor_section(run, f, score_name, cka_asked) for f in factors]
    if not factors and not run.frame.empty:
        sections.append(_single_cell_section(run, score_name, cka_asked, not (headline and headline["figure"])))
    name = str(spec.get("name", run.path.name))
    return {
        "title": f"iclit report · {name}",
        "name": name,
        "done": int(len(run.outputs)),
        "plan": plan,
        "run": latest,
        "fixed": ", ".join(f"{k} = {v}" for k, v in plan["base"].items() if k not in plan["factors"]),
        "description": spec.get("description"),
        "empty": run.frame.empty,
        "headline": headline,
        "sections": sections,
        "dose": None if run.frame.empty else _dose_section(run, score_name),
        "nulls": nulls_section(run),
        "contrasts": contrasts_section(run),
        "causal": causal_section(run),
        "spec_yaml": spec_yaml,
        "versions": [(str(k), str(v)) for k, v in (latest.get("versions") or {}).items()],
    }


def render_report(run_dir: str | Path | RunData) -> str:
    """The report of a run directory (or of an already loaded :class:`RunData`) as one HTML string."""
    run = run_dir if isinstance(run_dir, RunData) else load_run(run_dir)
    if run.latest is None:
        raise FileNotFoundError(f"{run.path}: the store holds no run")
    if run.plan is None:  # read with all_trials: the report still describes the last run's plan
        run = dataclasses.replace(run, plan=run.latest["plan"])
    return _environment().get_template("report.html.j2").render(**_context(run))


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of ``run_dir`` (default ``run_dir/report.html``) atomically; returns its path."""
    from iclit._atomic import atomic_write_text

    run_dir = Path(run_dir)
    target = Path(out) if out is not None else run_dir / "report.html"
    text = render_report(run_dir)
    return atomic_write_text(target, text)
