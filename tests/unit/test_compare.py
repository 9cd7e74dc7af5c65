"""iclit.api.run_comparison: the anchor / ICL / IT comparison end to end on the tiny model
(a one-cell spec run through the runner into a run directory, read back by iclit.analysis)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from iclit.analysis import PAIRS
from iclit.api import Comparison, compare, run_comparison
from iclit.engine.arms import ArmContext
from iclit.engine.capture import capture
from iclit.models import prepare
from iclit.models.tiny import build_tiny_llama
from iclit.tasks import TaskDataError, draw_resamples, get_task, load_task
from iclit.tuning import TuningRecipe, tuned

RECIPE = TuningRecipe(epochs=3)
K = 2
N = 3
TRIAL_KEYS = {
    "resample",
    "query_id",
    "query",
    "gold",
    "demonstration_ids",
    "demonstration_outputs",
    "query_prompt",
    "icl_prompt",
    "it_training_texts",
    *PAIRS,
    "predictions",
    "it_final_loss",
    "it_losses",
}


def fresh_tiny(tokenizer, seed: int = 0):
    return prepare(build_tiny_llama(len(tokenizer), seed=seed), tokenizer, name="tiny-llama", device="cpu")


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    """One tiny model for the module: the comparison restores it after every IT run."""
    return fresh_tiny(tiny_tokenizer)


@pytest.fixture(scope="module")
def sentiment(lm) -> Comparison:
    return run_comparison(lm, "sentiment", k=K, resamples=N, seed=0, recipe=RECIPE)


@pytest.fixture(scope="module")
def translation(lm) -> Comparison:
    return run_comparison(lm, "translation-en-cs", k=K, resamples=2, seed=0, recipe=RECIPE, max_new_tokens=6)


# --- shapes and records ------------------------------------------------------------------


@pytest.mark.parametrize("which", ["sentiment", "translation"])
def test_shapes(which, request, lm):
    result: Comparison = request.getfixturevalue(which)
    n = result.config["resamples"]
    L1 = lm.n_layers + 1
    assert len(result.trials) == n
    for arm in ("anchor", "icl", "it"):
        assert result.states[arm].shape == (n, L1, lm.hidden_size)
    for trial in result.trials:
        assert TRIAL_KEYS <= trial.keys(), TRIAL_KEYS - trial.keys()
        for pair in PAIRS:
            assert len(trial[pair]) == L1
            assert all(np.isfinite(trial[pair])) and all(-1.0 <= c <= 1.0 + 1e-6 for c in trial[pair])
        assert set(trial["predictions"]) == {"anchor", "icl", "it"}
        assert len(trial["demonstration_ids"]) == K == len(trial["it_training_texts"])
        assert len(trial["it_losses"]) == RECIPE.epochs
        assert np.isfinite(trial["it_final_loss"])
    assert list(result.summary.columns) == ["pair", "layer", "mean", "std", "ci_low", "ci_high", "n"]
    assert len(result.summary) == 3 * L1
    assert len(result.frame) == n * L1 * 3


def test_classification_trials(sentiment):
    task = get_task("sentiment")
    for trial in sentiment.trials:
        assert trial["gold"] in task.labels
        assert all(p in task.labels for p in trial["predictions"].values())
        assert set(trial["correct"]) == {"anchor", "icl", "it"}
        for arm in ("anchor", "icl", "it"):
            probs = trial["label_probs"][arm]
            assert set(probs) == set(task.labels)
            assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
            # the prediction is the most probable label
            assert trial["predictions"][arm] == max(probs, key=probs.get)
            assert trial["correct"][arm] == float(trial["predictions"][arm] == trial["gold"])
    acc = sentiment.metrics["accuracy"]
    for arm in ("anchor", "icl", "it"):
        assert acc[arm]["mean"] == pytest.approx(np.mean([t["correct"][arm] for t in sentiment.trials]))


def test_generation_trials(translation):
    for trial in translation.trials:
        assert "label_probs" not in trial
        assert set(trial["chrf"]) == {"anchor", "icl", "it"}
        assert all(isinstance(p, str) and "\n" not in p for p in trial["predictions"].values())
    assert "chrf" in translation.metrics and "accuracy" not in translation.metrics


@pytest.mark.parametrize("which", ["sentiment", "translation"])
def test_prompts_hold_demonstrations_in_order_then_query(which, request):
    result: Comparison = request.getfixturevalue(which)
    task = get_task(result.config["task"])
    tpl = task.template
    for trial in result.trials:
        query = task.by_id(trial["query_id"])
        demos = [task.by_id(i) for i in trial["demonstration_ids"]]
        assert trial["query"] == query.input and trial["gold"] == query.output
        assert trial["query_id"] not in trial["demonstration_ids"]
        assert len(set(trial["demonstration_ids"])) == K
        assert trial["demonstration_outputs"] == [d.output for d in demos]
        assert trial["query_prompt"] == tpl.query(query.input)
        icl = trial["icl_prompt"]
        assert icl.startswith(tpl.instruction)
        assert icl.endswith(tpl.query(query.input, with_instruction=False))
        # each demonstration, with its answer, in the given order, before the query
        positions = [icl.index(tpl.demonstration(d)) for d in demos]
        assert positions == sorted(positions)
        assert icl.rindex(tpl.demonstration(demos[-1])) < len(icl) - len(tpl.query(query.input, with_instruction=False))
        assert icl == tpl.icl_prompt(demos, query)
        # IT trains on exactly the demonstrations, rendered as query prompt + answer
        assert trial["it_training_texts"] == [tpl.query(d.input) + tpl.answer(d.output) for d in demos]


def test_queries_are_distinct_and_match_the_sampler(sentiment):
    task = get_task("sentiment")
    draws = draw_resamples(task, K, N, seed=0)
    assert [t["query_id"] for t in sentiment.trials] == [r.query.id for r in draws]
    assert [t["demonstration_ids"] for t in sentiment.trials] == [[d.id for d in r.demonstrations] for r in draws]
    assert len({t["query_id"] for t in sentiment.trials}) == N


@pytest.mark.parametrize("which", ["sentiment", "translation"])
def test_layer_zero_cosines_are_one(which, request):
    """Layer 0 is the embedding of the last prompt token: the same token in every arm, and
    q/v LoRA does not touch embeddings."""
    result: Comparison = request.getfixturevalue(which)
    for trial in result.trials:
        for pair in PAIRS:
            assert trial[pair][0] == pytest.approx(1.0, abs=1e-6)
    # but deeper layers do see the demonstrations
    assert min(t["anchor_icl"][-1] for t in result.trials) < 0.999


def test_cosines_agree_with_states(sentiment):
    s = sentiment.states
    for pair in PAIRS:
        left, right = pair.split("_")
        cos = torch.nn.functional.cosine_similarity(s[left].double(), s[right].double(), dim=-1)
        got = np.array([t[pair] for t in sentiment.trials])
        np.testing.assert_allclose(got, cos.numpy(), atol=2e-6)
        frame = sentiment.frame[sentiment.frame["pair"] == pair].sort_values(["resample", "layer"])
        np.testing.assert_allclose(frame["cosine"].to_numpy(), cos.numpy().reshape(-1), atol=1e-9)
        summary = sentiment.summary[sentiment.summary["pair"] == pair].sort_values("layer")
        np.testing.assert_allclose(summary["mean"].to_numpy(), cos.numpy().mean(axis=0), atol=1e-9)
        assert (summary["n"] == N).all()


def test_arm_states_are_what_they_claim(sentiment, lm):
    """anchor = base model on the query prompt; ICL = base model on the ICL prompt; IT = the
    model tuned on exactly the trial's demonstrations, on the query prompt."""
    tok = lm.tokenizer
    trials = sentiment.trials
    anchor = capture(lm.model, tok, [t["query_prompt"] for t in trials]).states
    icl = capture(lm.model, tok, [t["icl_prompt"] for t in trials]).states
    torch.testing.assert_close(sentiment.states["anchor"], anchor, atol=1e-5, rtol=0)
    torch.testing.assert_close(sentiment.states["icl"], icl, atol=1e-5, rtol=0)
    task = get_task("sentiment")
    draws = draw_resamples(task, K, N, seed=0)
    ctx = ArmContext(lm, task, draws, RECIPE, seed=0)
    r = draws[1]
    with tuned(lm.model, tok, ctx.training_pairs(r), RECIPE, seed=ctx.tuning_seed(r)) as (model, result):
        it = capture(model, tok, [trials[1]["query_prompt"]]).states
    torch.testing.assert_close(sentiment.states["it"][1], it[0], atol=1e-4, rtol=0)
    assert trials[1]["it_final_loss"] == pytest.approx(result.final_loss, abs=1e-4)


