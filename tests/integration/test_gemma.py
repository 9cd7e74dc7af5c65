"""The real embedded model, Gemma-3-270M (GGUF, dequantised to fp32 and cached under
~/.cache/iclit on first use: about a minute once, seconds afterwards).

Run with ``python -m pytest tests/integration -q``; the whole file takes well under three
minutes on a CPU once the cache is filled.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from iclit.analysis import PAIRS
from iclit.api import Comparison, run_comparison
from iclit.engine.capture import capture
from iclit.models import LoadedModel, ModelNotFoundError, load_model
from iclit.models.loading import resolve
from iclit.tuning import TuningRecipe

pytestmark = pytest.mark.integration

MODEL = "gemma-3-270m"
N_STATES = 19  # 18 blocks + the embeddings
K = 2
RESAMPLES = 2


@pytest.fixture(scope="module", autouse=True)
def _gemma_available():
    try:
        resolve(MODEL)
    except ModelNotFoundError as e:  # the package that ships the weights is not installed
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def run() -> Comparison:
    """One small comparison on the real model (loads it, dequantising on first use)."""
    return run_comparison(MODEL, "sentiment", k=K, resamples=RESAMPLES, seed=0, recipe=TuningRecipe(epochs=4))


@pytest.fixture(scope="module")
def reload(run) -> tuple[LoadedModel, float]:
    """A second load, after ``run`` has filled the cache: (model, seconds)."""
    start = time.perf_counter()
    lm = load_model(MODEL)  # same default device and dtype as the run
    return lm, time.perf_counter() - start


def test_comparison_runs(run):
    assert run.config["model"] == MODEL
    assert run.config["n_layers"] == N_STATES - 1
    # CPU runs in fp32, CUDA in bf16 (load_model's defaults)
    assert run.config["dtype"] == ("float32" if run.config["device"] == "cpu" else "bfloat16")
    assert len(run.trials) == RESAMPLES
    for arm in ("anchor", "icl", "it"):
        assert run.states[arm].shape[:2] == (RESAMPLES, N_STATES)
        assert torch.isfinite(run.states[arm]).all()
    for trial in run.trials:
        for pair in PAIRS:
            assert len(trial[pair]) == N_STATES
            assert all(math.isfinite(c) and -1.0 <= c <= 1.0 + 1e-6 for c in trial[pair])
            assert trial[pair][0] == pytest.approx(1.0, abs=1e-5)  # same last-token embedding
        assert trial["predictions"]["anchor"] in ("negative", "positive")
    assert len(run.summary) == 3 * N_STATES
    assert np.isfinite(run.summary["mean"]).all()


def test_it_tuning_lowers_the_loss(run):
    for trial in run.trials:
        assert len(trial["it_losses"]) == 4
        assert trial["it_final_loss"] < trial["it_losses"][0], trial["it_losses"]


def test_second_load_uses_the_cache(reload, run):
    lm, seconds = reload
    assert lm.n_layers == N_STATES - 1
    assert str(lm.device) == run.config["device"]
    assert str(lm.dtype).replace("torch.", "") == run.config["dtype"]
    assert "iclit" in lm.source  # the safetensors cache, not the GGUF file
    assert seconds < 20, f"second load took {seconds:.1f} s: is the safetensors cache used?"


def test_capture_equals_output_hidden_states(reload, run):
    lm, _ = reload
    prompt = run.trials[0]["icl_prompt"]
    cap = capture(lm.model, lm.tokenizer, [prompt])
    enc = lm.tokenizer(prompt, return_tensors="pt").to(lm.device)
    with torch.no_grad():
        out = lm.model(**enc, output_hidden_states=True, logits_to_keep=1)
    ref = torch.stack([h[0, -1] for h in out.hidden_states]).float()
    assert ref.shape == cap.states[0].shape == (N_STATES, lm.hidden_size)
    cos = torch.nn.functional.cosine_similarity(cap.states[0].double(), ref.double(), dim=-1)
    assert (cos >= 0.99999).all(), cos
    if lm.dtype == torch.float32:
        torch.testing.assert_close(cap.states[0], ref, atol=1e-3, rtol=1e-4)


def test_run_states_are_reproducible_with_the_reloaded_model(reload, run):
    """The anchor states of the run equal a fresh capture of the same prompts."""
    lm, _ = reload
    cap = capture(lm.model, lm.tokenizer, [t["query_prompt"] for t in run.trials])
    cos = torch.nn.functional.cosine_similarity(cap.states.double(), run.states["anchor"].double(), dim=-1)
    assert (cos >= 0.99999).all(), cos
