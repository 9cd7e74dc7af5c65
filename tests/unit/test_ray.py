"""The Ray backend on a local 2-CPU cluster: the same trials and numbers as a local run, also
when an actor's process is killed mid-run.

One Ray session serves the whole module (starting one takes seconds).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from exp_helpers import (
    TINY_SPEC,
    assert_same_numbers,
    check_store,
    dying_worker,
    env_one_thread,
    iclit_cmd,
    run_tiny_spec,
    write_spec,
)

from iclit.experiments import parse_spec, run_experiment
from iclit.experiments.raypool import actor_options, allocator_preload
from iclit.rundir import Store

ray = pytest.importorskip("ray", reason="the Ray backend needs ray (pip install 'iclit[ray]'; the test extra has it)")

N_TRIALS = 24


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with 2 CPUs for this module; yields its address."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def test_an_actor_runs_on_the_allocator_it_asks_for(cluster: str) -> None:
    lib = allocator_preload("auto")
    if lib is None:
        pytest.skip("this machine has no libtcmalloc_minimal")

    @ray.remote
    def malloc_mapped() -> bool:
        return any("libtcmalloc" in line for line in Path("/proc/self/maps").read_text().splitlines())

    assert ray.get(malloc_mapped.options(**actor_options(gpu=False, preload=lib)).remote())
    assert not ray.get(malloc_mapped.options(**actor_options(gpu=False)).remote())


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local")
    run_tiny_spec(out, backend="local")
    return out


def test_ray_run_matches_local(cluster: str, local_run: Path, tmp_path: Path) -> None:
    spec = parse_spec(TINY_SPEC)
    first = run_experiment(spec, tmp_path, backend="ray", max_chunks=4)
    assert (first.backend, first.computed, first.chunks_run) == ("ray", 8, 4)
    rest = run_experiment(spec, tmp_path, backend="ray")  # resumes on Ray
    assert (rest.already_done, rest.computed) == (8, N_TRIALS - 8)
    assert check_store(tmp_path)[0] == N_TRIALS
    assert_same_numbers(tmp_path, local_run, atol=1e-5)
    with Store(tmp_path) as store:
        assert store.latest_run()["backend"] == "ray"
        local = Store(local_run).outputs().set_index("trial_key")
        remote = store.outputs().set_index("trial_key").loc[local.index]
    for arm in ("anchor", "icl", "it"):
        assert (local[f"prediction_{arm}"] == remote[f"prediction_{arm}"]).all()


def test_workers_load_the_model_once(cluster: str) -> None:
    from iclit.experiments.plan import make_plan
    from iclit.experiments.workers import ChunkWorker, make_job

    spec = parse_spec(TINY_SPEC)
    plan = make_plan(spec)
    Actor = ray.remote(num_cpus=1)(ChunkWorker)
    actor = Actor.remote(("tiny-random-llama", None, None))
    try:
        jobs = [make_job(c, spec) for c in plan.chunks[:3]]
        results = ray.get([actor.run.remote(j) for j in jobs])
        assert [len(r.records) for r in results] == [2, 2, 2]
        assert all(r.states["icl"].shape[0] == 2 for r in results)  # the chunk's states come back too
        assert ray.get(actor.models.remote()) == [("tiny-random-llama", None, None)]
        assert ray.get(actor.loads.remote()) == 1
    finally:
        ray.kill(actor)


def test_cli_on_an_existing_cluster(cluster: str, local_run: Path, tmp_path: Path) -> None:
    """`iclit run --backend ray --address …` from another process, on this module's cluster."""
    spec = write_spec(tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    proc = subprocess.run(
        iclit_cmd("run", str(spec), "--out", str(out), "--backend", "ray", "--address", cluster, "--no-progress"),
        env=env_one_thread(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{N_TRIALS} computed" in proc.stdout and "ray" in proc.stdout
    assert check_store(out)[0] == N_TRIALS
    assert_same_numbers(out, local_run, atol=1e-5)


def test_a_killed_actor_has_its_chunk_retried(cluster: str, local_run: Path, tmp_path: Path, monkeypatch) -> None:
    """An actor's process dies (SIGKILL) while it holds a chunk: the chunk is computed again on
    a new actor, the run finishes, and its rows and numbers are the uninterrupted run's."""
    from iclit.experiments import make_plan, raypool
    from iclit.experiments.raypool import RayOptions

    spec = parse_spec(TINY_SPEC)
    victim = make_plan(spec).chunks[5].keys[0]
    marker = tmp_path / "deaths"
    marker.mkdir()
    monkeypatch.setattr(raypool, "ChunkWorker", dying_worker(marker, victim))
    summary = run_experiment(spec, tmp_path / "run", backend="ray", ray_options=RayOptions(max_retries=1))
    assert len(list(marker.iterdir())) == 1  # one actor died, after computing the chunk
    assert (summary.computed, summary.chunks_run) == (N_TRIALS, 12)
    assert check_store(tmp_path / "run")[0] == N_TRIALS  # nothing stored twice
    assert_same_numbers(tmp_path / "run", local_run, atol=1e-5)
    keep = ["trial_key", "scores_json", "outputs_json", "n_layers", "query_id"]
    ours = Store(tmp_path / "run").conn.execute(f"SELECT {', '.join(keep)} FROM trials ORDER BY trial_key").fetchall()
    theirs = Store(local_run).conn.execute(f"SELECT {', '.join(keep)} FROM trials ORDER BY trial_key").fetchall()
    assert [r[0] for r in ours] == [r[0] for r in theirs]
    import json

    for a, b in zip(ours, theirs, strict=True):  # the same predictions and scores
        assert json.loads(a[2])["predictions"] == json.loads(b[2])["predictions"]


def test_a_chunk_whose_workers_keep_dying_is_named(cluster: str, tmp_path: Path, monkeypatch) -> None:
    from iclit.experiments import make_plan, raypool
    from iclit.experiments.raypool import ChunkFailed, RayOptions

    spec = parse_spec({**TINY_SPEC, "factors": {}, "resamples": 2})
    chunk = make_plan(spec).chunks[0]
    marker = tmp_path / "deaths"
    marker.mkdir()
    monkeypatch.setattr(raypool, "ChunkWorker", dying_worker(marker, chunk.keys[0], times=5))
    with pytest.raises(
        ChunkFailed, match=f"cell {chunk.cell.key[:12]}.*seed 0, resamples 0-1.*died 1 time .max_retries 0"
    ):
        run_experiment(spec, tmp_path / "run", backend="ray", ray_options=RayOptions(max_retries=0))
    assert len(list(marker.iterdir())) == 1
    assert Store(tmp_path / "run").count()["trials"] == 0


def test_a_pool_keeps_its_actors_across_runs(cluster: str, tmp_path: Path) -> None:
    """A RayPool serves two runs (a suite's specs) with the same actors, each loading the model
    once; recipe cells share their base reads on Ray too, with the numbers of a local run."""
    from test_shared_readouts import RECIPES

    from iclit.experiments import make_plan
    from iclit.experiments.raypool import RayPool

    spec = parse_spec(RECIPES)
    local = run_experiment(spec, tmp_path / "local")
    with RayPool(workers=2) as pool:
        first = run_experiment(parse_spec(TINY_SPEC), tmp_path / "tiny", backend="ray", ray_pool=pool)
        actors = list(pool.actors)
        pids = sorted(ray.get([a.pid.remote() for a in actors]))
        second = run_experiment(spec, tmp_path / "recipes", backend="ray", ray_pool=pool)
        assert pool.actors == actors and sorted(ray.get([a.pid.remote() for a in actors])) == pids
        assert ray.get([a.loads.remote() for a in actors]) == [1, 1]
        held = [list(pool.held[a]) for a in actors]
    assert (first.computed, second.computed) == (N_TRIALS, local.computed)
    assert set(held[0]) | set(held[1]) == {c.base_key for c in make_plan(spec).chunks}  # which actor: timing
    assert_same_numbers(tmp_path / "recipes", tmp_path / "local", atol=1e-5)
    assert ray.is_initialized()  # the module's cluster: not the pool's to shut down
