"""iclit is installable as a package: `python -m build` makes an sdist and a wheel (the wheel
built from the sdist), `twine check` passes, and the wheel installed into a fresh virtual
environment runs from a directory outside the repository — `iclit --help`, `iclit tasks`, a
comparison on the tiny model and its report — with the package data (built-in task data,
the report template, py.typed) coming from the installed wheel.

The venv sees the test interpreter's site-packages (torch and the other dependencies are not
downloaded again) and the wheel goes in with ``--no-deps --no-index``; the build runs without isolation
(the installed setuptools), so the test needs no network. Skipped without ``build`` and
``twine`` (the test extra has both). About a minute on a 2-core CPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from exp_helpers import REPO

pytest.importorskip("build", reason="python -m build is not installed (pip install build)")
pytest.importorskip("twine", reason="twine is not installed (pip install twine)")

PACKAGE_DATA = (
    "iclit/py.typed",
    "iclit/report/templates/report.html.j2",
    "iclit/tasks/data/sentiment.jsonl",
    "iclit/tasks/data/translation_en_cs.jsonl",
    "iclit/tasks/data/reference.jsonl",
    "iclit/tasks/data/README.md",
)
RUN_DOC = REPO / "docs" / "reference" / "run-directory.md"


def _run(args, cwd, env, timeout=300):
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _clean_env(**extra: str) -> dict[str, str]:
    """No PYTHONPATH (the source tree must not be importable), nothing of a venv we run in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """sdist + wheel of a copy of the tree (pyproject, README, src: what the build reads)."""
    root = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, root / name)
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, root], cwd=root, env=_clean_env())
    return out


def test_sdist_and_wheel_pass_twine_check(dist):
    wheels, sdists = sorted(dist.glob("iclit-*.whl")), sorted(dist.glob("iclit-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in dist.iterdir())
    out = _run([sys.executable, "-m", "twine", "check", "--strict", *wheels, *sdists], cwd=dist, env=_clean_env())
    assert out.count("PASSED") == 2, out
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    assert set(PACKAGE_DATA) <= names, set(PACKAGE_DATA) - names
    entry_points = zipfile.ZipFile(wheels[0]).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "iclit = iclit.cli:app" in entry_points


def _documented_exports() -> list[str]:
    """The files the run-directory page says `iclit compare` writes (its exports row)."""
    text = RUN_DOC.read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| `trials.jsonl`, "))
    return re.findall(r"`([\w.]+\.(?:jsonl|csv|json|png))`", row.split("|")[1])


def test_installed_wheel_runs_outside_the_repository(dist, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True, symlinks=os.name != "nt").create(env_dir)
    bindir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python, iclit = bindir / "python", bindir / "iclit"
    # the dependencies come from the interpreter running the tests, a venv itself or not: its
    # site-packages after the new venv's own (a .pth line adds a path; no .pth there is run)
    own = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path, env=_clean_env()
    )
    (Path(own.strip()) / "outer_site.pth").write_text("\n".join(site.getsitepackages()) + "\n", encoding="utf-8")
    work = tmp_path / "elsewhere"  # not the repository, not under it
    work.mkdir()
    env = _clean_env(ICLIT_CACHE=str(tmp_path / "cache"), NO_COLOR="1", COLUMNS="200")
    wheel = next(dist.glob("iclit-*.whl"))
    _run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            "--disable-pip-version-check",
            "-q",
            wheel,
        ],
        cwd=work,
        env=env,
    )

    # the venv's own copy is the one imported, with its package data
    where = _run(
        [
            python,
            "-c",
            "import iclit, iclit.tasks; from importlib.resources import files; "
            "print(iclit.__file__); print(files('iclit') / 'tasks' / 'data' / 'sentiment.jsonl')",
        ],
        cwd=work,
        env=env,
    )
    module_file, data_file = (Path(line) for line in where.split())
    assert env_dir in module_file.parents and env_dir in data_file.parents, where
    assert REPO not in module_file.parents

    assert "compare" in _run([iclit, "--help"], cwd=work, env=env)
    tasks = _run([iclit, "tasks"], cwd=work, env=env)
    assert "sentiment" in tasks and "translation-en-cs" in tasks, tasks

    out = work / "run"
    printed = _run(
        [
            iclit,
            "compare",
            "--model",
            "tiny-random-llama",
            "--task",
            "sentiment",
            "--k",
            "2",
            "--resamples",
            "3",
            "--epochs",
            "2",
            "--seed",
            "0",
            "--out",
            "run",
        ],
        cwd=work,
        env=env,
    )
    assert "icl–it" in printed, printed
    exports = _documented_exports()
    assert {"summary.csv", "tests.csv", "trials.jsonl"} <= set(exports), exports
    for name in ["spec.yaml", "results.sqlite", *exports]:
        assert (out / name).is_file(), name
    assert len(list((out / "states").glob("*.safetensors"))) >= 1
    assert len((out / "trials.jsonl").read_text(encoding="utf-8").splitlines()) == 3
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["model"] == "tiny-random-llama" and config["k"] == 2

    _run([iclit, "report", "run"], cwd=work, env=env)  # the template, from the installed package
    assert "<html" in (out / "report.html").read_text(encoding="utf-8").lower()
