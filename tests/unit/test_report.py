"""The HTML report: self-contained, the headline figure first, a figure pair per factor, the
tables folded, and it renders in headless Chromium with a figure that is not empty."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from exp_helpers import TINY_SPEC, run_tiny_spec

from iclit.experiments import parse_spec, run_experiment
from iclit.report import render_report, write_report

CROSSED_SPEC = {
    "name": "crossed",
    "model": "tiny-random-llama",
    "task": "sentiment",
    "k": 2,
    "resamples": 4,
    "queries_per_set": 4,
    "it_seeds": 2,
    "chunk_size": 2,
    "recipe": {"epochs": 2},
    "factors": {"k": [1, 2]},
}
"""Two cells of 2 query blocks × 2 sets × 4 queries, two IT seeds: every null and the IT positive control."""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report-run")
    run_tiny_spec(out)
    return out


@pytest.fixture(scope="module")
def crossed_run(tmp_path_factory):
    """The crossed run, loaded once (its tests are computed on first use and kept)."""
    from iclit.analysis.rundata import load_run

    out = tmp_path_factory.mktemp("report-crossed")
    run_experiment(parse_spec(CROSSED_SPEC), out)
    return load_run(out)


# --- what a figure must be: present, decodable, of a sensible size, not blank -------------


def figure_problems(html: str, image_id: str = "figure-main", coloured: float = 0.002) -> list[str]:
    """What is wrong with the report's image ``image_id`` (empty when nothing is): missing,
    not a PNG that decodes, smaller than 800 × 300 px, blank (pixel spread), or without the
    pairs' coloured lines (under a share ``coloured`` of the pixels)."""
    from PIL import Image

    found = re.search(rf"<img id={image_id} [^>]*src='data:image/png;base64,([^']*)'", html)
    if not found:
        return [f"no image {image_id}"]
    try:
        image = Image.open(io.BytesIO(base64.b64decode(found.group(1), validate=True)))
        image.load()
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the finding
        return [f"{image_id} does not decode: {exc!r}"]
    problems = []
    if image.width < 800 or image.height < 300:
        problems.append(f"{image_id} is {image.width} × {image.height} px")
    pixels = np.asarray(image.convert("RGB"), dtype=float) / 255
    if pixels.std() < 0.05:
        problems.append(f"{image_id} is blank (pixel std {pixels.std():.3f})")
    if _coloured(pixels) < coloured:
        problems.append(f"{image_id} has no coloured lines")
    return problems


def _coloured(pixels: np.ndarray) -> float:
    """The share of strongly coloured pixels (red far from blue: the pairs' blue, orange, green, red)."""
    return float((np.abs(pixels[..., 0] - pixels[..., 2]) > 0.3).mean())


def screenshot_problems(path: Path, body: str, size: tuple[int, int] = (1200, 2400)) -> list[str]:
    """What is wrong with a screenshot of the report: not ``size`` (width, height), blank, or
    the headline figure, where the page's script says it landed (``data-figure`` of the
    ``body`` tag: x, y, width, height in CSS px), smaller than 600 × 250, blank or colourless."""
    from matplotlib.image import imread

    pixels = imread(path)[..., :3]
    problems = []
    if pixels.shape[:2] != size[::-1]:
        problems.append(f"screenshot is {pixels.shape[1]} × {pixels.shape[0]}")
    if pixels.std() < 0.05:
        problems.append("blank screenshot")
    box = re.search(r'data-figure="(-?\d+),(-?\d+),(\d+),(\d+)"', body)
    if not box:
        return [*problems, "the page placed no headline figure"]
    x, y, w, h = (int(v) for v in box.groups())
    if w < 600 or h < 250:
        return [*problems, f"the headline figure is shown {w} × {h} px"]
    shown = pixels[max(y, 0) : y + h, max(x, 0) : x + w]
    if shown.size == 0 or shown.std() < 0.05:
        problems.append("the headline figure is blank on screen")
    elif _coloured(shown) < 0.002:
        problems.append("the headline figure shows no coloured lines")
    return problems


