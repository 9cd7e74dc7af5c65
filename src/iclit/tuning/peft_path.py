"""The single-model tuning path: one PEFT LoRA adapter injected into the base model, or full
fine-tuning of a copy (:func:`tuned`), trained by :func:`fit` on the shared loop."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from iclit.models.arch import ALL_LINEAR, resolve_targets, target_linears
from iclit.tuning.embedding_rows import embedding_rows_grad
from iclit.tuning.loop import train
from iclit.tuning.loss import AnswerBatch, answer_loss, encode_pairs, reference_answer_loss, subset_batch
from iclit.tuning.recipe import TuningRecipe, TuningResult


def fit(
    model: nn.Module,
    params: list[nn.Parameter],
    batch: AnswerBatch,
    recipe: TuningRecipe,
    seed: int,
    *,
    reference: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> TuningResult:
    """Train ``params`` of ``model`` on ``batch`` with AdamW, constant learning rate
    (:func:`iclit.tuning.loop.train`, one group of rows drawn with ``seed``).

    A step's loss is the mean answer-token loss of its sequences; gradients are clipped by
    their global norm over ``params``; the final loss is :func:`answer_loss` on all of
    ``batch``.

    reference: compute the training loss with :func:`reference_answer_loss` (for checking).
    on_step: called (model in eval mode) with the step number after each optimiser step in
    ``recipe.capture_steps``.

    Full fine-tuning (not ``reference``) takes the input embedding's gradient as the rows of
    the tokens seen (:func:`~iclit.tuning.embedding_rows.embedding_rows_grad`: the same bits,
    without a dense pass over the vocabulary's table per step) and AdamW's fused kernel."""
    loss_fn = reference_answer_loss if reference else answer_loss
    n = batch.input_ids.shape[0]
    fast_full = recipe.method == "full" and not reference
    with embedding_rows_grad(model) if fast_full else nullcontext(lambda: None) as flush:

        def step_loss(rows: list[int]) -> torch.Tensor:
            loss = loss_fn(model, batch if len(rows) == n else subset_batch(batch, rows))
            loss.backward()
            flush()
            return loss.detach().reshape(1)

        def clip(max_norm: float) -> None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)

        # Full fine-tuning updates every weight: the fused AdamW kernel does that step several
        # times faster than the per-tensor loop (same algorithm; float rounding differs).
        (result,) = train(
            model,
            recipe,
            params,
            [list(range(n))],
            [seed],
            step_loss=step_loss,
            clip=clip,
            final_loss=lambda: answer_loss(model, batch).reshape(1),
            fused=fast_full,
            on_step=on_step,
        )
    return result


def lora_config(recipe: TuningRecipe, model: nn.Module | None = None):
    """The PEFT ``LoraConfig`` of a recipe (rank, alpha, dropout, target modules, no bias).

    With ``model``, the recipe's targets are resolved for its architecture
    (:func:`iclit.models.arch.resolve_targets`: the default means the query and value
    projections, ``"all-linear"`` every linear layer but the head; a target that matches no
    linear layer is a ValueError), and ``fan_in_fan_out`` is set when every target is a
    ``Conv1D`` (GPT-2), as PEFT would set it itself, with a warning. Without ``model`` the
    targets go to PEFT as written (``"all-linear"`` as its shorthand, ``None`` as "PEFT's own
    default for the model type").
    """
    from peft import LoraConfig

    targets: list[str] | str | None = None if recipe.targets is None else list(recipe.targets)
    if targets == [ALL_LINEAR]:
        targets = ALL_LINEAR
    fan_in_fan_out = False
    if model is not None:
        targets = list(resolve_targets(model, recipe.targets))
        fan_in_fan_out = all(isinstance(m, Conv1D) for _, m in target_linears(model, targets))
    return LoraConfig(
        r=recipe.rank,
        lora_alpha=recipe.alpha,  # type: ignore[arg-type]  # peft annotates it int; it takes a float (alpha / r)
        lora_dropout=recipe.dropout,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
    )


@contextmanager
def tuned(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    recipe: TuningRecipe,
    *,
    seed: int = 0,
    reference: bool = False,
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> Iterator[tuple[nn.Module, TuningResult]]:
    """Tune on ``pairs`` and yield (tuned model, result); the base model is restored after.

    reference: use transformers' own ``labels=`` loss (the straightforward path).
    on_step: called as ``on_step(step, model)`` after each step of ``recipe.capture_steps``.

    LoRA: a fresh PEFT adapter is injected into ``model`` and removed (unmerged) on exit, so
    the base weights are never changed. Full: a deep copy is tuned and dropped on exit.
    """
    device = next(model.parameters()).device
    batch = encode_pairs(tokenizer, pairs).to(device)
    torch.manual_seed(seed)
    if recipe.method == "lora":
        from peft import get_peft_model

        with warnings.catch_warnings():  # PEFT calls a transformers method deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, lora_config(recipe, model))
        try:
            params = [p for p in peft_model.parameters() if p.requires_grad]
            hook = (lambda s: on_step(s, peft_model)) if on_step else None
            result = fit(peft_model, params, batch, recipe, seed, reference=reference, on_step=hook)
            yield peft_model, result
        finally:
            peft_model.unload()
            vars(model).pop("peft_config", None)
            model.requires_grad_(False)
    else:
        clone = copy.deepcopy(model)
        clone.requires_grad_(True)
        try:
            hook = (lambda s: on_step(s, clone)) if on_step else None
            result = fit(clone, list(clone.parameters()), batch, recipe, seed, reference=reference, on_step=hook)
            clone.requires_grad_(False)
            yield clone, result
        finally:
            del clone
