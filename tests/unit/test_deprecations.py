"""iclit's own calls raise no deprecation warning: a whole engine pass (every arm, every
baseline, the dose steps, LoRA and full fine-tuning, prefix-cached ICL, generation) on the
tiny model, with every warning and every transformers log line recorded."""

from __future__ import annotations

import logging
import warnings

import pytest

from iclit.engine.evaluate import evaluate
from iclit.tasks import draw_resamples, get_task
from iclit.tuning import TuningRecipe

BASELINES = ("centered", "shuffled", "update", "noise_ceiling", "query_mean")


def _deprecations(caught: list[warnings.WarningMessage], records: list[logging.LogRecord]) -> list[str]:
    found = [
        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
        for w in caught
        if issubclass(w.category, (FutureWarning, DeprecationWarning, PendingDeprecationWarning))
    ]
    found += [f"log {r.name}: {r.getMessage()}" for r in records if "deprecat" in r.getMessage().lower()]
    return found


@pytest.mark.parametrize(
    ("task", "recipe"),
    [
        ("sentiment", TuningRecipe(epochs=2, capture_steps=(1,))),
        ("sentiment", TuningRecipe(method="full", epochs=1)),
        ("translation-en-cs", TuningRecipe(epochs=1)),
    ],
)
def test_engine_raises_no_deprecation_warning(tiny, task, recipe) -> None:
    t = get_task(task)
    draws = draw_resamples(t, 2, 2, 0)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.WARNING)
    for name in ("transformers", "peft"):
        logging.getLogger(name).addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for fast in (True, False):
                evaluate(tiny, t, draws, recipe=recipe, baselines=BASELINES, max_new_tokens=4, fast=fast)
    finally:
        for name in ("transformers", "peft"):
            logging.getLogger(name).removeHandler(handler)
    assert _deprecations(caught, records) == []