def _png(width: int, height: int, colour: tuple[int, int, int] = (255, 255, 255)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def test_report_is_self_contained(run_dir: Path) -> None:
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    text = path.read_text()
    images = re.findall(r"<img [^>]*src='([^']*)'", text)
    # per factor: the similarity-against-factor figure and the per-layer curves (no nulls' tests in this
    # run, so no headline figure pooled over cells: the factor sections draw the curves per value)
    assert len(images) == 4
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert "http://" not in text and "https://" not in text
    for needle in (
        "Factor: k",
        "Factor: wrong_labels",
        "accuracy: icl",
        "anchor – IT",
        "Spec",
        "Versions",
        "transformers",
        "24 of 24 planned trials",
        "No nulls: the run has no crossed design",
    ):
        assert needle in text, needle
    assert "model: tiny-random-llama" in text  # the spec
    # the figures first; the tables folded below
    assert "<img id=figure-main" not in text and figure_problems(text) == ["no image figure-main"]
    assert text.index("No nulls") < text.index("Factor: k") < text.index("<img ") < text.index("<details>")
    assert "<table" not in text[: text.index("<details>")]
    assert _over_three_digits(text) == []  # numbers: at most three significant digits


def _over_three_digits(html: str) -> list[str]:
    """Numbers in table cells with more than three significant digits."""
    body = re.sub(r"<img [^>]*>", "", html.split("<h2>Spec and versions</h2>")[0])
    cells = re.findall(r"<td>(.*?)</td>", body)
    numbers = [n for c in cells for n in re.findall(r"\d+\.\d+", re.sub(r"<[^>]+>", " ", c))]
    return [n for n in numbers if len(n.replace(".", "").lstrip("0")) > 3]


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
    # one cell: the headline figure is its per-layer curves (not drawn twice)
    assert one.count("<img ") == 1 and "All trials" in one and figure_problems(one) == []


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _browser(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120)


def _render_in_chromium(binary: str, page: Path, tmp_path: Path) -> tuple[str, Path]:
    """(the page's body tag after its script ran, a 1200 × 2400 screenshot)."""
    uri = page.resolve().as_uri()
    dom = _browser(
        binary, tmp_path / "profile", "--window-size=1200,2400", "--virtual-time-budget=10000", "--dump-dom", uri
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stdout[:500]
    shot = tmp_path / f"{page.stem}.png"
    res = _browser(binary, tmp_path / "profile", "--window-size=1200,2400", f"--screenshot={shot}", uri)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    return body.group(0), shot


def test_report_renders_in_headless_chromium(crossed_run, tmp_path: Path, monkeypatch) -> None:
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium on PATH: `make install` installs Debian's chromium (apt-get install chromium)")
    page = tmp_path / "report.html"
    page.write_text(html := render_report(crossed_run))
    assert figure_problems(html) == [] and figure_problems(html, "figure-forest") == []
    body, shot = _render_in_chromium(binary, page, tmp_path)
    # the page's script ran after load and found every image decoded with a size: the headline
    # figure, the forest plot and the factor's two figures
    assert 'data-render="ok"' in body and 'data-images="4/4"' in body, body
    assert screenshot_problems(shot, body) == []

    # a broken headline figure (no image data) fails both the page's own check and the screenshot's
    from iclit.report import headline

    monkeypatch.setattr(headline, "overview_figure", lambda *args, **kwargs: "")
    broken = tmp_path / "broken.html"
    broken.write_text(html := render_report(crossed_run))
    assert figure_problems(html)
    body, shot = _render_in_chromium(binary, broken, tmp_path)
    assert 'data-render="broken"' in body and 'data-images="3/4"' in body, body
    assert any("headline figure is shown" in p for p in screenshot_problems(shot, body)), body


def test_the_figure_check_fails_on_an_empty_or_broken_figure(crossed_run, monkeypatch) -> None:
    """The checks the browser test relies on catch a blank, a tiny, an undecodable and a missing figure."""
    from iclit.report import headline

    assert figure_problems(render_report(crossed_run)) == []
    cases = {"blank": _png(1100, 700), "px": _png(40, 30, (30, 120, 200)), "decode": "aGVsbG8=", "no image": None}
    for expected, png in cases.items():
        if png is None:
            monkeypatch.setattr(headline, "headline_section", lambda run: None)
            import iclit.report.html as html_module

            monkeypatch.setattr(html_module, "headline_section", lambda run: None)
        else:
            monkeypatch.setattr(headline, "overview_figure", lambda *args, png=png, **kwargs: png)
        problems = figure_problems(render_report(crossed_run))
        assert any(expected in p for p in problems), (expected, problems)


def test_the_headline_of_a_crossed_run(crossed_run) -> None:
    """The figure's three views with the nulls' bands, the forest plot with the controls and
    margins, and the summary of verdicts, all from the run's tests."""
    from iclit.report.headline import forest_rows, headline_section, layer_curves

    curves, nulls, rows = layer_curves(crossed_run)
    assert rows == ["k = 1", "k = 2"]  # the plan's order
    assert set(curves["view"]) == {"raw", "centred", "update"}
    assert {"anchor_icl", "anchor_it", "icl_it", "ceiling_it"} <= set(curves.loc[curves["view"] == "raw", "pair"])
    assert set(curves.loc[curves["view"] == "update", "pair"]) == {"update", "update_ceiling_it"}
    assert set(nulls["null"]) == {"query_swap", "demo_swap"}
    finite = nulls.dropna(subset=["low", "high"])  # layer 0 (the embeddings) does not vary: no interval
    assert len(finite) and (finite["low"] <= finite["high"]).all()
    tests = crossed_run.tests
    one = tests[(tests["pair"] == "icl_it") & (tests["centring"] == "raw") & (tests["null"] == "demo_swap")].iloc[0]
    band = nulls[(nulls["view"] == "raw") & (nulls["null"] == "demo_swap") & (nulls["layer"] == one["layer"])]
    assert (band["mean"] - one["null_mean"]).abs().min() < 1e-12  # the band sits at the null's mean

    forest = forest_rows(crossed_run)
    assert set(forest["block"]) == {"raw", "centred", "update"}
    assert set(forest.loc[forest["role"] == "control", "pair"]) == {"ceiling_it", "update_ceiling_it"}
    assert forest.loc[forest["role"] == "test", "margin"].notna().any()  # the ceiling rule gives margins
    assert len(forest) == 2 * 16  # per cell, the last layer's test and control rows of raw/anchor/update

    section = headline_section(crossed_run)
    assert section["forest"] and section["more"] == 0
    summary = section["summary"]
    assert [r[1]["value"] for r in summary["rows"]] == ["ICL–IT, raw", "ICL–IT, anchor-centred", "update"] * 2
    assert summary["head"][2:] == [
        "vs query-swap null",
        "vs demo-swap null",
        "positive control vs query-swap null",
        "positive control vs demo-swap null",
    ]
    verdict = summary["rows"][0][3]
    assert verdict["kind"] == "verdict" and "p Holm" in verdict["detail"]
    html = render_report(crossed_run)
    assert html.index("figure-main") < html.index("figure-forest") < html.index("Verdicts at the last layer")
    assert html.index("Verdicts at the last layer") < html.index("Factor: k") < html.index("<h2 id=nulls>")
    assert _over_three_digits(html) == []
    # p as "< 0.001": the effects' permutation p of k (1/10001)
    effects = html[html.index("permutation p</th>") :]
    assert "&lt; 0.001" in effects[: effects.index("</table>")]


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
                outputs.append(
                    {
                        **labels,
                        "cell_key": key,
                        "seed": seed,
                        "resample": r,
                        "trial_key": trial,
                        "score_icl": float(r % 2),
                        "score_it": 1.0,
                        "score_name": "accuracy",
                        "demo_similarity": None,
                        "n_wrong": 0,
                    }
                )
                for layer in range(3):
                    for pair in ("anchor_icl", "anchor_it", "icl_it"):
                        frame.append(
                            {
                                **labels,
                                "cell_key": key,
                                "seed": seed,
                                "resample": r,
                                "trial_key": trial,
                                "layer": layer,
                                "pair": pair,
                                "cosine": 0.5 + 0.1 * labels["k"] + 0.01 * layer,
                            }
                        )
            for layer in range(3):
                for pair in ("cka_icl_it", "cka_anchor_it"):
                    cka.append(
                        {
                            "cell_key": key,
                            "seed": seed,
                            "layer": layer,
                            "pair": pair,
                            "value": 0.1 * labels["k"] + 0.01 * seed + 0.001 * layer + (pair == "cka_anchor_it"),
                        }
                    )
    plan = {
        "factors": {"k": [1, 2], "wrong_labels": [0.0, 1.0]},
        "base": {"task": "sentiment", "k": 2, "wrong_labels": 0.0},
        "design": design,
        "seeds": [0, 1],
        "resamples": 3,
        "n_trials": len(outputs),
    }
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
    cka = pd.DataFrame(
        [
            {
                "cell_key": c,
                "seed": s,
                "layer": layer,
                "pair": "cka_icl_it",
                "value": 0.25 + 0.5 * (layer == layers[-1]),
            }
            for c, s in cells.itertuples(index=False)
            for layer in layers
        ]
    )
    text = render_report(dataclasses.replace(run, latest=latest, cka=cka))
    assert "&lt;b&gt;not bold&lt;/b&gt; &amp; co" in text and "<b>not bold</b>" not in text
    for needle in (
        "Baselines by k",
        "Baselines by wrong_labels",
        "linear CKA ICL vs IT across a cell&#39;s queries (last layer)",
        "0.750 <span class=ci>[0.750, 0.750]</span>",
    ):
        assert needle in text, needle
    assert text.count("<img ") == 4  # CKA has no per-layer figure: tables only
    empty = render_report(dataclasses.replace(run, cka=run.cka.iloc[:0]))
    assert "linear CKA" not in empty and "Baselines by" not in empty


def test_headline_figures_draw_what_a_run_can_lack() -> None:
    """Hand-built tables: a view with no null, an observed value with no CI, a row with no
    excess (blocks that do not vary), no margin; the figures still draw and pass the checks."""
    import pandas as pd

    from iclit.report.headline import forest_figure, overview_figure

    layers = range(5)
    curves = pd.DataFrame(
        [
            {
                "row": 0,
                "view": "raw",
                "pair": p,
                "layer": layer,
                "mean": 1 - 0.01 * layer * (i + 1),
                "ci_low": np.nan,
                "ci_high": np.nan,
            }
            for i, p in enumerate(("anchor_icl", "anchor_it", "icl_it"))
            for layer in layers
        ]
    )
    nulls = pd.DataFrame(
        [
            {"row": 0, "view": "raw", "null": "query_swap", "layer": layer, "mean": 0.9, "low": 0.85, "high": 0.95}
            for layer in layers
        ]
    )
    png = overview_figure(curves, nulls, ["all trials"], "toy")
    assert figure_problems(f"<img id=figure-main alt='' src='data:image/png;base64,{png}'>") == []
    nan = float("nan")
    forest = pd.DataFrame(
        [
            {
                "block": "raw",
                "label": "ICL–IT",
                "pair": "icl_it",
                "role": "test",
                "null": "query_swap",
                "diff": 0.02,
                "ci_low": -0.01,
                "ci_high": 0.05,
                "margin": 0.03,
                "verdict": "inconclusive",
            },
            {
                "block": "raw",
                "label": "ICL–IT",
                "pair": "icl_it",
                "role": "test",
                "null": "demo_swap",
                "diff": nan,
                "ci_low": nan,
                "ci_high": nan,
                "margin": nan,
                "verdict": "undefined",
            },
            {
                "block": "update",
                "label": "update IT–IT′ (control)",
                "pair": "update_ceiling_it",
                "role": "control",
                "null": "demo_swap",
                "diff": 0.4,
                "ci_low": nan,
                "ci_high": nan,
                "margin": nan,
                "verdict": "undefined",
            },
        ]
    )
    png = forest_figure(forest, "toy forest")
    shown = f"<img id=figure-forest alt='' src='data:image/png;base64,{png}'>"
    assert figure_problems(shown, "figure-forest", coloured=0.0002) == []  # three marks: few coloured pixels
