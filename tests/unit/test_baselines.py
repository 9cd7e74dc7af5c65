"""Reviewer baselines beside the cosines: centred cosine, shuffled-pair null, noise ceiling
(arm it_seed2), update-direction cosine, CKA per cell; the engine stores the states they need,
analysis computes them (iclit.analysis.frames), the report shows and tests them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from exp_helpers import TINY_SPEC

from iclit.analysis import (
    BASELINE_PAIRS,
    BASELINES,
    PAIRS,
    baseline_cosines,
    centered_cosine_per_layer,
    cosine_per_layer,
    load_run,
    load_states,
    shuffled_partner,
    update_cosine_per_layer,
)
from iclit.analysis.frames import similarities
from iclit.engine.capture import capture
from iclit.engine.evaluate import evaluate, reference_mean, run_arms
from iclit.experiments import make_plan, parse_spec, run_experiment
from iclit.experiments.spec import SpecError
from iclit.report import factor_effects, render_report
from iclit.rundir.store import open_store
from iclit.tasks import draw_resamples, get_task, reference_prompts
from iclit.tuning import TuningRecipe

N = 3
EXTRA = [p for pairs in BASELINE_PAIRS.values() for p in pairs]


@pytest.fixture(scope="module")
def cell(lm):
    task = get_task("sentiment")
    draws = draw_resamples(task, 2, N, 0)
    return evaluate(lm, task, draws, recipe=TuningRecipe(epochs=3), seed=0, baselines=BASELINES)


@pytest.fixture(scope="module")
def cos(cell):
    """pair → [N, L+1]: the cosines analysis computes from the cell's states."""
    return similarities(cell.states, BASELINES)


def _states(cell):
    return {arm: o.states for arm, o in cell.outputs.items()}


def test_every_baseline_is_stored_per_trial_and_layer(cell, cos, lm):
    assert set(cos) == set(PAIRS) | set(EXTRA)
    for pair, values in cos.items():
        assert values.shape == (N, lm.n_layers + 1), pair
        assert np.all(np.isfinite(values))
    # the states every baseline needs, per trial and layer (the reference mean per layer)
    L1, d = lm.n_layers + 1, lm.hidden_size
    for name in ("anchor", "icl", "it", "it_seed2", "anchor:qmean", "icl:qmean", "it:qmean"):
        assert tuple(cell.states[name].shape) == (N, L1, d), name
    assert tuple(cell.states["reference_mean"].shape) == (L1, d)
    assert set(cell.scores) == {"anchor", "icl", "it", "it_seed2", "icl_reordered"}  # accuracy of the extra arms too


def test_centered_cosines_subtract_the_task_anchor_mean_or_the_reference_mean(cell, cos, lm):
    mean = capture(lm.model, lm.tokenizer, reference_prompts()).states.double().mean(0)
    assert torch.allclose(reference_mean(lm).double(), mean, atol=1e-5)
    assert reference_mean(lm) is reference_mean(lm)  # memoised per loaded model
    s = _states(cell)
    anchor_mean = s["anchor"].double().mean(0)  # the task's own anchor states, over the trials compared
    for pair in PAIRS:
        left, right = pair.split("_")
        want = centered_cosine_per_layer(s[left], s[right], anchor_mean).numpy()
        np.testing.assert_allclose(cos[f"{pair}_centered"], want, atol=1e-5)
        want = centered_cosine_per_layer(s[left], s[right], mean).numpy()
        np.testing.assert_allclose(cos[f"{pair}_centered_ref"], want, atol=1e-5)


