"""scripts/run_paper.py on two tiny specs: the second reuses the first's cell, brings its
whole-cell tables along (analysed once), suite.json times each spec and its report, and the
model is dropped once no later spec reads it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "run_paper.py"
BASE = {
    "model": "tiny-random-llama",
    "task": "sentiment",
    "k": 2,
    "resamples": 4,
    "queries_per_set": 4,
    "chunk_size": 2,
    "recipe": {"epochs": 2},
}


def _suite(tmp_path, monkeypatch):
    """run_paper as a module, with configs/paper of two tiny specs under tmp_path."""
    import yaml

    spec = importlib.util.spec_from_file_location("run_paper", SCRIPT)
    run_paper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_paper)
    configs = tmp_path / "configs" / "paper"
    configs.mkdir(parents=True)
    (configs / "main.yaml").write_text(yaml.safe_dump({"name": "t-main", **BASE}))
    (configs / "wrong_labels.yaml").write_text(
        yaml.safe_dump({"name": "t-wl", **BASE, "factors": {"wrong_labels": [0.0, 1.0]}})
    )
    monkeypatch.setattr(run_paper, "ROOT", tmp_path)
    return run_paper


def test_the_suite_reuses_cells_with_their_tables(tmp_path, monkeypatch):
    from iclit.analysis import cache

    run_paper = _suite(tmp_path, monkeypatch)
    from iclit.analysis import cells

    analysed = []
    real = cells._one_cell
    monkeypatch.setattr(
        cells, "_one_cell", lambda run_dir, cell, *a, **k: analysed.append(cell) or real(run_dir, cell, *a, **k)
    )
    from iclit.experiments import workers

    loads = len(workers._LOADS)
    out = tmp_path / "runs"
    monkeypatch.setattr(sys, "argv", ["run_paper.py", "--out", str(out), "--only", "main", "wrong_labels"])
    run_paper.main()
    # the model was loaded once for both specs and dropped after the last one that reads it
    assert [n for n, _, _ in workers._LOADS[loads:]].count("tiny-random-llama") <= 1
    assert not any(n == "tiny-random-llama" for n, _, _ in workers._MODELS)
    log = json.loads((out / "suite.json").read_text())
    assert log["specs"]["main"]["reused"] == 0 and log["specs"]["wrong_labels"]["reused"] == 16
    assert all(0 <= s["report_seconds"] <= s["seconds"] for s in log["specs"].values())
    # the machine's matmul speed beside every timing: before each spec, and before and after the suite
    before = [s["matmul_gflops_before"] for s in log["specs"].values()]
    assert len(before) == 2 and all(isinstance(r, int) and r > 0 for r in before)
    rates = log["last_invocation"]["matmul_gflops"]
    assert len(rates) == 2 and all(isinstance(r, int) and r > 0 for r in rates)
    entries = {name: {p.name for p in (out / name / cache.CACHE_DIR).iterdir()} for name in ("main", "wrong_labels")}
    assert len(entries["main"]) == 1 and len(entries["wrong_labels"]) == 2
    assert entries["main"] < entries["wrong_labels"]  # the shared cell's tables came along
    assert len(analysed) == len(set(analysed)) == 2  # three cell reports, two cells, each analysed once
    assert (out / "wrong_labels" / "report.html").exists()


def test_reports_behind_the_next_spec_come_in_order_with_the_copied_tables(tmp_path, monkeypatch):
    from iclit.analysis import cache

    run_paper = _suite(tmp_path, monkeypatch)
    out = tmp_path / "runs"
    argv = ["run_paper.py", "--out", str(out), "--only", "main", "wrong_labels", "--reports", "behind"]
    monkeypatch.setattr(sys, "argv", argv)
    run_paper.main()
    log = json.loads((out / "suite.json").read_text())
    assert [s["report"] for s in log["specs"].values()] == ["behind"] * 2
    assert all(s["report_seconds"] > 0 for s in log["specs"].values())
    assert all((out / name / "report.html").exists() for name in ("main", "wrong_labels"))
    main, wl = (out / name / cache.CACHE_DIR for name in ("main", "wrong_labels"))
    (shared,) = {p.name for p in main.iterdir()}
    assert len(list(wl.iterdir())) == 2
    # the shared cell's tables were copied (copytree keeps the times) before wrong_labels' report,
    # which therefore did not analyse that cell again
    assert (wl / shared / "done").stat().st_mtime_ns == (main / shared / "done").stat().st_mtime_ns


def test_release_models_keeps_only_what_later_specs_read(monkeypatch):
    from iclit.experiments import workers

    monkeypatch.setattr(
        workers,
        "_MODELS",
        {("a", None, None): object(), ("b", "cpu", None): object(), ("b", None, "bfloat16"): object()},
    )
    assert workers.release_models({"b"}) == ["a"]
    assert set(workers._MODELS) == {("b", "cpu", None), ("b", None, "bfloat16")}
    assert sorted(workers.release_models(set())) == ["b", "b"] and not workers._MODELS


def test_a_suite_stopped_early_keeps_the_times_of_its_finished_specs(tmp_path, monkeypatch):
    import pytest

    run_paper = _suite(tmp_path, monkeypatch)
    real = run_paper.run_experiment

    def stop_at_the_second(spec, out, **kw):
        if spec.name == "t-wl":
            raise KeyboardInterrupt
        return real(spec, out, **kw)

    monkeypatch.setattr(run_paper, "run_experiment", stop_at_the_second)
    out = tmp_path / "runs"
    monkeypatch.setattr(sys, "argv", ["run_paper.py", "--out", str(out), "--only", "main", "wrong_labels"])
    with pytest.raises(KeyboardInterrupt):
        run_paper.main()
    log = json.loads((out / "suite.json").read_text())
    assert (
        list(log["specs"]) == ["main"] and log["specs"]["main"]["computed"] == 16 and "finished" in log["specs"]["main"]
    )
    assert "invocations" not in log  # the invocation itself did not finish


def test_the_backend_flags_reach_every_spec(tmp_path, monkeypatch):
    run_paper = _suite(tmp_path, monkeypatch)
    real, seen = run_paper.run_experiment, []

    def local_but_recorded(spec, out, **kw):
        seen.append((kw.pop("backend"), kw.pop("workers", None), kw.pop("ray_options", None)))
        return real(spec, out, **kw)

    monkeypatch.setattr(run_paper, "run_experiment", local_but_recorded)
    out = tmp_path / "runs"
    argv = ["run_paper.py", "--out", str(out), "--only", "main", "wrong_labels"]
    monkeypatch.setattr(sys, "argv", [*argv, "--backend", "ray", "--workers", "2", "--worker-threads", "1"])
    run_paper.main()
    assert seen == [("ray", 2, run_paper.RayOptions(threads=1))] * 2
    malloc = run_paper.allocator_preload("auto") or "system"
    backend = json.loads((out / "suite.json").read_text())["last_invocation"]["backend"]
    assert backend == f"ray: 2 x 1 threads, malloc {malloc}"
