"""Output-level metrics: accuracy, agreement between arms, chrF, label distributions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar, cast

import numpy as np

from iclit.tasks.scoring import chrf, corpus_chrf  # noqa: F401 - part of this module's API

T = TypeVar("T")


def _fraction_equal(a: Sequence[Any], b: Sequence[Any], what: str) -> float:
    if len(a) != len(b):
        raise ValueError(f"{what}: lengths differ ({len(a)} vs {len(b)})")
    if len(a) == 0:
        return float("nan")
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def accuracy(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    """Fraction of predictions equal (``==``) to their reference; NaN when empty."""
    return _fraction_equal(predictions, references, "accuracy")


def agreement(pred_a: Sequence[Any], pred_b: Sequence[Any]) -> float:
    """Fraction of items on which two arms predict the same output; NaN when empty."""
    return _fraction_equal(pred_a, pred_b, "agreement")


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def label_probabilities(label_logits: T) -> T:
    """Softmax over the label set (last axis), numerically stable.

    label_logits: ``[..., n_labels]`` numpy array or torch tensor (the logits of each
    verbalizer label's first token). Returns the same kind: float64 numpy array, or a
    float32 (at least) torch tensor.
    """
    if _is_torch(label_logits):
        x: Any = label_logits  # a torch tensor
        if not x.is_floating_point() or x.dtype.itemsize < 4:  # ints, bf16, fp16 -> fp32
            x = x.float()
        return cast(T, x.softmax(-1))
    z = np.asarray(label_logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return cast(T, e / e.sum(axis=-1, keepdims=True))  # the same kind: a numpy array


def kl_divergence(p: Any, q: Any, *, eps: float = 1e-12) -> np.ndarray | float:
    """KL(p || q) in nats between distributions over the labels (last axis).

    p, q: ``[..., n_labels]`` (numpy or CPU torch; rows are renormalised). Terms with
    ``p == 0`` contribute 0; ``q`` is floored at ``eps`` so a zero there gives a large
    finite value instead of inf. Returns ``[...]`` (a float for 1-D inputs).
    """
    p = _to_numpy(p)
    q = _to_numpy(q)
    p = p / p.sum(axis=-1, keepdims=True)
    q = np.maximum(q / q.sum(axis=-1, keepdims=True), eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(q)), 0.0)
    kl = terms.sum(axis=-1)
    return float(kl) if kl.ndim == 0 else kl


def _to_numpy(x: Any) -> np.ndarray:
    if _is_torch(x):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)