def test_centered_cosine_with_a_known_mean():
    m = torch.tensor([[100.0, 0.0, 0.0]])  # [L=1, d=3]: a huge shared "rogue" direction
    a = (m + torch.tensor([[0.0, 1.0, 0.0]]))[None]
    b = (m + torch.tensor([[0.0, 0.0, 1.0]]))[None]
    states = {"anchor": a, "icl": a, "it": b}
    raw = cosine_per_layer(a, b)
    assert float(raw[0, 0]) > 0.99
    out = baseline_cosines(states, ["centered"], reference_mean=m)
    assert float(out["icl_it_centered_ref"][0, 0]) == pytest.approx(0.0, abs=1e-12)
    assert float(out["anchor_icl_centered_ref"][0, 0]) == pytest.approx(1.0)
    # the task-anchor mean of two trials sharing the rogue direction removes it too
    two = {k: torch.cat([v, v + torch.tensor([0.0, 0.0, 0.0])[None, None]]) for k, v in states.items()}
    two["anchor"] = torch.cat(
        [m[None] + torch.tensor([[[0.0, 1.0, 0.0]]]), m[None] - torch.tensor([[[0.0, 1.0, 0.0]]])]
    )
    out = baseline_cosines(two, ["centered"])
    assert "icl_it_centered_ref" not in out  # no reference mean given
    assert float(out["icl_it_centered"][0, 0]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="unknown"):
        baseline_cosines(states, ["nope"])


def test_shuffled_pairs_icl_i_with_it_of_the_next_trial(cell, cos):
    assert shuffled_partner(3) == [1, 2, 0]
    assert shuffled_partner(1) == [0]
    s = _states(cell)
    for i, j in enumerate(shuffled_partner(N)):
        want = cosine_per_layer(s["icl"][i], s["it"][j]).numpy()
        np.testing.assert_allclose(cos["icl_it_shuffled"][i], want, atol=1e-12)
    one = {k: v[:1] for k, v in s.items()}
    assert "icl_it_shuffled" not in baseline_cosines(one, ["shuffled"])  # no partner in a batch of one


def test_noise_ceiling_arm_is_it_with_another_seed(cell, cos):
    assert run_arms(("anchor", "icl", "it"), ["noise_ceiling"]) == ("anchor", "icl", "it", "it_seed2", "icl_reordered")
    assert run_arms(("anchor", "icl", "it"), ["noise_ceiling"], it_seeds=2) == ("anchor", "icl", "it", "icl_reordered")
    assert run_arms(("anchor", "icl", "it"), ["centered"]) == ("anchor", "icl", "it")
    it, it2 = cell.outputs["it"].states, cell.outputs["it_seed2"].states
    assert not torch.allclose(it[:, 1:], it2[:, 1:])  # another LoRA init: other states
    torch.testing.assert_close(it[:, 0], it2[:, 0])  # the embeddings are not tuned
    np.testing.assert_allclose(cos["it_it_seed"], cosine_per_layer(it, it2).numpy(), atol=1e-12)
    assert len(cell.outputs["it_seed2"].tuning) == N


def test_update_cosine_is_the_metrics_function(cell, cos):
    s = _states(cell)
    want = update_cosine_per_layer(s["anchor"], s["icl"], s["it"]).numpy()
    np.testing.assert_allclose(cos["update_cosine"], want, atol=1e-12)


def test_cka_across_the_cell(run_dir: Path):
    """Linear CKA over all queries of a (cell, seed) — across its chunks — per layer and pair,
    equal to cka_per_layer over the cell's stored states; no per-trial pair."""
    from iclit.analysis import cka_per_layer

    run = load_run(run_dir)
    states = load_states(run_dir)
    rows = states.frame().merge(
        run.trials[["trial_key", "cell_key", "seed", "resample", "states_file"]], on="trial_key"
    )
    L1 = int(run.trials["n_layers"].iloc[0])
    assert len(run.cka) == 4 * 3 * L1  # 4 cells x 3 pairs x layers
    assert not run.cka.duplicated(["cell_key", "seed", "layer", "pair"]).any()  # one value per cell, not per trial
    for (cell, seed), grp in rows.groupby(["cell_key", "seed"]):
        assert len(grp) == 4 and grp["states_file"].nunique() == 2  # the cell's 4 queries, from its 2 chunks
        idx = grp.sort_values("resample")["row"].to_numpy()
        for pair, (a, b) in {
            "cka_anchor_icl": ("anchor", "icl"),
            "cka_anchor_it": ("anchor", "it"),
            "cka_icl_it": ("icl", "it"),
        }.items():
            want = cka_per_layer(torch.from_numpy(states[a][idx]), torch.from_numpy(states[b][idx])).numpy()
            got = run.cka[(run.cka["cell_key"] == cell) & (run.cka["seed"] == seed) & (run.cka["pair"] == pair)]
            got = got.sort_values("layer")
            assert list(got["layer"]) == list(range(L1)) and (got["n"] == 4).all()
            np.testing.assert_allclose(got["value"].to_numpy(dtype=float), want, atol=1e-6, equal_nan=True)
    assert "cka" not in BASELINE_PAIRS or BASELINE_PAIRS["cka"] == ()  # no per-trial pair
    assert not run.frame["pair"].str.contains("cka").any()


