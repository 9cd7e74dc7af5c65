"""The crossed design: S demonstration sets × Q queries, and the nulls computed from it.

* draws: one query per set is exactly today's draw_resamples; a set's queries are distinct,
  never among its demonstrations (id or text), label-balanced; sets of a block share them;
* engine: a set's query states equal those of one-query trials with the same
  demonstrations and seed (one ICL prefix, one IT adapter per set), also for it_seeds;
* plan: chunks hold whole sets; one-query specs keep their trial keys;
* nulls: a planted query-specific component is found by query-swap, a planted
  set-specific one by demo-swap, and neither gives an "above null" verdict.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from iclit.analysis.nulls import Units, links, null_tests, strata
from iclit.engine.evaluate import evaluate
from iclit.experiments import SpecError, make_plan, parse_spec
from iclit.experiments.plan import trial_key
from iclit.tasks import Resample, draw_resamples, draw_sets, get_task
from iclit.tasks.samplers import WrongLabelSampler
from iclit.tuning import TuningRecipe

RECIPE = TuningRecipe(epochs=3)


def _ids(draws):
    return [
        (r.index, r.query.id, [d.id for d in r.demonstrations], [d.output for d in r.demonstrations]) for r in draws
    ]


def _one_query_draws(task, k, n, seed, sampler):
    """The one-query design as it was drawn before the crossed design (the algorithm of
    iclit.tasks.samplers' docstring, written out): queries permutation(len)[:n], resample i's
    demonstrations from SeedSequence(seed, spawn_key=(i,)), the query never among them."""
    order = np.random.default_rng(seed).permutation(len(task.examples))[:n]
    out = []
    for i, q in enumerate(order):
        query = task.examples[int(q)]
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))
        pool = [e for e in task.examples if e.id != query.id]
        demos = sampler.choose(query, pool, k, rng)
        out.append(Resample(index=i, query=query, demonstrations=tuple(demos)))
    return out


@pytest.mark.parametrize("task_name,seed", [("sentiment", 0), ("sentiment", 5), ("addition", 2), ("reverse-words", 1)])
def test_one_query_per_set_is_the_one_query_design(task_name, seed):
    from iclit.tasks import get_sampler

    task = get_task(task_name)
    base = get_sampler("balanced" if task.kind == "classification" else "random")
    assert _ids(draw_sets(task, 4, 25, 1, seed)) == _ids(_one_query_draws(task, 4, 25, seed, base))
    assert _ids(draw_resamples(task, 4, 25, seed)) == _ids(_one_query_draws(task, 4, 25, seed, base))
    wrong = WrongLabelSampler(base, 0.5, task.labels if task.kind == "classification" else None)
    assert _ids(draw_sets(task, 4, 10, 1, seed, wrong)) == _ids(_one_query_draws(task, 4, 10, seed, wrong))


@pytest.mark.parametrize("q,m", [(10, 2), (6, 3), (5, 1)])
def test_set_queries_are_distinct_balanced_and_not_demonstrations(q, m):
    task = get_task("sentiment")
    draws = draw_sets(task, 4, 12, q, 0, sets_per_query=m)
    assert [r.index for r in draws] == list(range(12 * q))
    by_set: dict[int, list[Resample]] = {}
    for r in draws:
        by_set.setdefault(r.set_id, []).append(r)
    for s, rows in by_set.items():
        assert [r.slot for r in rows] == list(range(q))
        demos = rows[0].demonstrations
        assert all(r.demonstrations == demos for r in rows)  # one demonstration set
        ids, texts = {r.query.id for r in rows}, {r.query.input for r in rows}
        assert len(ids) == q and len(texts) == q
        assert not ids & {d.id for d in demos} and not texts & {d.input for d in demos}
        counts = pd.Series([r.query.output for r in rows]).value_counts()
        assert counts.max() - counts.min() <= 1 and len(counts) == 2  # label-balanced
        block = s // m
        partner = by_set.get(block * m)
        assert [r.query.id for r in rows] == [r.query.id for r in partner]  # the block shares its queries
    # different blocks use different queries while the task has unused ones
    blocks = {s // m: {r.query.id for r in rows} for s, rows in by_set.items()}
    if 12 // m * q <= len(task):
        firsts = list(blocks.values())
        assert all(not a & b for i, a in enumerate(firsts) for b in firsts[i + 1 :])


@pytest.mark.parametrize("sampler", ["most-similar", "least-similar", "wrong"])
def test_similarity_sets_of_a_block_are_disjoint(sampler):
    """A deterministic sampler would give both sets of a block the same demonstrations (a
    demo-swap null with nothing to swap): the first set is what it chose before, each later
    set the same choice from the pool without the block's earlier sets."""
    from iclit.tasks import get_sampler

    task = get_task("sentiment")
    chooser = WrongLabelSampler("most-similar", 0.5, task.labels) if sampler == "wrong" else get_sampler(sampler)
    draws = draw_sets(task, 3, 6, 4, 0, chooser, sets_per_query=3)
    sets = {r.set_id: r for r in draws}
    for b in range(2):
        first, *later = (sets[3 * b + i] for i in range(3))
        queries = [r.query for r in draws if r.set_id == 3 * b]
        rng = np.random.default_rng(np.random.SeedSequence(0, spawn_key=(3 * b,)))
        assert [d.id for d in first.demonstrations] == [d.id for d in chooser.select(queries, task.examples, 3, rng)]
        taken = {d.id for d in first.demonstrations}
        for r in later:
            ids = {d.id for d in r.demonstrations}
            assert len(ids) == 3 and not ids & taken
            pool = [e for e in task.examples if e.id not in taken]
            rng = np.random.default_rng(np.random.SeedSequence(0, spawn_key=(r.set_id,)))
            assert [d.id for d in r.demonstrations] == [d.id for d in chooser.select(queries, pool, 3, rng)]
            taken |= ids
    # one query per set and no sharing: unchanged (every set its own block)
    single = draw_sets(task, 3, 4, 1, 0, chooser)
    assert len({tuple(d.id for d in r.demonstrations) for r in single}) == 4


def test_block_sets_rule_is_in_the_key_only_where_it_applies():
    keys = {}
    for sim in ("random", "most"):
        for q in (1, 5):
            spec = parse_spec(
                {
                    "name": "t",
                    "model": "tiny-random-llama",
                    "task": "sentiment",
                    "k": 2,
                    "resamples": 4,
                    "queries_per_set": q,
                    "similarity": sim,
                }
            )
            keys[sim, q] = make_plan(spec).cells[0].settings.get("block_sets")
    assert keys == {("random", 1): None, ("random", 5): None, ("most", 1): None, ("most", 5): "disjoint"}


@pytest.mark.parametrize("wrong", [0.0, 0.5])
def test_flipped_block_sets_are_the_first_set_with_every_label_changed(wrong):
    """block_sets="flipped" (the demo-swap positive control): a block's second set shows the
    same inputs in the same order as its first, every label the other one; the first set is
    the ordinary draw; the queries are those of the drawn design."""
    from iclit.tasks import get_sampler

    task = get_task("sentiment")
    chooser = WrongLabelSampler("balanced", wrong, task.labels) if wrong else get_sampler("balanced")
    drawn = draw_sets(task, 4, 6, 5, 3, chooser, sets_per_query=2)
    flip = draw_sets(task, 4, 6, 5, 3, chooser, sets_per_query=2, block_sets="flipped")
    assert [r.query.id for r in flip] == [r.query.id for r in drawn]
    other = dict(zip(task.labels, reversed(task.labels), strict=True))
    for b in range(3):
        first = next(r for r in flip if r.set_id == 2 * b).demonstrations
        second = next(r for r in flip if r.set_id == 2 * b + 1).demonstrations
        assert first == next(r for r in drawn if r.set_id == 2 * b).demonstrations
        assert [d.input for d in second] == [d.input for d in first]
        assert [d.output for d in second] == [other[d.output] for d in first]
        true = [d.meta.get("true_output", d.output) for d in first]
        assert [d.meta["true_output"] for d in second] == true


def test_flipped_block_sets_are_checked_and_keyed():
    base = {"name": "t", "model": "tiny-random-llama", "task": "sentiment", "k": 2, "resamples": 4}
    spec = parse_spec({**base, "queries_per_set": 3, "block_sets": "flipped"})
    assert make_plan(spec).cells[0].settings["block_sets"] == "flipped"
    assert "block_sets" not in make_plan(parse_spec({**base, "queries_per_set": 3})).cells[0].settings
    with pytest.raises(SpecError, match="block_sets.*sets_per_query >= 2"):
        parse_spec({**base, "queries_per_set": 3, "sets_per_query": 1, "block_sets": "flipped"})
    with pytest.raises(SpecError, match="block_sets.*classification task"):
        parse_spec({**base, "task": "addition", "queries_per_set": 3, "block_sets": "flipped"})
    with pytest.raises(SpecError, match="block_sets"):
        parse_spec({**base, "queries_per_set": 3, "block_sets": "mirrored"})


def test_queries_repeat_across_blocks_only_when_the_task_runs_out():
    task = get_task("sentiment")  # 344 examples; 40 blocks of 10 queries need 400
    draws = draw_sets(task, 2, 80, 10, 0, sets_per_query=2)
    blocks = [[r.query.id for r in draws if r.set_id == 2 * b] for b in range(40)]
    assert all(len(set(b)) == 10 for b in blocks)  # never within a block
    first = [q for b in blocks[:34] for q in b]
    assert len(set(first)) == 340  # every query once while unused ones remain
    assert len({q for b in blocks for q in b}) == len(task)


@pytest.mark.parametrize("fast", [True, False])
def test_a_sets_query_states_equal_one_query_trials(lm, fast):
    """Every (query, set) pair of a crossed chunk has the states of a one-query trial with the
    same demonstrations and tuning seed (its set index)."""
    task = get_task("sentiment")
    draws = draw_sets(task, 2, 2, 3, 0)
    crossed = evaluate(lm, task, draws, recipe=RECIPE, seed=0, fast=fast, it_seeds=2)
    assert set(crossed.states) >= {"anchor", "icl", "it", "it_seed2"}
    for i, r in enumerate(draws):
        alone = evaluate(
            lm,
            task,
            [replace(r, index=r.set_id, set_index=None, slot=0)],
            recipe=RECIPE,
            seed=0,
            fast=fast,
            arms=("anchor", "icl", "it", "it_seed2"),
        )
        for name in ("anchor", "icl", "it", "it_seed2"):
            a, b = crossed.states[name][i].double(), alone.states[name][0].double()
            cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
            assert float(cos.min()) >= 0.99999, (name, i)
        assert crossed.trials[i]["it_final_loss"] == pytest.approx(alone.trials[0]["it_final_loss"], abs=1e-5)
        assert crossed.trials[i]["set"] == r.set_id and crossed.trials[i]["slot"] == r.slot


def test_plan_chunks_hold_whole_sets_and_one_query_keys_stay():
    base = {"name": "x", "model": "tiny-random-llama", "task": "sentiment", "k": 2, "resamples": 5, "chunk_size": 2}
    plan = make_plan(parse_spec({**base, "queries_per_set": 4}))
    assert [c.resamples for c in plan.chunks] == [tuple(range(0, 8)), tuple(range(8, 16)), tuple(range(16, 20))]
    assert plan.cells[0].settings["queries_per_set"] == 4 and plan.cells[0].settings["sets_per_query"] == 2
    one = make_plan(parse_spec(base))
    assert "queries_per_set" not in one.cells[0].settings  # one query per set: the keys of before
    assert one.chunks[0].keys[0] == trial_key(one.cells[0].settings, 0, 0)
    draws = plan.cells[0].draws(0, plan.chunks[1].resamples)
    assert [r.set_id for r in draws] == [2] * 4 + [3] * 4


def _planted(n_sets=12, q=6, m=2, d=48, layers=3, query_part=0.0, set_part=0.0, seed=0):
    """Synthetic states: anchor, ICL, IT of n_sets × q units; ICL and IT share a component of
    the query (query_part) and/or of the set (set_part), besides independent noise."""
    rng = np.random.default_rng(seed)
    draws = draw_sets(get_task("sentiment"), 2, n_sets, q, seed, sets_per_query=m)
    qids = sorted({r.query.id for r in draws})
    qvec = {qid: rng.normal(size=(layers, d)) for qid in qids}
    svec = {s: rng.normal(size=(layers, d)) for s in range(n_sets)}
    common = rng.normal(size=(layers, d)) * 3
    own = {qid: common + qvec[qid] * 0.5 + rng.normal(size=(layers, d)) for qid in qids}  # the anchor: the query alone
    anchor, icl, it = [], [], []
    for r in draws:
        a = own[r.query.id]
        shared = query_part * qvec[r.query.id] + set_part * svec[r.set_id]
        anchor.append(a)
        icl.append(a + shared + rng.normal(size=(layers, d)))
        it.append(a + shared + rng.normal(size=(layers, d)))
    trials = pd.DataFrame({"seed": 0, "resample": [r.index for r in draws], "query_id": [r.query.id for r in draws]})
    units = Units.from_trials(trials, {"queries_per_set": q, "sets_per_query": m}, [r.query.output for r in draws])
    return {"anchor": np.stack(anchor), "icl": np.stack(icl), "it": np.stack(it)}, units


def _row(df, pair, null, layer=-1, centring="raw"):
    sub = df[(df["pair"] == pair) & (df["null"] == null) & (df["centring"] == centring)]
    return sub[sub["layer"] == sub["layer"].max()].iloc[0] if layer == -1 else sub[sub["layer"] == layer].iloc[0]


def test_strata_follow_the_design():
    _, units = _planted(n_sets=4, q=6, m=2)
    qs = strata(units, "query_swap")
    assert all(len(set(units.set[r])) == 1 and len(set(units.label[r])) == 1 for r in qs)
    assert sum(len(r) for r in qs) == 24 and len(qs) == 8  # 4 sets × 2 labels, 3 queries each
    ds = strata(units, "demo_swap")
    assert all(len(set(units.query[r])) == 1 and len(set(units.set[r])) == 2 for r in ds)
    assert len(ds) == 12  # 2 blocks × 6 queries, each read under 2 sets
    # the sets of a block read the same queries: one permutation per block (and label)
    assert len(set(links(units, "query_swap", qs))) == 4  # 2 blocks × 2 labels
    assert len(set(links(units, "demo_swap", ds))) == 2  # whole sets swapped per block


def test_a_planted_query_specific_component_is_found_by_query_swap_only():
    states, units = _planted(query_part=1.5)
    df = null_tests(states, units, margin=0.02, n_perm=999, n_boot=499)
    qs, ds = _row(df, "icl_it", "query_swap"), _row(df, "icl_it", "demo_swap")
    assert qs["diff"] > 0.05 and qs["p_adj"] < 0.01 and qs["verdict"] == "above null"
    assert ds["verdict"] != "above null" and abs(ds["diff"]) < 0.05  # the same query under another set
    assert _row(df, "update", "query_swap")["verdict"] == "above null"


def test_a_planted_set_specific_component_is_found_by_demo_swap():
    # the demo-swap test swaps whole sets of a block: 12 blocks give 2^12 permutations (6 would
    # give 64, a smallest p near 0.016, above the 0.01 asked for here)
    states, units = _planted(n_sets=24, set_part=1.5)
    df = null_tests(states, units, margin=0.02, n_perm=999, n_boot=499)
    ds = _row(df, "icl_it", "demo_swap")
    assert ds["diff"] > 0.05 and ds["p_adj"] < 0.01 and ds["verdict"] == "above null"
    assert _row(df, "update", "demo_swap")["verdict"] == "above null"


def test_no_planted_component_gives_no_finding():
    states, units = _planted()
    df = null_tests(states, units, margin=0.02, n_perm=999, n_boot=499)
    # ICL and IT both read the query, so their raw states share its anchor: query-swap finds
    # that (as it should); the update pair and the demo-swap null have nothing to find
    assert _row(df, "icl_it", "query_swap")["verdict"] == "above null"
    tested = df[((df["pair"] == "update") | (df["null"] == "demo_swap")) & (df["layer"] > 0)]
    assert len(tested) and not (tested["verdict"] == "above null").any()
    assert set(df.columns) >= {"pair", "layer", "null", "diff", "ci_low", "ci_high", "p", "p_adj", "p_holm", "q_bh"}
    # Holm over one layer's family is never below the raw p; max-T never below it either
    assert (df["p_holm"] >= df["p"] - 1e-12).all() and (df["p_adj"] >= df["p"] - 1e-12).all()


def test_a_crossed_run_shows_its_nulls_in_results_exports_and_report(tmp_path):
    """Through the whole pipeline: run → store → `iclit results --tests -f csv` (one row per
    pair × centring × layer × null), the comparison exports (tests.csv, the printed table's
    metrics) and the report's nulls section."""
    import io

    from typer.testing import CliRunner

    from iclit.cli import app
    from iclit.experiments import run_experiment
    from iclit.report.exports import write_exports
    from iclit.report.html import render_report

    spec = parse_spec(
        {
            "name": "crossed",
            "model": "tiny-random-llama",
            "task": "sentiment",
            "k": 2,
            "resamples": 4,
            "queries_per_set": 4,
            "it_seeds": 2,
            "chunk_size": 2,
            "recipe": {"epochs": 2},
        }
    )
    out = tmp_path / "run"
    run_experiment(spec, out)
    result = CliRunner().invoke(app, ["results", str(out), "--tests", "-f", "csv"])
    assert result.exit_code == 0, result.output
    tests = pd.read_csv(io.StringIO(result.output))
    assert {"pair", "layer", "null", "diff", "ci_low", "ci_high", "p", "p_adj"} <= set(tests.columns)
    n_layers = tests["layer"].nunique()
    # anchor pairs: query-swap only; ICL–IT and the update: both nulls; raw and anchor-centred
    assert (tests["role"] == "test").sum() == n_layers * (2 * 2 + 2 * 2 + 2)
    # the positive control of a cell with two IT seeds: IT seed 1 vs seed 2 (raw, centred, update) under both nulls
    controls = tests[tests["role"] == "control"]
    assert len(controls) == n_layers * 2 * 3 and set(controls["pair"]) == {"ceiling_it", "update_ceiling_it"}
    demo = tests[(tests["pair"] == "icl_it") & (tests["null"] == "demo_swap")]
    assert (demo["ceiling"] == "ceiling_it").all() and demo["ceiling_diff"].notna().all()
    assert {"p_min", "exact", "n_perm", "margin", "fraction", "fraction_low", "fraction_high"} <= set(tests.columns)
    # 2 query blocks of 2 sets: the demo-swap test is exact over 2^2 patterns, its floor 2/4
    assert demo["exact"].all() and (demo["n_perm"] == 4).all() and (demo["p_min"] == 0.5).all()
    assert set(tests["null"]) == {"query_swap", "demo_swap"}
    assert (tests["n_units"] == 16).all()
    write_exports(out)
    assert (out / "tests.csv").exists()
    metrics = __import__("json").loads((out / "metrics.json").read_text())
    assert {(r["pair"], r["null"]) for r in metrics["tests"] if r["role"] == "test"} == {
        ("anchor_icl", "query_swap"),
        ("anchor_it", "query_swap"),
        ("icl_it", "query_swap"),
        ("icl_it", "demo_swap"),
        ("update", "query_swap"),
        ("update", "demo_swap"),
    }
    assert {r["pair"] for r in metrics["tests"] if r["role"] == "control"} == {"ceiling_it", "update_ceiling_it"}
    assert {r["pair"] for r in metrics["seeds"]} == {"anchor_it", "icl_it"}  # the IT seed noise
    assert "Against the nulls" in render_report(out)
    # the README's tables: printed by the package from the exports
    result = CliRunner().invoke(app, ["report", str(out), "--markdown"])
    assert result.exit_code == 0, result.output
    last = tests[(tests["layer"] == n_layers - 1) & (tests["centring"] == "raw")]
    row = last[(last["pair"] == "icl_it") & (last["null"] == "demo_swap")].iloc[0]
    assert f"{row['diff']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]" in result.output
    assert "IT–IT′ (positive control)" in result.output and "of the positive control's excess" in result.output


def test_last_layer_rows_are_each_cells_own_last_layer():
    """Cells of models of different depth (a models factor): each keeps its own last layer."""
    from iclit.analysis.cells import last_layer_rows

    df = pd.DataFrame({"cell_key": ["a"] * 3 + ["b"] * 5, "layer": [0, 1, 2, 0, 1, 2, 3, 4], "v": range(8)})
    assert last_layer_rows(df)["v"].tolist() == [2, 7]
    assert last_layer_rows(df.drop(columns="cell_key"))["v"].tolist() == [7]
    assert last_layer_rows(df.iloc[:0]).empty
