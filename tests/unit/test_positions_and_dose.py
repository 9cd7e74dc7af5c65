"""Two reviewer options: states averaged over the query's tokens (``query_mean``) instead of the
last token, and the IT dose read at several optimiser steps of one training run
(``TuningRecipe.capture_steps``). Checked against plain transformers / separate training runs
on the tiny random LLaMA."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from iclit.arms import ArmContext, get_arm
from iclit.capture import capture, span_start_token
from iclit.experiments.compare import evaluate
from iclit.experiments.spec import SpecError, loads_spec
from iclit.metrics import PAIRS, cosine_per_layer, step_pair
from iclit.models import prepare
from iclit.models.tiny import build_tiny_llama
from iclit.tasks import draw_resamples, get_task
from iclit.tuning import TuningRecipe

ATOL = 1e-5


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    return prepare(build_tiny_llama(len(tiny_tokenizer), seed=0), tiny_tokenizer, name="tiny-llama", device="cpu")


@pytest.fixture(scope="module")
def task():
    return get_task("sentiment")


def plain_mean_over_query(lm, prompt: str, query_block: str) -> torch.Tensor:
    """[L+1, d]: a plain HF forward of the unpadded prompt, states averaged over the tokens
    from where ``query_block`` starts (found by tokenising the text before it)."""
    assert prompt.endswith(query_block)
    head = prompt[: len(prompt) - len(query_block)]
    enc = lm.tokenizer(prompt, return_tensors="pt")
    start = len(lm.tokenizer(head)["input_ids"]) if head else 1  # the BOS token is not the query
    with torch.no_grad():
        out = lm.model(**enc, output_hidden_states=True)
    return torch.stack([h[0, start:].mean(dim=0) for h in out.hidden_states])


def test_span_start_token_is_the_first_query_token(lm, task):
    t = task.template
    prompt = t.query("The soup was cold.")
    block = t.query("The soup was cold.", with_instruction=False)
    start = span_start_token(lm.tokenizer, prompt, len(prompt) - len(block))
    ids = lm.tokenizer(prompt)["input_ids"]
    assert lm.tokenizer.decode(ids[start:]).lstrip() == block.lstrip()
    assert span_start_token(lm.tokenizer, block, 0) == 1  # after BOS
    with pytest.raises(ValueError, match="outside the prompt"):
        span_start_token(lm.tokenizer, prompt, len(prompt))


def test_query_mean_matches_a_plain_forward_with_and_without_prefix_cache(lm, task):
    draws = draw_resamples(task, 3, 4, 0)
    t = task.template
    # two queries share each demonstration set, so the prefix cache is used
    prompts = [t.icl_prompt(draws[i // 2].demonstrations, draws[i].query) for i in range(4)]
    prefixes = [t.icl_prefix(draws[i // 2].demonstrations) for i in range(4)]
    blocks = [t.query(d.query.input, with_instruction=False) for d in draws]
    span_from = [len(p) - len(b) for p, b in zip(prompts, blocks)]
    fast = capture(lm.model, lm.tokenizer, prompts, prefixes=prefixes, span_from=span_from, batch_size=3)
    slow = capture(lm.model, lm.tokenizer, prompts, span_from=span_from, reference=True, batch_size=4)
    plain = capture(lm.model, lm.tokenizer, prompts)
    torch.testing.assert_close(fast.states, plain.states, atol=ATOL, rtol=0)  # last token unchanged
    for i in range(4):
        want = plain_mean_over_query(lm, prompts[i], blocks[i])
        torch.testing.assert_close(fast.pooled[i], want, atol=ATOL, rtol=0)
        torch.testing.assert_close(slow.pooled[i], want, atol=ATOL, rtol=0)
    assert not torch.allclose(fast.pooled[:, -1], fast.states[:, -1])  # another position indeed


def test_query_mean_pairs_in_evaluate(lm, task):
    draws = draw_resamples(task, 2, 3, 0)
    cell = evaluate(lm, task, draws, recipe=TuningRecipe(epochs=2), seed=0, baselines=["query_mean"])
    pooled = {arm: o.pooled for arm, o in cell.outputs.items()}
    for pair in PAIRS:
        left, right = pair.split("_")
        np.testing.assert_allclose(cell.cosines[f"{pair}_qmean"], cosine_per_layer(pooled[left], pooled[right]).numpy())
    # IT and anchor read the same query prompt: their pooled states differ only through tuning
    assert np.all(cell.cosines["anchor_it_qmean"][:, 0] > 1 - 1e-6)  # embeddings: no tuning there
    slow = evaluate(lm, task, draws, recipe=TuningRecipe(epochs=2), seed=0, baselines=["query_mean"], fast=False)
    for pair in PAIRS:
        np.testing.assert_allclose(slow.cosines[f"{pair}_qmean"], cell.cosines[f"{pair}_qmean"], atol=1e-4)


@pytest.mark.parametrize("fast", [True, False], ids=["batched", "peft"])
def test_dose_steps_equal_shorter_runs(lm, task, fast):
    """States read after step s of a 4-step run are those of a run of s steps."""
    draws = draw_resamples(task, 2, 2, 0)
    ctx = ArmContext(lm, task, draws, TuningRecipe(epochs=4, capture_steps=(1, 3)), seed=0, fast=fast)
    out = get_arm("it")(ctx)
    assert sorted(out.by_step) == [1, 3]
    for step in (1, 3):
        short = get_arm("it")(replace(ctx, recipe=TuningRecipe(epochs=step)))
        torch.testing.assert_close(out.by_step[step].states, short.states, atol=ATOL, rtol=0)
        assert out.by_step[step].predictions == short.predictions
    final = get_arm("it")(replace(ctx, recipe=TuningRecipe(epochs=4)))
    torch.testing.assert_close(out.states, final.states, atol=ATOL, rtol=0)  # reading does not disturb training
    for got, want in zip(out.tuning, final.tuning):
        assert got.losses == pytest.approx(want.losses, abs=1e-6)


def test_dose_batched_equals_sequential_peft(lm, task):
    draws = draw_resamples(task, 2, 3, 1)
    recipe = TuningRecipe(epochs=3, capture_steps=(1, 2))
    fast = get_arm("it")(ArmContext(lm, task, draws, recipe, seed=0, fast=True))
    slow = get_arm("it")(ArmContext(lm, task, draws, recipe, seed=0, fast=False))
    for step in (1, 2):
        torch.testing.assert_close(fast.by_step[step].states, slow.by_step[step].states, atol=1e-4, rtol=0)


def test_dose_cosines_and_scores_in_trials(lm, task):
    draws = draw_resamples(task, 2, 3, 0)
    cell = evaluate(lm, task, draws, recipe=TuningRecipe(epochs=3, capture_steps=(1, 3)), seed=0)
    states = {arm: o.states for arm, o in cell.outputs.items()}
    last = cell.outputs["it"].by_step[3]
    torch.testing.assert_close(last.states, states["it"], atol=0, rtol=0)  # step 3 is the end of training
    np.testing.assert_allclose(cell.cosines[step_pair("icl_it", 3)], cell.cosines["icl_it"])
    np.testing.assert_allclose(
        cell.cosines[step_pair("anchor_it", 1)],
        cosine_per_layer(states["anchor"], cell.outputs["it"].by_step[1].states).numpy(),
    )
    for i, trial in enumerate(cell.trials):
        assert trial["dose"]["steps"] == [1, 3]
        assert trial["dose"]["score"][1] == cell.scores["it"][i]
        assert len(trial[step_pair("icl_it", 1)]) == lm.n_layers + 1


def test_capture_steps_validation():
    with pytest.raises(ValueError, match="go past the last step"):
        TuningRecipe(epochs=4, capture_steps=(2, 8))
    with pytest.raises(ValueError, match=">= 1"):
        TuningRecipe(capture_steps=(0,))
    assert TuningRecipe(capture_steps=(4, 1, 4)).capture_steps == (1, 4)
    assert "capture_steps" not in TuningRecipe().to_dict()  # plain recipes keep their trial keys
    base = "name: x\nmodel: tiny-random-llama\ntask: sentiment\nresamples: 2\n"
    spec = loads_spec(base + "recipe: {epochs: 8, capture_steps: [1, 2, 8]}\n")
    assert spec.recipe.capture_steps == (1, 2, 8)
    with pytest.raises(SpecError, match="recipe.capture_steps"):
        loads_spec(base + "recipe: {capture_steps: [a]}\n")
    with pytest.raises(SpecError, match="go past the last step"):
        loads_spec(base + "recipe: {epochs: 4, capture_steps: [8]}\n")