def test_cka_needs_three_queries(lm, tmp_path: Path):
    from iclit.analysis import compute_metric
    from iclit.api import run_comparison

    task = get_task("sentiment")
    draws = draw_resamples(task, 2, 2, 0)
    two = evaluate(lm, task, draws, recipe=TuningRecipe(epochs=2), seed=0, baselines=["cka"])
    assert set(similarities(two.states, ["cka"])) == set(PAIRS)
    run_comparison(
        lm, "sentiment", k=2, resamples=2, recipe=TuningRecipe(epochs=2), baselines=["cka"], out=tmp_path / "two"
    )
    run = load_run(tmp_path / "two")
    assert run.cka.empty and set(run.frame["pair"]) == set(PAIRS)
    assert compute_metric(tmp_path / "two", "cka").empty  # not even when asked for every cell


def test_default_evaluate_adds_nothing(lm):
    task = get_task("sentiment")
    draws = draw_resamples(task, 2, 2, 0)
    plain = evaluate(lm, task, draws, recipe=TuningRecipe(epochs=2), seed=0)
    assert set(similarities(plain.states)) == set(PAIRS) and set(plain.outputs) == {"anchor", "icl", "it"}
    assert set(plain.states) == {"anchor", "icl", "it"}


# --- spec, plan, store, report -------------------------------------------------------------


def test_spec_baselines_validate_and_change_keys_only_when_set():
    spec = parse_spec({**TINY_SPEC, "baselines": ["centered", "noise_ceiling"]})
    assert spec.baselines == ("centered", "noise_ceiling")
    assert parse_spec(spec.to_dict()) == spec
    plain = parse_spec(TINY_SPEC)
    assert plain.baselines == ()
    assert "baselines" not in make_plan(plain).cells[0].settings  # runs without baselines keep their keys
    assert set(make_plan(spec).trial_keys()).isdisjoint(make_plan(plain).trial_keys())
    with pytest.raises(SpecError) as e:
        parse_spec({**TINY_SPEC, "baselines": ["centred", "update", "update"]})
    text = str(e.value)
    assert "baselines[0]: must be one of centered, shuffled, update, noise_ceiling" in text
    assert "lists a baseline twice" in text


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("baselines-run")
    # two chunks per cell: the shuffled null and CKA are over all of a cell's queries, not per chunk
    spec = parse_spec({**TINY_SPEC, "resamples": 4, "chunk_size": 2, "baselines": list(BASELINES)})
    run_experiment(spec, out)
    return out


def test_runner_stores_the_baselines(run_dir: Path):
    run = load_run(run_dir, all_trials=True)
    frame = run.frame
    with open_store(run_dir) as store:
        outputs = store.outputs()
    assert set(frame["pair"]) == set(PAIRS) | set(EXTRA)
    assert frame.groupby("trial_key")["pair"].nunique().eq(len(PAIRS) + len(EXTRA)).all()
    assert "score_it_seed2" in outputs.columns and outputs["score_it_seed2"].notna().all()
    # CKA per cell (the spec asks for it): every layer of each of the 3 pairs, for each of the 4 cells
    per_cell = run.cka.groupby(["cell_key", "seed", "pair"])["layer"].nunique()
    assert len(per_cell) == 4 * 3 and per_cell.eq(frame["layer"].max() + 1).all()


