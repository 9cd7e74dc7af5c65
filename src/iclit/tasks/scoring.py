"""How a task's answers are scored: exact label match, exact match of short generations, chrF.

A trial's score is computed when it runs and stored with its outputs; the scoring rule
belongs to the task (``Task.kind`` and ``Task.metric``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from iclit.tasks.base import Task

__all__ = ["score", "chrf", "corpus_chrf"]


@lru_cache(maxsize=1)
def _chrf_metric() -> Any:
    from sacrebleu.metrics import CHRF  # imported lazily: only translation tasks need it

    return CHRF()


def chrf(hypothesis: str, reference: str) -> float:
    """Sentence-level chrF (sacrebleu ``CHRF()`` defaults), 0..100."""
    return float(_chrf_metric().sentence_score(hypothesis, [reference]).score)


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level chrF over paired hypotheses and references, 0..100."""
    if len(hypotheses) != len(references):
        raise ValueError(f"corpus_chrf: lengths differ ({len(hypotheses)} vs {len(references)})")
    return float(_chrf_metric().corpus_score(list(hypotheses), [list(references)]).score)


def score(task: Task, preds: Sequence[str], golds: Sequence[str]) -> list[float]:
    """Per-trial score: exact label match (classification), else by ``task.metric``: exact
    match after whitespace normalisation (``"exact"``, 0/1) or sentence chrF (``"chrf"``)."""
    if task.kind == "classification":
        return [float(p == g) for p, g in zip(preds, golds, strict=True)]
    if task.metric == "exact":
        return [float(" ".join(p.split()) == " ".join(g.split())) for p, g in zip(preds, golds, strict=True)]
    return [chrf(p, g) for p, g in zip(preds, golds, strict=True)]
