"""The causal analyses (spec `analyses: [patch, steer]`): intervene's shared prefixes, the
engine's records (a state patched into its own run changes nothing; the ICL state at the last
state index is ICL's distribution; the exact ICL update added at L is ICL; a planted steering
direction is recovered), the reverse patch through each set's adapter, generation tasks, the
spec keys, and the tables, CLI and report of a run on tiny-random-llama."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from exp_helpers import TINY_SPEC
from test_architectures import build
from typer.testing import CliRunner

from iclit.analysis.causal import cluster_sign_flip, patch_table, steer_table
from iclit.analysis.rundata import RunData
from iclit.core.tokens import label_token_ids
from iclit.engine.capture import capture
from iclit.engine.causal import CausalSettings, Reader, ReversePatch, causal_records, steering_vectors
from iclit.engine.evaluate import evaluate
from iclit.engine.interventions import Intervention, intervene, kl_divergence
from iclit.experiments import make_plan, parse_spec, run_experiment
from iclit.experiments.spec import SpecError
from iclit.models import prepare
from iclit.models.arch import n_states, output_head
from iclit.tasks import draw_sets, get_task
from iclit.tuning import TuningRecipe

RECIPE = TuningRecipe(epochs=3)
EVERY = CausalSettings(("patch", "steer"), "all", "all", (1.0, 3.0), 2)


@pytest.fixture(scope="module")
def sentiment():
    return get_task("sentiment")


@pytest.fixture(scope="module")
def crossed(lm, sentiment):
    """2 sets × 3 queries of sentiment, every state index patched and steered (fast engine)."""
    draws = draw_sets(sentiment, 2, 2, 3, 0)
    return draws, evaluate(lm, sentiment, draws, recipe=RECIPE, seed=0, causal=EVERY)


def kl(p, q) -> float:
    return float(kl_divergence(torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(q, dtype=torch.float64)).max())


# --- intervene: prompts sharing a prefix ----------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_shared_prefixes_equal_the_reference(family, tiny_tokenizer):
    """Prompts grouped by their demonstrations (one group of identical prompts, one prompt
    alone, one whose rest is its last token only): the fast path on the group's common token
    prefix equals full forwards, and the fast path without groups."""
    model = prepare(build(family, len(tiny_tokenizer)), tiny_tokenizer, name=family, device="cpu")
    tok = model.tokenizer
    labels = label_token_ids(tok, [" negative", " positive"])
    head = "Classify the sentiment.\n\nReview: It broke after two days.\nSentiment: negative\n\n"
    other = "Review: Lovely.\nSentiment: positive\n\n"
    prompts = [
        head + "Review: Fine.\nSentiment:",
        head + "Review: The plot is thin.\nSentiment:",
        head + "Review: A",
        other + "Review: Dull.\nSentiment:",
        other + "Review: Dull.\nSentiment:",
        "Review: Alone.\nSentiment:",
    ]
    keys = [head, head, head, other, other, None]
    states = capture(model.model, tok, prompts, label_ids=labels).states
    L = n_states(model.model) - 1
    g = torch.Generator().manual_seed(0)
    runs = [
        [None]
        + [Intervention(layer, states[(i + 1) % 6, layer], "replace") for layer in range(L + 1)]
        + [Intervention(layer, torch.randn(states.shape[-1], generator=g), "add", 2.0) for layer in range(L + 1)]
        for i in range(6)
    ]
    fast = intervene(model.model, tok, prompts, runs, label_ids=labels, batch_size=5, prefixes=keys)
    ref = intervene(model.model, tok, prompts, runs, label_ids=labels, reference=True)
    alone = intervene(model.model, tok, prompts, runs, label_ids=labels)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="prefixes"):
        intervene(model.model, tok, prompts, runs, label_ids=labels, prefixes=keys[:2])


# --- the engine's records --------------------------------------------------------------------


def test_records_hold_every_kind_layer_scale_and_draw(crossed, lm):
    draws, ev = crossed
    L = n_states(lm.model) - 1
    for trial in ev.trials:
        c = trial["causal"]
        assert c["measure"] == "labels" and c["labels"] == ["negative", "positive"]
        assert c["patch"]["layers"] == list(range(1, L + 1))
        assert all(
            np.shape(c["patch"][k]) == (L, 2)
            for k in ("icl_into_anchor", "it_into_anchor", "icl_into_it", "it_into_icl")
        )
        s = c["steer"]
        assert s["layers"] == list(range(1, L + 1)) and s["scales"] == [1.0, 3.0]
        assert np.shape(s["icl"]) == np.shape(s["it"]) == (L, 2, 2) and np.shape(s["random_it"]) == (L, 2, 2, 2)
        assert all(x == round(x, 6) for x in c["anchor"])  # stored compactly
        assert c["seconds"] > 0


def test_unpatched_runs_are_the_arms(crossed):
    """The anchor, ICL and IT runs read with the interventions (the IT one inside the it arm,
    through each set's adapter) are the arms' own label distributions."""
    draws, ev = crossed
    for trial in ev.trials:
        for arm in ("anchor", "icl", "it"):
            probs = [trial["label_probs"][arm][label] for label in ("negative", "positive")]
            assert kl(np.log(probs), trial["causal"][arm]) < 1e-9, arm


def test_full_states_at_the_last_index_reproduce_the_source_run(crossed):
    """At ℓ = L (the final norm's output, what the head reads) a patched run is the run whose
    state it got: the ICL state gives ICL's distribution in the anchor run and in the tuned
    model's run (LoRA on q/v leaves the head), the IT state gives IT's."""
    draws, ev = crossed
    for trial in ev.trials:
        c, p = trial["causal"], trial["causal"]["patch"]
        assert kl(c["icl"], p["icl_into_anchor"][-1]) < 1e-6
        assert kl(c["icl"], p["icl_into_it"][-1]) < 1e-6
        assert kl(c["it"], p["it_into_anchor"][-1]) < 1e-6
        assert kl(c["it"], p["it_into_icl"][-1]) < 1e-6
        assert kl(c["icl"], c["anchor"]) > 1e-8  # ICL did change the distribution: the check is not empty


def _records(lm, task, draws, states, settings, model=None):
    reader = Reader(
        lm.tokenizer, task, draws, label_token_ids(lm.tokenizer, [task.template.answer(label) for label in task.labels])
    )
    prompts = [task.template.query(r.query.input) for r in draws]
    reverse = ReversePatch(settings, reader, lm.tokenizer, draws, prompts, lambda: states["icl"])
    reverse(model or lm.model, list(range(len(draws))), None)
    return causal_records(lm, task, draws, states, reverse, settings)


def test_a_state_patched_into_its_own_run_changes_nothing(lm, sentiment, crossed):
    """Every arm given the anchor's own states (and the base model as the "tuned" one): every
    patch puts a run's own state back, every steering vector is zero — all KL 0."""
    draws, ev = crossed
    a = ev.states["anchor"]
    own = _records(lm, sentiment, draws, {"anchor": a, "icl": a, "it": a}, EVERY)
    for c in own:
        for kind in ("icl_into_anchor", "it_into_anchor", "icl_into_it"):
            assert all(kl(c["anchor"], row) < 1e-10 for row in c["patch"][kind]), kind
        for vector in ("icl", "it", "random_icl", "random_it"):  # zero vectors, zero-norm nulls
            assert kl(c["anchor"], np.reshape(c["steer"][vector], (-1, 2))) < 1e-10, vector
        assert max(c["steer"]["norm_icl"] + c["steer"]["norm_it"]) == 0.0
    # the ICL states put back into the ICL run
    i = ev.states["icl"]
    back = _records(lm, sentiment, draws, {"anchor": a, "icl": i, "it": i}, CausalSettings(("patch",), "all"))
    for c in back:
        assert all(kl(c["icl"], row) < 1e-10 for row in c["patch"]["it_into_icl"])


def test_the_exact_icl_update_added_at_the_last_index_is_icl(lm, sentiment, crossed):
    """The sign convention: h_anchor + (h_ICL − h_anchor) at ℓ = L gives ICL's distribution;
    subtracting it does not."""
    draws, ev = crossed
    L = n_states(lm.model) - 1
    update = ev.states["icl"][:, L] - ev.states["anchor"][:, L]
    prompts = [sentiment.template.query(r.query.input) for r in draws]
    labels = label_token_ids(lm.tokenizer, [" negative", " positive"])
    out = intervene(
        lm.model,
        lm.tokenizer,
        prompts,
        [[Intervention(L, u, "add", 1.0), Intervention(L, -u, "add", 1.0)] for u in update],
        label_ids=labels,
    )
    for i, trial in enumerate(ev.trials):
        assert kl(trial["causal"]["icl"], out[i, 0]) < 1e-6
        assert kl(trial["causal"]["icl"], out[i, 1]) > 1e-8


def test_steering_vectors_leave_the_query_out(sentiment):
    draws = draw_sets(sentiment, 2, 2, 3, 0)
    g = torch.Generator().manual_seed(0)
    anchor, arm = torch.randn(6, 3, 4, generator=g), torch.randn(6, 3, 4, generator=g)
    v = steering_vectors(anchor, arm, draws)
    u = (arm - anchor).double()
    for i, r in enumerate(draws):
        others = [j for j, s in enumerate(draws) if s.set_id == r.set_id and j != i]
        torch.testing.assert_close(v[i], u[others].mean(dim=0))
    with pytest.raises(ValueError, match="two or more queries"):
        steering_vectors(anchor[:2], arm[:2], [draws[0], draws[3]])


def test_a_planted_steering_direction_is_recovered(lm, sentiment, crossed):
    """ICL states planted as anchor + c·u at ℓ = L, u the head's unit direction W[neg] − W[pos]:
    the ICL vector (every other query's update is c·u) drives every query to 'negative' at
    every scale, its same-norm random directions barely move it, and the steer table's
    icl − random_icl contrast on that label's accuracy is what the plant made it."""
    draws, ev = crossed
    L = n_states(lm.model) - 1
    weight = output_head(lm.model)[0].detach().float().cpu()
    labels = label_token_ids(lm.tokenizer, [" negative", " positive"]).tolist()
    u = weight[labels[0]] - weight[labels[1]]
    c = 20.0 / float(u.norm())  # logit difference +20 per unit of scale
    u = u / u.norm()
    a = ev.states["anchor"]
    planted = a.clone()
    planted[:, L] += c * u
    settings = CausalSettings(("steer",), steer_layers=(L,), steer_scales=(1.0, 2.0), steer_null_draws=8)
    recs = _records(lm, sentiment, draws, {"anchor": a, "icl": planted, "it": a}, settings)
    for rec in recs:
        s = rec["steer"]
        assert s["norm_icl"] == [pytest.approx(c, rel=1e-5)] and s["norm_it"] == [0.0]
        p_neg = np.exp(np.asarray(s["icl"])[0, :, 0])
        assert (p_neg > 0.999).all()
        assert np.exp(np.asarray(s["it"])[0, :, 0]) == pytest.approx(np.exp(rec["anchor"][0]), abs=1e-6)
    null = np.exp(np.asarray([r["steer"]["random_icl"] for r in recs])[:, 0, 0, :, 0])  # [n, draws]
    assert null.mean() < 0.8
    # through the analysis: every gold 'negative' query is right under the plant, a 'positive' one wrong
    outputs = pd.DataFrame(
        {
            "cell_key": "c",
            "seed": 0,
            "resample": [r.index for r in draws],
            "query_id": [r.query.id for r in draws],
            "gold": [r.query.output for r in draws],
            "causal": recs,
        }
    )
    run = RunData(
        path=None,
        latest=None,
        plan=None,
        frame=pd.DataFrame(),
        outputs=outputs,
        settings={"c": {"queries_per_set": 3, "sets_per_query": 1}},
    )
    t = steer_table(run)
    acc = t[(t["vector"] == "icl") & (t["measure"] == "accuracy")]["value"].to_numpy()
    assert t[(t["vector"] == "icl_run") & (t["measure"] == "kl_icl")]["value"].iloc[0] == 0.0
    share = np.mean([r.query.output == "negative" for r in draws])
    assert acc == pytest.approx([share, share])


def test_fast_and_reference_engines_agree(lm, sentiment, crossed):
    """The reference engine (PEFT adapter per set, full forwards) stores the same records."""
    draws, ev = crossed
    slow = evaluate(lm, sentiment, draws, recipe=RECIPE, seed=0, fast=False, causal=EVERY)
    for a, b in zip(ev.trials, slow.trials, strict=True):
        for key in ("anchor", "icl", "it"):
            np.testing.assert_allclose(a["causal"][key], b["causal"][key], atol=2e-4)
        for kind, rows in a["causal"]["patch"].items():
            np.testing.assert_allclose(rows, b["causal"]["patch"][kind], atol=2e-4, err_msg=kind)
        for vector in ("icl", "it", "random_icl", "random_it"):
            np.testing.assert_allclose(a["causal"]["steer"][vector], b["causal"]["steer"][vector], atol=2e-4)


def test_generation_tasks_read_the_gold_answers_first_token(lm):
    task = get_task("reverse-words")
    draws = draw_sets(task, 2, 2, 2, 0)
    ev = evaluate(lm, task, draws, recipe=RECIPE, seed=0, max_new_tokens=4, causal=EVERY)
    for r, trial in zip(draws, ev.trials, strict=True):
        c = trial["causal"]
        first = lm.tokenizer(task.template.answer(r.query.output), add_special_tokens=False)["input_ids"][0]
        assert c["measure"] == "gold_first_token" and c["token"] == first and len(c["anchor"]) == 1
        assert c["patch"]["icl_into_anchor"][-1][0] == pytest.approx(c["icl"][0], abs=1e-5)
        assert c["patch"]["it_into_icl"][-1][0] == pytest.approx(c["it"][0], abs=1e-5)
        assert c["icl"][0] < 0 and c["anchor"][0] < 0
    outputs = pd.DataFrame(
        {
            "cell_key": "g",
            "seed": 0,
            "resample": [r.index for r in draws],
            "query_id": [r.query.id for r in draws],
            "gold": [r.query.output for r in draws],
            "causal": [t["causal"] for t in ev.trials],
        }
    )
    run = RunData(
        path=None,
        latest=None,
        plan=None,
        frame=pd.DataFrame(),
        outputs=outputs,
        settings={"g": {"queries_per_set": 2, "sets_per_query": 2}},
    )
    p = patch_table(run)
    assert set(p["measure"]) == {"logp", "frac_icl", "frac_it"}
    last = p[(p["kind"] == "icl_into_anchor") & (p["layer"] == p["layer"].max()) & (p["measure"] == "frac_icl")]
    assert float(last["value"].iloc[0]) == pytest.approx(1.0, abs=1e-4)
    assert set(steer_table(run)["measure"]) == {"logp", "frac_icl", "frac_it"}


def test_the_arms_run_icl_before_it(lm, sentiment):
    draws = draw_sets(sentiment, 1, 1, 2, 0)
    ev = evaluate(lm, sentiment, draws, recipe=RECIPE, arms=("it", "anchor", "icl"), causal=CausalSettings(("patch",)))
    assert "causal" in ev.trials[0] and set(ev.outputs) == {"anchor", "icl", "it"}
    with pytest.raises(ValueError, match="patch_layers: state index 9 does not exist"):
        evaluate(lm, sentiment, draws, recipe=RECIPE, causal=CausalSettings(("patch",), (1, 9)))


# --- the statistics ----------------------------------------------------------------------------


def test_cluster_sign_flip_is_exact_and_flips_whole_clusters():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(5), 3)
    values = rng.normal(0.5, 1.0, size=(15, 2))
    sums = np.array([values[groups == g].sum(0) for g in range(5)])
    signs = np.array([[1 - 2 * ((k >> b) & 1) for b in range(5)] for k in range(32)], dtype=float)
    want = (np.abs(signs @ sums) >= np.abs(sums.sum(0)) - 1e-12).mean(0)
    np.testing.assert_allclose(cluster_sign_flip(values, groups), want)
    assert cluster_sign_flip(values[:, 0], groups) == pytest.approx(want[0])
    many = np.repeat(np.arange(40), 2)
    p = cluster_sign_flip(rng.normal(1.0, 1.0, size=80), many, n_flips=2000)
    assert p == pytest.approx(1 / 2001)  # random flips: (1 + hits) / (1 + B)
    assert 0.05 < cluster_sign_flip(rng.normal(0.0, 1.0, size=80), many, n_flips=2000) <= 1.0


def _synthetic_run(n_sets=10, q=4, effect_layer=2, seed=0):
    """Records of a 2-label task where the IT vector at layer `effect_layer` × scale 2 puts the
    anchor run onto ICL's distribution, and every other vector leaves the anchor as it is."""
    rng = np.random.default_rng(seed)
    recs, golds = [], []

    def lp(p):
        return list(np.log([p, 1 - p]))

    for _ in range(n_sets * q):
        anchor, icl = rng.uniform(0.2, 0.4), rng.uniform(0.7, 0.95)
        layers, scales = [1, 2, 3], [1.0, 2.0]
        steer = {v: [[lp(anchor) for _ in scales] for _ in layers] for v in ("icl", "it")}
        steer["it"][layers.index(effect_layer)][1] = lp(icl)
        for v in ("random_icl", "random_it"):
            steer[v] = [[[lp(anchor), lp(anchor)] for _ in scales] for _ in layers]
        recs.append(
            {
                "measure": "labels",
                "labels": ["a", "b"],
                "anchor": lp(anchor),
                "icl": lp(icl),
                "it": lp(icl),
                "steer": {"layers": layers, "scales": scales, **steer},
                "patch": {
                    "layers": layers,
                    **{
                        k: [lp(anchor), lp(anchor), lp(icl)]
                        for k in ("icl_into_anchor", "it_into_anchor", "icl_into_it", "it_into_icl")
                    },
                },
            }
        )
        golds.append("a")
    outputs = pd.DataFrame(
        {
            "cell_key": "c",
            "seed": 0,
            "resample": range(n_sets * q),
            "query_id": [f"q{i % (2 * q)}" for i in range(n_sets * q)],
            "gold": golds,
            "causal": recs,
        }
    )
    return RunData(
        path=None,
        latest=None,
        plan=None,
        frame=pd.DataFrame(),
        outputs=outputs,
        settings={"c": {"queries_per_set": q, "sets_per_query": 1}},
    )


def test_steer_table_finds_the_planted_layer_and_scale():
    t = steer_table(_synthetic_run())
    con = t[(t["vector"] == "it-random_it") & (t["measure"] == "kl_icl")].set_index(["layer", "scale"])
    hit = con.loc[(2, 2.0)]
    assert hit["value"] < 0 and hit["ci_high"] < 0 and hit["p_holm"] < 0.05 and hit["n_blocks"] == 10
    rest = con.drop(index=(2, 2.0))
    assert (rest["value"].abs() < 1e-12).all() and (rest["p_holm"] == 1.0).all()
    frac = t[(t["vector"] == "it") & (t["measure"] == "frac_icl")].set_index(["layer", "scale"])["value"]
    assert frac.loc[(2, 2.0)] == pytest.approx(1.0) and frac.drop(index=(2, 2.0)).abs().max() < 1e-12
    refs = t[t["layer"].isna()]
    assert set(refs["vector"]) == {"anchor_run", "icl_run", "it_run"}


def test_patch_fractions_are_ratios_of_means():
    run = _synthetic_run()
    p = patch_table(run).set_index(["kind", "layer", "measure"])
    recs = run.outputs["causal"]
    a = np.array([np.exp(r["anchor"]) for r in recs])
    i = np.array([np.exp(r["icl"]) for r in recs])
    kl_ia = (i * (np.log(i) - np.log(a))).sum(1)
    assert p.loc[("anchor_run", pd.NA, "kl_icl"), "value"] == pytest.approx(kl_ia.mean())
    assert p.loc[("it_into_anchor", 1, "frac_icl"), "value"] == pytest.approx(0.0, abs=1e-12)
    assert p.loc[("it_into_anchor", 3, "frac_icl"), "value"] == pytest.approx(1.0)
    assert ("icl_into_it", 3, "frac_it") not in p.index and ("it_into_icl", 3, "frac_icl") not in p.index
    lo, hi = p.loc[("anchor_run", pd.NA, "kl_icl"), ["ci_low", "ci_high"]]
    assert lo < kl_ia.mean() < hi


# --- spec ---------------------------------------------------------------------------------------


def _problems(**keys) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec({**TINY_SPEC, **keys}, check_resources=False)
    return [str(p) for p in info.value.problems]


def test_spec_keys_and_their_errors():
    spec = parse_spec(
        {**TINY_SPEC, "queries_per_set": 2, "analyses": ["patch", "steer"], "steer_scales": [1, 2]},
        check_resources=False,
    )
    assert spec.causal_settings() == {
        "analyses": ["patch", "steer"],
        "patch_layers": None,
        "steer_layers": None,
        "steer_scales": [1.0, 2.0],
        "steer_null_draws": 1,
    }
    assert parse_spec(spec.to_dict(), check_resources=False) == spec
    assert _problems(analyses=["steer"]) == [
        "analyses: steer needs queries_per_set >= 2 (a query's steering vectors are the mean updates of the other "
        "queries of its set), not 1"
    ]
    assert _problems(analyses=["patch", "bogus"]) == ["analyses[1]: must be one of patch, steer, not 'bogus'"]
    assert _problems(analyses=["patch"], steer_scales=[2.0]) == [
        "steer_scales: set, but `analyses` does not include steer"
    ]
    assert _problems(steer_layers=[2]) == ["steer_layers: set, but `analyses` does not include steer"]
    assert _problems(analyses=["patch"], patch_layers=[1, -2]) == [
        "patch_layers[1]: must be a state index (an integer >= 0), not -2"
    ]
    assert _problems(analyses=["patch"], patch_layers="most") == [
        "patch_layers: must be null, 'all' or a non-empty list of state indices (integers >= 0), not 'most'"
    ]
    assert _problems(analyses=["patch"], patch_layers=[3, 3]) == ["patch_layers: lists a state index twice"]
    assert _problems(analyses=["steer"], queries_per_set=2, steer_scales=[0, 1]) == [
        "steer_scales[0]: must be a positive number, not 0"
    ]
    assert _problems(analyses=["steer"], queries_per_set=2, steer_null_draws=0) == [
        "steer_null_draws: must be a positive integer, not 0"
    ]


def test_trial_keys_change_only_with_analyses():
    base = parse_spec(TINY_SPEC)
    plain = make_plan(base)
    assert "analyses" not in plain.cells[0].settings
    with_defaults = make_plan(base.replace(steer_scales=(0.5, 1.0, 2.0, 4.0)))  # defaults written out: same keys
    assert with_defaults.trial_keys() == plain.trial_keys()
    causal = make_plan(base.replace(analyses=("patch",)))
    assert causal.cells[0].settings["analyses"] == {"analyses": ["patch"], "patch_layers": None, "version": 1}
    assert not set(causal.trial_keys()) & set(plain.trial_keys())


def test_default_layers():
    s = CausalSettings(("patch", "steer"))
    assert s.layers("patch", 18) == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert s.layers("steer", 18) == [3, 6, 9, 12, 15, 18]
    assert replace(s, patch_layers="all").layers("patch", 4) == [1, 2, 3, 4]
    assert s.layers("steer", 2) == [2]


# --- a run: stored, read back, shown -------------------------------------------------------------


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("causal-run")
    spec = {
        **TINY_SPEC,
        "factors": {},
        "resamples": 4,
        "queries_per_set": 3,
        "chunk_size": 2,
        "analyses": ["patch", "steer"],
        "steer_scales": [1, 4],
    }
    summary = run_experiment(parse_spec(spec), out, progress=False)
    assert summary.computed == 12
    return out


def test_a_run_stores_and_reads_back_the_tables(causal_run):
    from iclit.analysis import compute_metric, get_metric, load_run

    run = load_run(causal_run)
    assert run.outputs["causal"].map(lambda c: isinstance(c, dict)).all()
    p = compute_metric(run, "patch")
    L = int(run.trials["n_layers"].iloc[0]) - 1
    assert set(p["kind"]) == {
        "anchor_run",
        "icl_run",
        "it_run",
        "icl_into_anchor",
        "it_into_anchor",
        "icl_into_it",
        "it_into_icl",
    }
    assert sorted(p["layer"].dropna().unique()) == sorted(range(L, 0, -2))
    assert (p["n_units"] == 12).all() and (p["n_blocks"] == 2).all() and "k" in p.columns
    top = p[(p["kind"] == "icl_into_anchor") & (p["layer"] == L)].set_index("measure")
    assert top.loc["kl_icl", "value"] < 1e-6 and top.loc["frac_icl", "value"] == pytest.approx(1.0, abs=1e-4)
    s = compute_metric(run, "steer")
    assert set(s["vector"]) == {
        "anchor_run",
        "icl_run",
        "it_run",
        "icl",
        "it",
        "random_icl",
        "random_it",
        "it-random_it",
        "icl-random_icl",
    }
    assert sorted(s["scale"].dropna().unique()) == [1.0, 4.0]
    tested = s[s["vector"].str.contains("-")]
    assert tested["p"].between(0, 1).all() and (tested["p_holm"] >= tested["p"]).all()
    assert s.loc[~s["vector"].str.contains("-"), "p_holm"].isna().all()
    assert "Holm over the layers × scales" in get_metric("steer").help


def test_cli_results_and_the_report(causal_run, tmp_path):
    import re

    from iclit.cli import app
    from iclit.report import write_report

    result = CliRunner().invoke(app, ["results", str(causal_run), "--metric", "patch", "-f", "csv"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].endswith("kind,layer,measure,value,ci_low,ci_high,n_units,n_blocks")
    result = CliRunner().invoke(app, ["results", str(causal_run), "--metric", "steer"])
    assert result.exit_code == 0, result.output
    text = write_report(causal_run).read_text()
    assert "Causal tests: patching and steering" in text and "IT state → anchor run" in text
    assert (
        len(re.findall(r"<img ", text)) == 2 + 2
    )  # the headline figure (per-layer cosines with the nulls), the forest plot, the patch and the steer figures
    assert "it − random_it: KL(ICL ‖ run)" in text


def test_a_run_without_analyses_has_no_causal_tables(tmp_path):
    from iclit.analysis import compute_metric
    from iclit.cli import app
    from iclit.report import render_report

    out = tmp_path / "plain"
    run_experiment(parse_spec({**TINY_SPEC, "factors": {}, "resamples": 2}), out, progress=False)
    assert "Causal tests" not in render_report(out)
    with pytest.raises(ValueError, match="no causal analyses"):
        compute_metric(out, "patch")
    result = CliRunner().invoke(app, ["results", str(out), "--metric", "steer"])
    assert result.exit_code == 2 and "analyses" in result.output


def test_a_layer_the_model_lacks_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "bad"
    spec = parse_spec({**TINY_SPEC, "factors": {}, "resamples": 2, "analyses": ["patch"], "patch_layers": [1, 40]})
    with pytest.raises(ValueError, match="patch_layers: state index 40 does not exist"):
        run_experiment(spec, out, progress=False)
    assert not out.exists()
