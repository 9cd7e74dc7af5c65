"""The SLURM launcher without a cluster: submitit's LocalExecutor runs each shard's job as a
process on this machine; one job fails once and is resubmitted; the driver merges."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from exp_helpers import TINY_SPEC, assert_same_numbers, check_store, failing_once, run_tiny_spec, write_spec
from typer.testing import CliRunner

from iclit.experiments import parse_spec
from iclit.experiments.lock import LOCK_NAME, RunLock
from iclit.experiments.shards import shard_dir
from iclit.experiments.spec.cluster import SlurmOptions
from iclit.rundir import Store

pytest.importorskip(
    "submitit", reason="the SLURM launcher needs submitit (pip install 'iclit[slurm]'; the test extra has it)"
)

N_TRIALS = 24


@pytest.fixture(autouse=True)
def _one_thread_jobs(monkeypatch) -> None:
    """The job processes inherit this environment: one torch thread each."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def test_local_executor_end_to_end_with_a_failed_job(tmp_path: Path) -> None:
    from iclit.experiments.slurm import launch_shards

    reference = tmp_path / "one-process"
    run_tiny_spec(reference)
    out = tmp_path / "run"
    marker = tmp_path / "failed-once"
    with RunLock.acquire(out):  # as `iclit run --backend slurm` holds it
        summary = launch_shards(
            parse_spec(TINY_SPEC),
            out,
            options=SlurmOptions(shards=2, time_min=10),
            cluster="local",
            poll_s=0.2,
            job=failing_once(marker, shard=1),
            max_retries=1,
        )
    assert marker.exists() and summary.resubmitted == {1: 1}
    assert sorted(summary.results) == [0, 1] and sum(r["computed"] for r in summary.results.values()) == N_TRIALS
    assert summary.merge is not None and summary.merge.merged == N_TRIALS
    assert all((shard_dir(out, i, 2) / "results.sqlite").exists() for i in range(2))
    assert check_store(out)[0] == N_TRIALS and not (out / LOCK_NAME).exists()
    assert_same_numbers(out, reference)
    assert any((out / "slurm").iterdir())  # submitit's logs and pickles


def test_cli_slurm_backend_no_wait_then_merge(tmp_path: Path) -> None:
    """`--no-wait` submits and returns; `iclit merge` folds the shard in once its job is done."""
    import shutil
    import time

    from iclit.cli import app

    spec = write_spec(tmp_path / "tiny.yaml", factors={}, resamples=4)
    out = tmp_path / "run"
    r = CliRunner().invoke(
        app,
        [
            "run",
            str(spec),
            "--out",
            str(out),
            "--backend",
            "slurm",
            "--shards",
            "1",
            "--slurm-cluster",
            "local",
            "--slurm",
            "time_min=10",
            "--no-wait",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "1 shard jobs" in r.output and "iclit merge" in " ".join(r.output.split())
    assert not (out / LOCK_NAME).exists()  # the driver let go of the run directory
    shard = shard_dir(out, 0, 1)
    deadline = time.time() + 240
    while time.time() < deadline and not (
        (shard / "results.sqlite").exists()
        and not (shard / LOCK_NAME).exists()
        and Store(shard, readonly=True).count()["trials"] == 4
    ):
        time.sleep(0.2)
    r = CliRunner().invoke(app, ["merge", str(out)])
    assert r.exit_code == 0 and "merged 4 new trials from 1 shards" in r.output, r.output
    for args, says in (
        (["--slurm", "bogus=1"], "bogus"),
        (["--shard", "0/2"], "without --shard"),
        (
            [] if shutil.which("sbatch") is None else ["--slurm", "bogus=2"],
            "sbatch" if shutil.which("sbatch") is None else "bogus",
        ),
    ):
        r = CliRunner().invoke(app, ["run", str(spec), "--out", str(tmp_path / "other"), "--backend", "slurm", *args])
        assert r.exit_code == 2 and says in r.output, r.output
    assert not (tmp_path / "other").exists()


def test_slurm_job_settings_become_sbatch_flags(tmp_path: Path, monkeypatch) -> None:
    """The spec's / flags' job settings as submitit writes them into the sbatch script (sbatch and
    srun faked: no cluster)."""
    from iclit.experiments.slurm import make_executor

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "srun"):
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    options = SlurmOptions(
        shards=32,
        partition="gpu",
        account="lab",
        time_min=120,
        gpus_per_task=1,
        cpus_per_task=8,
        mem_gb=32,
        array_parallelism=16,
        constraint="a100",
    )
    executor = make_executor(tmp_path / "slurm", options, name="main", cluster="slurm")
    script = executor._executor._make_submission_file_text("iclit", "uid")  # submitit's own rendering
    for flag in (
        "--partition=gpu",
        "--account=lab",
        "--time=120",
        "--gpus-per-node=1",
        "--cpus-per-task=8",
        "--mem=32GB",
        "--constraint=a100",
        "--job-name=iclit-main",
    ):
        assert f"#SBATCH {flag}" in script, flag
    assert executor._executor.parameters["array_parallelism"] == 16