def test_it_loss_goes_down(sentiment):
    for trial in sentiment.trials:
        assert trial["it_final_loss"] < trial["it_losses"][0]


def test_base_model_untouched_by_a_run(tiny):
    before = {n: t.clone() for n, t in tiny.model.state_dict().items()}
    run_comparison(tiny, "sentiment", k=K, resamples=2, recipe=RECIPE)
    after = tiny.model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert not hasattr(tiny.model, "peft_config")


def test_k_zero_makes_all_arms_the_anchor(tiny):
    result = run_comparison(tiny, "sentiment", k=0, resamples=2, recipe=RECIPE)
    for trial in result.trials:
        assert trial["icl_prompt"] == trial["query_prompt"]
        assert trial["demonstration_ids"] == [] and trial["it_training_texts"] == []
        for pair in PAIRS:
            assert trial[pair] == pytest.approx([1.0] * len(trial[pair]), abs=1e-6)


# --- determinism -------------------------------------------------------------------------


def test_same_seed_same_numbers_other_seed_different(tiny_tokenizer):
    def run(seed: int) -> Comparison:
        return run_comparison(fresh_tiny(tiny_tokenizer), "sentiment", k=K, resamples=2, seed=seed, recipe=RECIPE)

    a, b, c = run(1), run(1), run(2)
    assert json.dumps(a.trials) == json.dumps(b.trials)
    pd.testing.assert_frame_equal(a.summary, b.summary)
    for arm in a.states:
        assert torch.equal(a.states[arm], b.states[arm])
    assert [t["query_id"] for t in a.trials] != [t["query_id"] for t in c.trials]
    assert not np.allclose(a.summary["mean"], c.summary["mean"])


