"""The one training loop of both tuning paths: epochs, each group's seeded data order,
optimiser steps with clipping, the capture-step (dose) callbacks, loss bookkeeping and the
final loss.

A path plugs in only what differs between them (:func:`train`): how a step's loss and
gradient are computed for some rows, how gradients are clipped, and how the final loss is
read. The single-adapter path (:func:`iclit.tuning.fit`) is one group of rows; the batched
path (:func:`iclit.tuning.fit_many`) one group per adapter, each with its own generator,
their rows taken together in every step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from iclit.tuning.recipe import TuningRecipe, TuningResult


class TuningDivergedError(ValueError):
    """The IT loss became NaN or infinite: the recipe does not fit these demonstrations."""


def _check_finite(recipe: TuningRecipe, losses: Sequence[float], step: int | None) -> None:
    bad = [(g, x) for g, x in enumerate(losses) if not math.isfinite(x)]
    if bad:
        g, x = bad[0]
        when = f"at optimiser step {step}" if step is not None else "after training"
        raise TuningDivergedError(
            f"the IT answer loss became {x} {when} (adapter {g + 1} of {len(losses)}, lr {recipe.learning_rate:g}, "
            f"method {recipe.method}): the recipe diverged on these demonstrations; lower recipe.lr or the epochs"
        )


StepLoss = Callable[[list[int]], torch.Tensor]
"""Forward and backward on the rows of one optimiser step; returns each group's loss [G]
(detached; entries of groups without rows in the step are ignored)."""


def check_capture_steps(recipe: TuningRecipe, total: int) -> None:
    late = [x for x in recipe.capture_steps if x > total]
    if late:
        raise ValueError(f"tuning capture_steps {late} go past the last of the run's {total} optimiser steps")


def after_step(model: nn.Module, recipe: TuningRecipe, step: int, on_step: Callable[[int], None] | None) -> None:
    """Call ``on_step(step)`` (model in eval mode) when ``step`` is one of the capture steps."""
    if on_step is not None and step in recipe.capture_steps:
        model.eval()
        try:
            on_step(step)
        finally:
            model.train()


def epoch_order(members: Sequence[int], size: int, gen: torch.Generator) -> Sequence[int]:
    """A group's rows in this epoch's order: a fresh permutation from its generator when it
    takes more than one step per epoch, else as given (no draw)."""
    if size < len(members):
        return [members[i] for i in torch.randperm(len(members), generator=gen).tolist()]
    return members


def train(
    model: nn.Module,
    recipe: TuningRecipe,
    params: Sequence[nn.Parameter],
    groups: Sequence[Sequence[int]],
    seeds: Sequence[int],
    *,
    step_loss: StepLoss,
    clip: Callable[[float], None],
    final_loss: Callable[[], torch.Tensor],
    fused: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> list[TuningResult]:
    """Train ``params`` with AdamW (constant learning rate) for ``recipe.epochs`` epochs;
    one :class:`TuningResult` per group.

    groups: the rows each group trains on (for each, ``seeds`` gives its data-order
    generator); a group takes ``recipe.batch_size`` of its rows per step (0: all of them),
    and a step runs the groups' next slices together, so an epoch is as many steps as its
    largest group needs. Each step: ``step_loss(rows)``, then ``clip(recipe.max_grad_norm)``,
    the optimiser step, the loss recorded for every group with rows in it, and ``on_step``
    after the capture steps (:func:`after_step`). After the last: ``final_loss()`` [G], with
    the model in eval mode and no gradient. fused: AdamW's fused kernel.
    """
    start = time.perf_counter()
    opt = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay, fused=fused or None)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    sizes = [recipe.batch_size or len(m) for m in groups]
    per_epoch = [math.ceil(len(m) / s) for m, s in zip(groups, sizes, strict=True)]
    steps = max(per_epoch)
    check_capture_steps(recipe, recipe.epochs * steps)
    if recipe.capture_steps and len(set(per_epoch)) > 1:
        raise ValueError(
            "capture_steps need every adapter to take the same number of steps per epoch "
            "(the same number of demonstrations, or full batches)"
        )
    results = [TuningResult() for _ in groups]
    done = 0
    model.train()
    try:
        for _ in range(recipe.epochs):
            orders = [epoch_order(m, size, g) for m, g, size in zip(groups, gens, sizes, strict=True)]
            for step in range(steps):
                slices = [order[step * size : (step + 1) * size] for order, size in zip(orders, sizes, strict=True)]
                losses = step_loss([r for part in slices for r in part])
                _check_finite(recipe, [x for part, x in zip(slices, losses.tolist(), strict=True) if part], done + 1)
                clip(recipe.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                for result, part, loss in zip(results, slices, losses.tolist(), strict=True):
                    if part:
                        result.losses.append(loss)
                done += 1
                after_step(model, recipe, done, on_step)
    finally:
        model.eval()
    with torch.no_grad():
        final = final_loss().tolist()
    _check_finite(recipe, final, None)
    seconds = time.perf_counter() - start
    for result, loss in zip(results, final, strict=True):
        result.final_loss = float(loss)
        result.seconds = seconds / len(groups)
    return results