def test_report_shows_baselines_and_effects(run_dir: Path):
    text = render_report(run_dir)
    for needle in (
        "Baselines by k",
        "Baselines by wrong_labels",
        "ICL – IT, centred",
        "shuffled pairs (null)",
        "noise ceiling",
        "update direction",
        "Effect sizes: k",
        "Cohen&#x27;s d",
        "permutation p",
        "ICL–IT similarity peaks at",
        "accuracy: it_seed2",
        "linear CKA ICL vs IT",
    ):
        assert needle in text, needle
    assert text.count("<img ") == 6  # per factor: against-factor figure, per-layer curves, baselines per layer


def test_factor_effects_pair_trials_and_match_a_direct_computation(run_dir: Path):
    run = load_run(run_dir)
    plan, frame = run.plan, run.frame
    eff = factor_effects(frame, plan, "k", n_perm=2000)
    row = eff[(eff["pair"] == "icl_it") & (eff["what"] == "last_layer")].iloc[0]
    assert row["value"] == 1 and row["reference"] == 2  # the base value k = 2 is the reference
    assert row["n"] == 8  # 4 resamples x the 2 values of wrong_labels (grid: paired on them too)
    last = frame[frame["pair"] == "icl_it"]
    last = last[last["layer"] == last["layer"].max()]
    a = last[last["k"] == 1].set_index(["resample", "wrong_labels"])["cosine"]
    b = last[last["k"] == 2].set_index(["resample", "wrong_labels"])["cosine"]
    d = (a - b.reindex(a.index)).to_numpy()
    assert row["mean_diff"] == pytest.approx(d.mean())
    assert row["ci_low"] <= row["mean_diff"] <= row["ci_high"]
    assert 0 < row["p_value"] <= 1
    assert set(eff["pair"]) == {"icl_it", "icl_it_centered", "update_cosine", "icl_it_qmean"}


def test_factor_effects_known_difference():
    rows = []
    for value, shift in ((0, 0.0), (1, 0.1)):
        for r in range(6):
            for layer in range(2):
                rows.append(
                    {
                        "trial_key": f"{value}-{r}",
                        "seed": 0,
                        "resample": r,
                        "k": value,
                        "pair": "icl_it",
                        "layer": layer,
                        "cosine": 0.5 + 0.01 * r + shift,
                    }
                )
    plan = {"factors": {"k": [0, 1]}, "base": {"k": 0}, "design": "grid"}
    eff = factor_effects(pd.DataFrame(rows), plan, "k", n_perm=500)
    r = eff[eff["what"] == "last_layer"].iloc[0]
    assert r["mean_diff"] == pytest.approx(0.1) and r["n"] == 6
    assert r["ci_low"] == pytest.approx(0.1) and r["ci_high"] == pytest.approx(0.1)
    assert r["p_value"] == pytest.approx(2 / 64, abs=0.03)  # all 6 differences equal: only 2 of 64 sign patterns as big


def test_cli_results_effects(run_dir: Path):
    from typer.testing import CliRunner

    from iclit.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["results", str(run_dir), "--effects", "--format", "csv"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[0].startswith("factor,value,reference,pair,what,n,")
    # 2 factors x 1 non-reference value x 4 similarities (ICL–IT raw, centred, update, query-mean)
    # x 2 (last layer, mean over layers)
    assert len(lines) == 1 + 2 * 4 * 2
    bad = runner.invoke(app, ["results", str(run_dir), "--effects", "--outputs"])
    assert bad.exit_code != 0 and "--effects goes alone" in bad.output
    table = runner.invoke(app, ["results", str(run_dir), "--effects"])
    assert table.exit_code == 0 and "┏" in table.output  # a rich table (its headers fold at 80 columns)


def test_single_cell_report_shows_baselines(tmp_path: Path):
    spec = parse_spec({**TINY_SPEC, "factors": {}, "resamples": 3, "chunk_size": 3, "baselines": list(BASELINES)})
    run_experiment(spec, tmp_path / "one")
    text = render_report(tmp_path / "one")
    for needle in ("All trials", "<h3>Baselines</h3>", "noise ceiling", "linear CKA ICL vs IT", "accuracy: it_seed2"):
        assert needle in text, needle
    assert "Effect sizes" not in text
    assert text.count("<img ") == 2