# --- outputs -----------------------------------------------------------------------------


def test_write(sentiment, tmp_path: Path, lm):
    out = sentiment.write(tmp_path / "run")
    assert out == tmp_path / "run"
    names = {p.name for p in out.iterdir()}
    assert {"trials.jsonl", "summary.csv", "layers.png", "config.json", "metrics.json"} <= names
    assert not [n for n in names if n.startswith(".")], "a temporary file was left behind"

    lines = (out / "trials.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == N
    trials = [json.loads(line) for line in lines]
    assert [t["resample"] for t in trials] == list(range(N))
    assert trials == json.loads(json.dumps(sentiment.trials))

    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    L1 = lm.n_layers + 1
    assert list(rows[0]) == ["pair", "layer", "mean", "std", "ci_low", "ci_high", "n"]
    assert len(rows) == 3 * L1
    want = sorted((p, layer) for p in PAIRS for layer in range(L1))
    assert sorted((r["pair"], int(r["layer"])) for r in rows) == want
    for r in rows:
        assert float(r["ci_low"]) <= float(r["mean"]) + 1e-9 <= float(r["ci_high"]) + 2e-9
        assert int(r["n"]) == N

    assert (out / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == 0 and config["k"] == K and config["resamples"] == N
    assert config["task"] == "sentiment" and config["model"] == "tiny-llama"
    assert config["recipe"]["epochs"] == RECIPE.epochs and config["recipe"]["method"] == "lora"
    assert config["recipe"]["lr"] == RECIPE.learning_rate
    assert isinstance(config["argv"], list)
    assert {"python", "torch", "transformers", "peft"} <= config["versions"].keys()
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"accuracy", "icl_it_agreement", "it_final_loss"} <= metrics.keys()


def test_write_twice_overwrites(sentiment, tmp_path: Path):
    sentiment.write(tmp_path)
    sentiment.write(tmp_path)
    assert len((tmp_path / "trials.jsonl").read_text().splitlines()) == N


def test_compare_returns_tidy_frame(lm):
    df = compare(lm, "sentiment", k=1, resamples=2, recipe=RECIPE)
    L1 = lm.n_layers + 1
    assert isinstance(df, pd.DataFrame)
    assert {"resample", "query_id", "layer", "pair", "cosine"} <= set(df.columns)
    assert len(df) == 2 * L1 * 3
    assert set(df["pair"]) == set(PAIRS)
    assert sorted(df["layer"].unique()) == list(range(L1))
    counts = df.groupby(["resample", "layer", "pair"]).size()
    assert (counts == 1).all() and len(counts) == 2 * L1 * 3
    assert {"summary", "metrics", "trials", "config"} <= df.attrs.keys()
    assert len(df.attrs["trials"]) == 2


# --- bad input ---------------------------------------------------------------------------


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded although the input is invalid")


@pytest.fixture()
def no_loading(monkeypatch):
    """Fail the test if a model is loaded: ``iclit.models.load_model`` is what the runner's
    model cache (``iclit.experiments.workers.loaded_model``) calls."""
    import iclit.experiments.runner as runner
    import iclit.experiments.workers as workers
    import iclit.models

    monkeypatch.setattr(iclit.models, "load_model", _must_not_load)
    monkeypatch.setattr(workers, "loaded_model", _must_not_load)
    monkeypatch.setattr(runner, "loaded_model", _must_not_load)


def test_k_larger_than_task(no_loading):
    n = len(get_task("sentiment"))
    with pytest.raises(TaskDataError, match=rf"needs at least k\+1 = {n + 1} examples"):
        run_comparison("some-org/some-model", "sentiment", k=n, resamples=1)


def test_too_many_resamples(no_loading):
    n = len(get_task("translation-en-cs"))
    with pytest.raises(TaskDataError, match=rf"{n + 1} resamples need {n + 1} distinct queries"):
        run_comparison("some-org/some-model", "translation-en-cs", k=1, resamples=n + 1)


@pytest.mark.parametrize(("k", "resamples", "match"), [(-1, 2, "k must be >= 0"), (2, 0, "resamples must be >= 1")])
def test_negative_k_or_no_resamples(k, resamples, match, no_loading):
    with pytest.raises(ValueError, match=match):
        run_comparison("some-org/some-model", "sentiment", k=k, resamples=resamples)


def test_unknown_model_fails_before_loading(no_loading):
    from iclit.models import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        run_comparison("./nope.gguf", "sentiment", k=1, resamples=1)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_user_task_label_outside_labels(tmp_path: Path):
    rows = [{"input": f"text {i}", "output": ["negative", "positive"][i % 2]} for i in range(6)]
    rows[2]["output"] = "neutral"  # line 3
    path = _write_jsonl(tmp_path / "mine.jsonl", rows)
    with pytest.raises(TaskDataError) as info:
        load_task(path, labels=("negative", "positive"))
    msg = str(info.value)
    assert str(path) in msg and "line 3" in msg and "'output'" in msg and "'neutral'" in msg


def test_user_task_missing_field_in_run(tmp_path: Path, tiny):
    rows = [{"input": f"text {i}", "output": ["negative", "positive"][i % 2]} for i in range(6)]
    del rows[4]["output"]  # line 5
    path = _write_jsonl(tmp_path / "mine.jsonl", rows)
    with pytest.raises(TaskDataError) as info:
        run_comparison(tiny, str(path), k=1, resamples=2, recipe=RECIPE)
    msg = str(info.value)
    assert str(path) in msg and "line 5" in msg and "missing field 'output'" in msg


def test_user_task_file_runs(tmp_path: Path, tiny):
    rows = [{"input": f"review number {i}", "output": ["negative", "positive"][i % 2]} for i in range(8)]
    path = _write_jsonl(tmp_path / "mine.jsonl", rows)
    result = run_comparison(tiny, str(path), k=2, resamples=2, recipe=RECIPE)
    assert result.config["task"] == "mine"
    assert result.config["task_source"] == str(path)
    for trial in result.trials:
        assert trial["icl_prompt"].endswith(f"Input: {trial['query']}\nOutput:")
        assert trial["gold"] in ("negative", "positive")
