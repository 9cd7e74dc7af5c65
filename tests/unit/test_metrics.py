"""Unit tests for iclit.analysis and iclit.report.plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from iclit.analysis import (
    PAIRS,
    SUMMARY_COLUMNS,
    accuracy,
    agreement,
    bootstrap_ci,
    centered_cosine_per_layer,
    chrf,
    cka_per_layer,
    cohens_d,
    corpus_chrf,
    cosine_per_layer,
    kl_divergence,
    label_probabilities,
    linear_cka,
    paired_bootstrap_diff,
    pairwise_cosines,
    permutation_test,
    summarize,
    summarize_layers,
    update_cosine_per_layer,
)
from iclit.report import plot_layers

# ---------------------------------------------------------------- similarity


def test_cosine_matches_torch() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, 16, generator=g), torch.randn(5, 4, 16, generator=g)
    got = cosine_per_layer(a, b)
    assert got.shape == (5, 4) and got.dtype == torch.float64
    torch.testing.assert_close(got, F.cosine_similarity(a.double(), b.double(), dim=-1))
    # [L, d] input -> [L]
    assert cosine_per_layer(a[0], b[0]).shape == (4,)
    # bf16 input is upcast, not computed in bf16
    got_bf16 = cosine_per_layer(a.bfloat16(), b.bfloat16())
    want = F.cosine_similarity(a.bfloat16().double(), b.bfloat16().double(), dim=-1)
    torch.testing.assert_close(got_bf16, want)


def test_cosine_known_values_and_zero() -> None:
    v = torch.tensor([[1.0, 2.0, 3.0]])
    assert cosine_per_layer(v, v).item() == pytest.approx(1.0)
    assert cosine_per_layer(v, -v).item() == pytest.approx(-1.0)
    e = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    assert cosine_per_layer(*e).item() == pytest.approx(0.0)
    z = cosine_per_layer(torch.zeros(1, 3), v)
    assert torch.isfinite(z).all() and z.item() == 0.0


def test_centered_cosine_removes_shared_offset() -> None:
    d = 64
    offset = torch.zeros(d)
    offset[0] = 1000.0  # a "rogue" dimension shared by every state
    u, w = torch.zeros(d), torch.zeros(d)
    u[1], w[2] = 1.0, 1.0  # orthogonal content
    a = (offset + u)[None, None]  # [1, 1, d]
    b = (offset + w)[None, None]
    assert cosine_per_layer(a, b).item() > 0.999
    mean = offset[None]  # [L=1, d]
    assert centered_cosine_per_layer(a, b, mean).item() == pytest.approx(0.0, abs=1e-9)


def test_update_cosine() -> None:
    g = torch.Generator().manual_seed(1)
    anchor = torch.randn(3, 2, 8, generator=g)
    delta = torch.randn(3, 2, 8, generator=g)
    same = update_cosine_per_layer(anchor, anchor + delta, anchor + 2 * delta)
    torch.testing.assert_close(same, torch.ones(3, 2, dtype=torch.float64))
    opp = update_cosine_per_layer(anchor, anchor + delta, anchor - delta)
    torch.testing.assert_close(opp, -torch.ones(3, 2, dtype=torch.float64))
    # no update in one arm -> 0, not NaN
    none = update_cosine_per_layer(anchor, anchor, anchor + delta)
    assert torch.equal(none, torch.zeros(3, 2, dtype=torch.float64))


def test_cka_invariances() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 10, generator=g)
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x @ q) == pytest.approx(1.0)
    assert linear_cka(x, 3.5 * x) == pytest.approx(1.0)
    assert linear_cka(x, x + 7.0) == pytest.approx(1.0)  # centring
    y = torch.randn(50, 10, generator=g)
    assert linear_cka(x, y) < 0.4
    # both computation paths (n <= d: Gram; n > d: features) agree
    wide = torch.randn(8, 30, generator=g)
    wide2 = torch.randn(8, 30, generator=g)
    assert linear_cka(wide, wide @ torch.linalg.qr(torch.randn(30, 30, generator=g))[0]) == pytest.approx(1.0)
    assert 0.0 <= linear_cka(wide, wide2) <= 1.0


def test_cka_gram_and_feature_forms_agree() -> None:
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(20, 6, generator=g), torch.randn(20, 5, generator=g)  # feature form
    from iclit.analysis.similarity import _cka_batched

    k = (x - x.mean(0)) @ (x - x.mean(0)).T
    m = (y - y.mean(0)) @ (y - y.mean(0)).T
    gram = float((k * m).sum() / (k.norm() * m.norm()))
    assert float(_cka_batched(x[None], y[None])[0]) == pytest.approx(gram, rel=1e-5)


def test_cka_per_layer() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, 12, generator=g)
    y = torch.randn(40, 3, 12, generator=g)
    y[:, 1] = 2.0 * x[:, 1]
    out = cka_per_layer(x, y)
    assert out.shape == (3,)
    assert out[1].item() == pytest.approx(1.0)
    assert out[0].item() == pytest.approx(linear_cka(x[:, 0], y[:, 0]))
    assert math.isnan(linear_cka(torch.ones(5, 3), x[:5, 0]))


def test_pairwise_cosines() -> None:
    g = torch.Generator().manual_seed(4)
    states = {arm: torch.randn(6, 5, 16, generator=g) for arm in ("anchor", "icl", "it")}
    out = pairwise_cosines(states)
    assert tuple(out) == PAIRS
    for pair, (left, right) in zip(PAIRS, [("anchor", "icl"), ("anchor", "it"), ("icl", "it")], strict=True):
        assert out[pair].shape == (6, 5)
        torch.testing.assert_close(out[pair], cosine_per_layer(states[left], states[right]))
    with pytest.raises(KeyError):
        pairwise_cosines({"anchor": states["anchor"]})


# ---------------------------------------------------------------- outputs


def test_accuracy_and_agreement() -> None:
    assert accuracy(["a", "b", "c", "d"], ["a", "b", "x", "d"]) == 0.75
    assert agreement([1, 0, 1], [1, 1, 1]) == pytest.approx(2 / 3)
    assert math.isnan(accuracy([], []))
    with pytest.raises(ValueError):
        accuracy(["a"], ["a", "b"])


def test_chrf() -> None:
    s = "The cat sits on the mat."
    assert chrf(s, s) == pytest.approx(100.0)
    lower = chrf("A dog runs in the park.", s)
    assert 0.0 <= lower < 50.0
    assert chrf("The cat sat on the mat.", s) > lower
    assert corpus_chrf([s, s], [s, s]) == pytest.approx(100.0)


def test_label_probabilities_and_kl() -> None:
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    p = label_probabilities(logits)
    assert isinstance(p, np.ndarray)
    np.testing.assert_allclose(p.sum(-1), 1.0)
    np.testing.assert_allclose(p[1], 1 / 3)
    pt = label_probabilities(torch.tensor(logits, dtype=torch.bfloat16))
    assert isinstance(pt, torch.Tensor) and pt.dtype == torch.float32
    np.testing.assert_allclose(pt.numpy(), p, atol=1e-2)
    assert np.all(label_probabilities(np.array([1000.0, 0.0])) >= 0)  # stable
    np.testing.assert_allclose(kl_divergence(p, p), 0.0, atol=1e-12)
    # zeros in p contribute nothing; zeros in q give large but finite values
    assert kl_divergence([1.0, 0.0], [0.5, 0.5]) == pytest.approx(math.log(2))
    big = kl_divergence([0.5, 0.5], [1.0, 0.0])
    assert math.isfinite(big) and big > 5
    rows = kl_divergence(p, np.full_like(p, 1 / 3))
    assert rows.shape == (2,) and rows[0] > 0 and rows[1] == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- stats


def test_bootstrap_ci() -> None:
    rng = np.random.default_rng(0)
    small = rng.normal(1.0, 1.0, 20)
    big = rng.normal(1.0, 1.0, 2000)
    lo, hi = bootstrap_ci(small)
    assert lo < small.mean() < hi
    blo, bhi = bootstrap_ci(big)
    assert blo < big.mean() < bhi
    assert (bhi - blo) < (hi - lo)
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)
    assert bootstrap_ci(small, seed=3) != bootstrap_ci(small, seed=4)
    assert bootstrap_ci([2.5]) == (2.5, 2.5)
    with_nan = np.concatenate([small, [np.nan, np.nan]])
    assert bootstrap_ci(with_nan) == bootstrap_ci(small)
    assert all(math.isnan(v) for v in bootstrap_ci([np.nan]))


def test_summarize() -> None:
    s = summarize([1.0, 2.0, 3.0, np.nan])
    assert s["n"] == 3 and s["mean"] == pytest.approx(2.0) and s["std"] == pytest.approx(1.0)
    assert s["ci_low"] <= 2.0 <= s["ci_high"]
    one = summarize([4.0])
    assert one["std"] == 0.0 and one["ci_low"] == one["ci_high"] == 4.0


def test_summarize_layers() -> None:
    rng = np.random.default_rng(1)
    per = {p: rng.random((10, 4)) for p in PAIRS}
    per["icl_it"] = torch.tensor(per["icl_it"])  # tensors accepted too
    df = summarize_layers(per, n_boot=200)
    assert list(df.columns) == list(SUMMARY_COLUMNS)
    assert len(df) == 3 * 4
    assert list(df["pair"].unique()) == list(PAIRS)
    assert list(df[df["pair"] == "anchor_it"]["layer"]) == [0, 1, 2, 3]
    row = df[(df["pair"] == "anchor_icl") & (df["layer"] == 2)].iloc[0]
    assert row["mean"] == pytest.approx(per["anchor_icl"][:, 2].mean())
    assert row["n"] == 10 and row["ci_low"] <= row["mean"] <= row["ci_high"]


def test_paired_diff_and_permutation() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(0.0, 1.0, 40)
    shifted = a + 0.5 + rng.normal(0.0, 0.1, 40)
    noise = a + rng.normal(0.0, 0.1, 40)

    d = paired_bootstrap_diff(shifted, a)
    assert d["n"] == 40 and d["ci_low"] < d["mean_diff"] < d["ci_high"]
    assert d["ci_low"] > 0.3 and d["cohens_d"] > 2

    assert permutation_test(shifted, a, n_perm=2000) < 0.01
    assert permutation_test(noise, a, n_perm=2000) > 0.05
    assert permutation_test(a, a, n_perm=500) == 1.0
    # unpaired: clear shift vs none
    b = rng.normal(2.0, 1.0, 30)
    c = rng.normal(0.0, 1.0, 30)
    assert permutation_test(b, c, paired=False, n_perm=2000) < 0.01
    assert permutation_test(c, rng.normal(0.0, 1.0, 30), paired=False, n_perm=2000) > 0.05
    # deterministic; never exactly 0
    p1 = permutation_test(noise, a, n_perm=1000, seed=7)
    assert p1 == permutation_test(noise, a, n_perm=1000, seed=7)
    assert permutation_test(shifted, a, n_perm=100) >= 1 / 101


def test_cohens_d() -> None:
    assert cohens_d([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]) == pytest.approx(2.0)
    assert cohens_d([1.0, 2.0, 3.0]) == pytest.approx(2.0)
    assert math.isnan(cohens_d([1.0]))
    assert cohens_d([1.0, 1.0], [0.0, 0.0]) == math.inf
    assert cohens_d([1.0, np.nan, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]) == pytest.approx(2.0)


# ---------------------------------------------------------------- plots


def _synthetic_summary(offset: float = 0.0) -> pd.DataFrame:
    rows = []
    for i, pair in enumerate(PAIRS):
        for layer in range(7):
            m = 0.9 - 0.05 * layer * (i + 1) + offset
            rows.append(
                {"pair": pair, "layer": layer, "mean": m, "std": 0.05, "ci_low": m - 0.03, "ci_high": m + 0.03, "n": 16}
            )
    return pd.DataFrame(rows)


def test_plot_layers_writes_png(tmp_path: Path) -> None:
    out = plot_layers(
        _synthetic_summary(), tmp_path / "figs" / "layers.png", title="synthetic", baseline=_synthetic_summary(-0.4)
    )
    assert out == tmp_path / "figs" / "layers.png"
    data = out.read_bytes()
    assert len(data) > 1000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # without baseline, str path
    out2 = plot_layers(_synthetic_summary(), str(tmp_path / "plain.png"))
    assert out2.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
