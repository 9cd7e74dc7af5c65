"""The memory planner splits the batched IT work to fit a budget, and the numbers stay the same."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iclit.engine.evaluate import evaluate
from iclit.engine.memory import CPU_TOKENS, CUDA_TOKENS, MAX_ADAPTERS, parse_bytes, plan_memory
from iclit.tasks import draw_resamples, get_task
from iclit.tuning import TuningRecipe


def test_parse_bytes() -> None:
    assert parse_bytes("8GiB") == 8 * 2**30 and parse_bytes("512 MB") == 512 * 2**20 and parse_bytes(1000) == 1000
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes("lots")


def test_plenty_of_memory_gives_the_caps(tiny) -> None:
    plan = plan_memory(tiny.model, tiny.device, budget="16GiB")
    cap = CUDA_TOKENS if tiny.device.type == "cuda" else CPU_TOKENS
    assert plan.train_tokens == cap and plan.adapters_per_pass == MAX_ADAPTERS
    assert "16.00 GiB" in plan.describe()


def test_small_budget_splits_the_work(tiny) -> None:
    big = plan_memory(tiny.model, tiny.device, budget="16GiB")
    small = plan_memory(tiny.model, tiny.device, budget=3 * big.per_adapter + 200 * big.per_token)
    assert small.adapters_per_pass < big.adapters_per_pass and small.train_tokens < big.train_tokens
    assert small.adapters_per_pass >= 1 and small.train_tokens >= 64
    forced = plan_memory(tiny.model, tiny.device, budget=1, train_tokens=500, adapters_per_pass=7)
    assert (forced.train_tokens, forced.adapters_per_pass) == (500, 7)  # explicit values win


def test_split_work_gives_the_same_numbers(tiny) -> None:
    task = get_task("sentiment")
    draws = draw_resamples(task, 4, 5, 0)
    recipe = TuningRecipe(epochs=3)
    whole = evaluate(tiny, task, draws, recipe=recipe, memory={"memory_budget": "16GiB"})
    tiny.memo.clear()
    split = evaluate(tiny, task, draws, recipe=recipe, memory={"adapters_per_pass": 2, "max_train_tokens": 64})
    for name in ("anchor", "icl", "it"):
        np.testing.assert_allclose(split.states[name].numpy(), whole.states[name].numpy(), atol=2e-5, rtol=1e-5)
    losses = [[t["it_final_loss"] for t in e.trials] for e in (whole, split)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4, atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(split.states["it"], whole.states["it"], dim=-1)
    assert float(cos.min()) > 0.99999
