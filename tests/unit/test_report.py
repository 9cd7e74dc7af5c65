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


# --- analysis.factors on a hand-built RunData; the report's CKA from RunData.cka ---------


def _toy_run(design: str = "grid"):
    """Two factors (k: 1, 2; wrong_labels: 0, 1) x 2 seeds x 3 resamples, 3 layers; CKA per
    cell x seed x layer filled by hand (value = 0.1 * k + 0.01 * seed + 0.001 * layer)."""
    import pandas as pd

    from iclit.analysis.rundata import RunData

    cells = {f"c{k}{w}": {"task": "sentiment", "k": k, "wrong_labels": float(w)} for k in (1, 2) for w in (0, 1)}
    frame, outputs, cka = [], [], []
    for key, labels in cells.items():
        for seed in (0, 1):
            for r in range(3):
                trial = f"{key}-{seed}-{r}"
                outputs.append({**labels, "cell_key": key, "seed": seed, "resample": r, "trial_key": trial,
                                "score_icl": float(r % 2), "score_it": 1.0, "score_name": "accuracy",
                                "demo_similarity": None, "n_wrong": 0})
                for layer in range(3):
                    for pair in ("anchor_icl", "anchor_it", "icl_it"):
                        frame.append({**labels, "cell_key": key, "seed": seed, "resample": r, "trial_key": trial,
                                      "layer": layer, "pair": pair, "cosine": 0.5 + 0.1 * labels["k"] + 0.01 * layer})
            for layer in range(3):
                for pair in ("cka_icl_it", "cka_anchor_it"):
                    cka.append({"cell_key": key, "seed": seed, "layer": layer, "pair": pair,
                                "value": 0.1 * labels["k"] + 0.01 * seed + 0.001 * layer + (pair == "cka_anchor_it")})
    plan = {"factors": {"k": [1, 2], "wrong_labels": [0.0, 1.0]}, "base": {"task": "sentiment", "k": 2, "wrong_labels": 0.0},
            "design": design, "seeds": [0, 1], "resamples": 3, "n_trials": len(outputs)}
    return RunData(Path("toy"), None, plan, pd.DataFrame(frame), pd.DataFrame(outputs), pd.DataFrame(cka))


def test_factor_summary_reads_cka_per_cell_and_seed() -> None:
    from iclit.analysis import factor_summary

    run = _toy_run()
    s = factor_summary(run.frame, run.outputs, run.plan, "k", cka=run.cka).set_index("k")
    for k in (1, 2):
        last, mean = s.loc[k, "cka_icl_it:last_layer"], s.loc[k, "cka_icl_it:mean_over_layers"]
        assert last["n"] == mean["n"] == 4  # 2 cells (wrong_labels pooled) x 2 seeds
        assert last["mean"] == pytest.approx(0.1 * k + 0.005 + 0.002)  # mean over seeds at layer 2
        assert mean["mean"] == pytest.approx(0.1 * k + 0.005 + 0.001)
        assert s.loc[k, "cka_anchor_it:last_layer"]["mean"] == pytest.approx(1 + 0.1 * k + 0.007)
        assert s.loc[k, "trials"] == 12 and s.loc[k, "icl_it:last_layer"]["mean"] == pytest.approx(0.52 + 0.1 * k)
    assert "cka_anchor_icl:last_layer" not in s.columns  # only the CKA pairs stored
    # design separate: only the cells where wrong_labels keeps its base value (0.0)
    sep = _toy_run("separate")
    t = factor_summary(sep.frame, sep.outputs, sep.plan, "k", cka=sep.cka).set_index("k")
    assert t.loc[1, "cka_icl_it:last_layer"]["n"] == 2 and t.loc[1, "trials"] == 6
    # no cka frame (or an empty one): no CKA columns
    plain = factor_summary(run.frame, run.outputs, run.plan, "k")
    assert not any(c.startswith("cka_") for c in plain.columns)


def test_analysis_and_report_export_the_same_functions() -> None:
    import iclit.analysis as analysis
    import iclit.report as report
    from iclit.analysis import factors
    from iclit.report.plots import PAIR_STYLE, plot_layers

    for name in ("factor_summary", "factor_effects", "dose_summary"):
        assert getattr(report, name) is getattr(analysis, name) is getattr(factors, name)
    assert plot_layers is report.plot_layers and PAIR_STYLE is report.PAIR_STYLE


def test_one_style_table_covers_every_pair() -> None:
    from iclit.analysis import BASELINE_PAIRS, PAIRS
    from iclit.analysis.factors import CKA_PAIRS
    from iclit.report.figures import PAIR_STYLE, pair_style

    every = [*PAIRS, *(p for pairs in BASELINE_PAIRS.values() for p in pairs), *CKA_PAIRS]
    assert set(every) <= set(PAIR_STYLE)
    assert len({s.label for s in PAIR_STYLE.values()}) == len(PAIR_STYLE)  # labels tell the pairs apart
    assert all(s.linestyle in ("-", "--", ":", "-.") for s in PAIR_STYLE.values())
    assert pair_style("icl_it_step4").label == "icl – it – step4"  # unknown pairs still draw


def test_html_module_builds_no_markup() -> None:
    import iclit.report.html as module

    source = Path(module.__file__).read_text()
    code = source.split('"""', 2)[2]  # past the module docstring
    assert not re.search(r"<(td|tr|th|table|img|h[1-6]|p|span|pre)\b", code)


def test_report_shows_the_cka_of_run_data_and_escapes_text(run_dir: Path) -> None:
    import dataclasses

    import pandas as pd
    import yaml

    from iclit.analysis.rundata import load_run

    run = load_run(run_dir)
    spec = yaml.safe_load(run.latest["spec_yaml"])
    spec["description"] = "<b>not bold</b> & co"
    latest = {**run.latest, "spec_yaml": yaml.safe_dump(spec, sort_keys=False)}
    layers = sorted(run.frame["layer"].unique())
    cells = run.outputs[["cell_key", "seed"]].drop_duplicates()
    cka = pd.DataFrame([{"cell_key": c, "seed": s, "layer": l, "pair": "cka_icl_it", "value": 0.25 + 0.5 * (l == layers[-1])}
                        for c, s in cells.itertuples(index=False) for l in layers])
    text = render_report(dataclasses.replace(run, latest=latest, cka=cka))
    assert "&lt;b&gt;not bold&lt;/b&gt; &amp; co" in text and "<b>not bold</b>" not in text
    for needle in ("Baselines by k", "Baselines by wrong_labels", "linear CKA ICL vs IT across a cell&#39;s queries (last layer)",
                   "0.750 <span class=ci>[0.750, 0.750]</span>"):
        assert needle in text, needle
    assert text.count("<img ") == 4  # CKA has no per-layer figure: tables only
    empty = render_report(dataclasses.replace(run, cka=run.cka.iloc[:0]))
    assert "linear CKA" not in empty and "Baselines by" not in empty
