"""The smoke experiment (configs/examples/smoke.yaml) on the real default model, end to end:
run, resume (nothing recomputed), tidy results, HTML report. About two minutes on a laptop CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from iclit.analysis import load_run
from iclit.experiments import load_spec, make_plan, run_experiment
from iclit.report import write_report
from iclit.rundir import Store

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "examples" / "smoke.yaml"

pytestmark = pytest.mark.integration


def test_smoke_experiment_on_gemma(tmp_path: Path) -> None:
    spec = load_spec(SMOKE)
    plan = make_plan(spec)
    summary = run_experiment(spec, tmp_path)
    assert summary.computed == plan.n_trials == 9
    again = run_experiment(spec, tmp_path)
    assert (again.already_done, again.computed) == (9, 0)
    with Store(tmp_path) as store:
        assert store.integrity() == "ok"
        outputs = store.outputs()
    frame = load_run(tmp_path).frame
    assert frame["trial_key"].nunique() == 9
    assert frame["layer"].max() == 18  # Gemma-3-270M: 18 layers + embeddings
    assert outputs["demo_similarity"].notna().all()
    assert outputs["it_final_loss"].max() < 1.0  # IT fits the demonstrations
    html = write_report(tmp_path).read_text()
    assert html.count("<img ") == 4 and "Factor: k" in html and "Factor: similarity" in html
