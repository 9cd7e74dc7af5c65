"""Two reviewer options: states averaged over the query's tokens (``query_mean``) instead of the
last token, and the IT dose read at several optimiser steps of one training run
(``TuningRecipe.capture_steps``). Checked against plain transformers / separate training runs
on the tiny random LLaMA."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from iclit.analysis import PAIRS, cosine_per_layer, step_pair
from iclit.analysis.frames import similarities
from iclit.engine.arms import ArmContext, get_arm
from iclit.engine.capture import capture, span_start_token
from iclit.engine.evaluate import evaluate
from iclit.experiments.spec import SpecError, loads_spec
from iclit.tasks import draw_resamples, get_task
from iclit.tuning import TuningRecipe

ATOL = 1e-5


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
    span_from = [len(p) - len(b) for p, b in zip(prompts, blocks, strict=True)]
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
    cos = similarities(cell.states, ["query_mean"])
    pooled = {arm: o.pooled for arm, o in cell.outputs.items()}
    for pair in PAIRS:
        left, right = pair.split("_")
        np.testing.assert_allclose(cos[f"{pair}_qmean"], cosine_per_layer(pooled[left], pooled[right]).numpy())
    # IT and anchor read the same query prompt: their pooled states differ only through tuning
    assert np.all(cos["anchor_it_qmean"][:, 0] > 1 - 1e-6)  # embeddings: no tuning there
    slow = evaluate(lm, task, draws, recipe=TuningRecipe(epochs=2), seed=0, baselines=["query_mean"], fast=False)
    slow_cos = similarities(slow.states, ["query_mean"])
    for pair in PAIRS:
        np.testing.assert_allclose(slow_cos[f"{pair}_qmean"], cos[f"{pair}_qmean"], atol=1e-4)


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
    for got, want in zip(out.tuning, final.tuning, strict=True):
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
    cos = similarities(cell.states)
    states = {arm: o.states for arm, o in cell.outputs.items()}
    last = cell.outputs["it"].by_step[3]
    torch.testing.assert_close(last.states, states["it"], atol=0, rtol=0)  # step 3 is the end of training
    torch.testing.assert_close(cell.states["it:step1"], cell.outputs["it"].by_step[1].states.float(), atol=0, rtol=0)
    np.testing.assert_allclose(cos[step_pair("icl_it", 3)], cos["icl_it"])
    np.testing.assert_allclose(
        cos[step_pair("anchor_it", 1)],
        cosine_per_layer(states["anchor"], cell.outputs["it"].by_step[1].states).numpy(),
    )
    for i, trial in enumerate(cell.trials):
        assert trial["dose"]["steps"] == [1, 3]
        assert trial["dose"]["score"][1] == cell.scores["it"][i]
    assert cos[step_pair("icl_it", 1)].shape == (len(draws), lm.n_layers + 1)  # per trial and layer


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
    # minibatches: the number of steps depends on k, checked per k before anything runs
    with pytest.raises(SpecError, match=r"k=2 demonstrations in batches of 2 make in 3 epochs"):
        loads_spec(base + "recipe: {epochs: 3, batch_size: 2, capture_steps: [6]}\nfactors: {k: [2, 4]}\n")
    assert loads_spec(base + "k: 4\nrecipe: {epochs: 3, batch_size: 2, capture_steps: [6]}\n").recipe.batch_size == 2


def test_dose_and_query_mean_through_the_runner_and_report(tmp_path):
    """A spec with capture_steps and query_mean: the store holds the step pairs and the dose
    record; the report's dose table is computed from them and its peak is the argmax."""
    from iclit.analysis import load_run
    from iclit.experiments import run_experiment
    from iclit.report import dose_summary, render_report

    spec = loads_spec(
        "name: dose\nmodel: tiny-random-llama\ntask: sentiment\nk: 2\nresamples: 4\nchunk_size: 2\n"
        "baselines: [query_mean]\nrecipe: {epochs: 4, capture_steps: [1, 2, 4]}\n"
        "factors:\n  recipe: [{lr: 1.0e-3}, {lr: 1.0e-2}]\n"
    )
    run_experiment(spec, tmp_path / "run")
    run = load_run(tmp_path / "run")
    plan, frame, outputs = run.plan, run.frame, run.outputs
    pairs = set(frame["pair"])
    assert {step_pair("icl_it", s) for s in (1, 2, 4)} <= pairs and "icl_it_qmean" in pairs
    dose = dose_summary(frame, outputs, plan, "recipe")
    assert len(dose) == 2 * 3 and set(dose["step"]) == {1, 2, 4}
    row = dose[(dose["step"] == 2)].iloc[1]  # the second recipe, step 2
    keys = outputs[outputs["recipe"].astype(str) == str(row["value"])]["trial_key"]
    last = frame[(frame["pair"] == "icl_it_step2") & frame["trial_key"].isin(keys)]
    last = last[last["layer"] == last["layer"].max()]
    assert row["icl_it:last_layer"]["mean"] == pytest.approx(last["cosine"].mean())
    # the loss after 2 updates
    want_loss = np.mean([losses[2] for losses in outputs[outputs["trial_key"].isin(keys)]["it_losses"]])
    assert row["train_loss"]["mean"] == pytest.approx(want_loss)
    # step 4 is the end of training: its pair equals the plain icl_it pair
    end = frame[frame["pair"] == "icl_it_step4"].set_index(["trial_key", "layer"])["cosine"]
    plain = frame[frame["pair"] == "icl_it"].set_index(["trial_key", "layer"])["cosine"]
    np.testing.assert_allclose(end.sort_index().to_numpy(), plain.sort_index().to_numpy())
    final = dose[dose["step"] == 4].iloc[0]["train_loss"]["mean"]  # after the last update: the final loss
    first = outputs[outputs["recipe"].astype(str) == str(dose.iloc[0]["value"])]["it_final_loss"].mean()
    assert final == pytest.approx(first)
    page = render_report(tmp_path / "run")
    assert "id=dose" in page and "ICL – IT, mean over the query" in page
    # the nested per-trial columns (losses per step, dose record) export as JSON text
    from typer.testing import CliRunner

    from iclit.cli import app

    runner = CliRunner()
    shown = runner.invoke(app, ["results", str(tmp_path / "run"), "--outputs"], env={"COLUMNS": "250"})
    assert shown.exit_code == 0, shown.output
    table = tmp_path / "outputs.parquet"
    done = runner.invoke(app, ["results", str(tmp_path / "run"), "--outputs", "-f", "parquet", "-o", str(table)])
    assert done.exit_code == 0, done.output
    import json as _json

    back = pd.read_parquet(table)
    assert _json.loads(back["dose"].iloc[0])["steps"] == [1, 2, 4]


def test_dose_with_k_zero_resamples(lm, task):
    """k = 0: nothing to tune, every step reads the base model (no self-reference)."""
    draws = draw_resamples(task, 0, 2, 0)
    out = get_arm("it")(ArmContext(lm, task, draws, TuningRecipe(epochs=2, capture_steps=(1, 2)), seed=0))
    assert sorted(out.by_step) == [1, 2]
    torch.testing.assert_close(out.by_step[1].states, out.states, atol=0, rtol=0)
    assert not out.by_step[1].by_step
