"""Cells that differ only in the IT recipe read the base model once per chunk: the base arms'
outputs are shared, bit for bit what each cell computes alone; the Ray pool sends a chunk to
the actor that holds its base reads."""

from __future__ import annotations

from collections import Counter, deque
from pathlib import Path

import numpy as np
import pytest
from exp_helpers import TINY_SPEC

from iclit.engine import evaluate as evaluate_module
from iclit.experiments import make_plan, parse_spec, run_experiment
from iclit.rundir.statefiles import read_chunk_states
from iclit.rundir.store import Store

RECIPES = {
    **TINY_SPEC,
    "arms": ["anchor", "icl", "it", "icl_reordered"],
    "baselines": ["query_mean"],
    "recipe": {"epochs": 3, "capture_steps": [1, 3]},
    "factors": {"recipe": [{"lr": 1.0e-3}, {"lr": 3.0e-3}, {"epochs": 4}]},
}
"""Three cells that differ only in the recipe: 18 trials in 9 chunks of 2, three chunks per base key."""


def _states(out: Path) -> dict[str, dict[str, np.ndarray]]:
    """trial key → state name → that trial's state."""
    with Store(out) as store:
        rows = store.conn.execute("SELECT trial_key, states_file, states_row FROM trials").fetchall()
    files = {f: read_chunk_states(out / f)[1] for f in {f for _, f, _ in rows}}
    return {k: {n: a[r] for n, a in files[f].items() if n != "reference_mean"} for k, f, r in rows}


@pytest.fixture
def count_arms(monkeypatch) -> Counter:
    """Counts how often each arm is computed."""
    calls: Counter = Counter()
    real = evaluate_module.get_arm

    def counting(name: str):
        fn = real(name)

        def run(ctx):
            calls[name] += 1
            return fn(ctx)

        return run

    monkeypatch.setattr(evaluate_module, "get_arm", counting)
    return calls


def test_recipe_cells_share_the_base_reads_bit_for_bit(tmp_path: Path, count_arms: Counter) -> None:
    spec = parse_spec(RECIPES)
    plan = make_plan(spec)
    assert len({c.base_key for c in plan.chunks}) == 3 and len({c.keys for c in plan.chunks}) == 9
    summary = run_experiment(spec, tmp_path / "shared")
    assert summary.computed == 18
    assert count_arms["icl"] == count_arms["icl_reordered"] == count_arms["anchor"] == 3  # once per base key
    assert count_arms["it"] == 9
    shared = _states(tmp_path / "shared")
    alone: dict[str, dict[str, np.ndarray]] = {}
    for i, recipe in enumerate(RECIPES["factors"]["recipe"]):  # each cell in a run of its own: nothing to share
        one = parse_spec({**RECIPES, "factors": {}, "recipe": {**RECIPES["recipe"], **recipe}})
        run_experiment(one, tmp_path / f"alone{i}")
        alone |= _states(tmp_path / f"alone{i}")
    assert count_arms["icl"] == 3 + 9
    assert set(alone) == set(shared)  # a cell's trial keys do not depend on the run it is in
    for key, states in shared.items():
        assert set(states) == set(alone[key])
        for name, a in states.items():
            assert np.array_equal(a, alone[key][name]), (key, name)  # every arm, the tuned ones too


def test_cells_that_differ_beyond_the_recipe_share_nothing(tmp_path: Path, count_arms: Counter) -> None:
    spec = parse_spec({**RECIPES, "factors": {"k": [1, 2]}})
    assert len({c.base_key for c in make_plan(spec).chunks}) == 6
    run_experiment(spec, tmp_path / "run")
    assert count_arms["icl"] == 6


def test_a_free_actor_takes_the_chunk_whose_base_reads_it_holds() -> None:
    from iclit.experiments.raypool import RayPool
    from iclit.experiments.workers import make_job

    spec = parse_spec(RECIPES)
    jobs = [make_job(c, spec, shares=True) for c in make_plan(spec).chunks]  # cell by cell: r1 s1-s3, r2 s1-s3, ...
    pool = RayPool()
    a, b = "actor-a", "actor-b"
    pool.held = {a: deque(maxlen=8), b: deque(maxlen=8)}
    queue = deque(jobs)
    first_a = pool.next_job(a, queue, busy=[])
    first_b = pool.next_job(b, queue, busy=[a])
    assert (first_a, first_b) == (jobs[0], jobs[1])
    assert pool.next_job(a, queue, busy=[b]).base_key == first_a.base_key  # the next recipe's chunk of a's set
    assert pool.next_job(b, queue, busy=[a]).base_key == first_b.base_key
    assert pool.next_job(a, queue, busy=[b]).base_key == first_a.base_key
    assert pool.next_job(b, queue, busy=[a]).base_key == first_b.base_key
    third = pool.next_job(a, queue, busy=[b])  # a's and b's sets done: the next set nobody holds
    assert third is jobs[2]
    assert [j.base_key for j in queue] == [third.base_key] * 2
    assert pool.next_job(b, queue, busy=[a]) is jobs[5]  # nothing else left: b takes one of a's
    lone = make_job(make_plan(spec).chunks[0], spec)  # a job that shares nothing
    assert lone.base_key is None and pool.next_job(b, deque([lone]), busy=[a]) is lone
