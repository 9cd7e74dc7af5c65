"""FLOP counting from shapes (:mod:`iclit.engine.flops`) against torch's own FLOP counter on
the tiny LLaMA (eager attention: every product is a counted matmul)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from iclit.engine import flops
from iclit.engine.flops import PassWork, attended_pairs, forward_flops, matmul_params, matmul_rate, training_flops
from iclit.models.tiny import build_tiny_llama


def _model():
    model = build_tiny_llama(600)
    model.config._attn_implementation = "eager"
    return model


def test_matmul_params_by_hand():
    body, head = matmul_params(_model())
    d, ff, kv = 64, 128, 2 * 16  # hidden, feed-forward, key/value width (2 heads of 16)
    assert body == 3 * (d * d + 2 * d * kv + d * d + 3 * d * ff)
    assert head == 600 * d


def test_attended_pairs():
    assert attended_pairs([3]) == 6 and attended_pairs([2, 1], prefix=4) == (8 + 3) + (4 + 1)


def test_forward_matches_torch_counter():
    model, s = _model(), 17
    ids = torch.randint(3, 600, (1, s))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    # the counter sees the full (non-causal) s x s products and the head at every position
    assert forward_flops(model, PassWork(tokens=s, attended=s * s, head_rows=s)) == counter.get_total_flops()


def test_full_training_matches_torch_counter():
    model, s = _model(), 11
    model.requires_grad_(True)
    ids = torch.randint(3, 600, (1, s))
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).loss.backward()
    expected = training_flops(model, PassWork(tokens=s, attended=s * s, head_rows=s), frozen=False)
    assert expected == counter.get_total_flops()
    frozen = training_flops(model, PassWork(tokens=s, attended=s * s, head_rows=s))
    linear = forward_flops(model, PassWork(tokens=s, attended=0, head_rows=s))
    assert expected - frozen == linear  # frozen weights: no weight gradients


def test_matmul_rate_counts_two_n_cubed_flops_a_product(monkeypatch):
    """20 timed products of n×n matrices: 2·n³·20 FLOPs over the time between the two clock reads."""
    clock = iter([10.0, 12.5])
    monkeypatch.setattr(flops.time, "perf_counter", lambda: next(clock))
    assert matmul_rate("cpu", torch.float32, n=32) == 2 * 32**3 * 20 / 2.5
    monkeypatch.undo()
    assert 0 < matmul_rate(n=64) < float("inf")
