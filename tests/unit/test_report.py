"""The HTML report: self-contained, a figure pair per factor, and it renders in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from exp_helpers import TINY_SPEC, run_tiny_spec
from iclit.experiments import parse_spec, run_experiment
from iclit.report import render_report, write_report


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report-run")
    run_tiny_spec(out)
    return out


def test_report_is_self_contained(run_dir: Path) -> None:
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    text = path.read_text()
    images = re.findall(r"<img [^>]*src='([^']*)'", text)
    assert len(images) == 4  # per factor: the similarity-against-factor figure and the per-layer curves
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert "http://" not in text and "https://" not in text
    for needle in ("Factor: k", "Factor: wrong_labels", "accuracy: icl", "anchor – IT", "Spec", "Versions",
                   "transformers", "24 of 24 planned trials"):
        assert needle in text, needle
    assert "model: tiny-random-llama" in text  # the spec


def test_report_of_a_separate_design_and_of_a_single_cell(tmp_path: Path) -> None:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = parse_spec({**TINY_SPEC, "design": "separate", "resamples": 2, "k": 2, "wrong_labels": 0.0})
        run_experiment(spec, tmp_path / "sep")
        single = parse_spec({**TINY_SPEC, "factors": {}, "resamples": 2})
        run_experiment(single, tmp_path / "one")
    finally:
        torch.set_num_threads(before)
    sep = render_report(tmp_path / "sep")
    assert sep.count("<img ") == 4 and "with the others at their base values: wrong_labels = 0.0" in sep
    one = render_report(tmp_path / "one")
    assert one.count("<img ") == 1 and "All trials" in one


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _browser(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium on PATH: `make install` installs Debian's chromium (apt-get install chromium)")
    page = write_report(run_dir).resolve().as_uri()
    dom = _browser(binary, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom", page)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stdout[:500]
    # the page's script ran after load and found every image decoded with a size
    assert 'data-render="ok"' in body.group(0), body.group(0)
    assert 'data-images="4/4"' in body.group(0), body.group(0)

    shot = tmp_path / "report.png"
    res = _browser(binary, tmp_path / "profile", "--window-size=1200,2400", f"--screenshot={shot}", page)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (2400, 1200)
    assert pixels.std() > 0.05  # not a blank page
    coloured = (np.abs(pixels[..., 0] - pixels[..., 2]) > 0.3).mean()  # the pairs' blue/orange/green lines
    assert coloured > 0.001
