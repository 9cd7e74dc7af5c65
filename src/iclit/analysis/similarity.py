"""Hidden-state similarity between arms, per layer.

Shapes: ``n`` resamples, ``L`` layers (``n_layers + 1``; index 0 is the embeddings),
``d`` hidden size. Every function computes in float64 whatever the input dtype
(bf16 / fp16 / fp32), because cosines of large-norm LM states lose digits in low
precision, and returns float64 results.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS: float = 1e-12

PAIRS: tuple[str, str, str] = ("anchor_icl", "anchor_it", "icl_it")
"""Arm pairs compared by :func:`pairwise_cosines`, named ``<arm>_<arm>``."""

BASELINES: tuple[str, ...] = ("centered", "shuffled", "update", "noise_ceiling", "cka", "query_mean")
"""What :func:`baseline_cosines` can add beside the three pairs (the spec's ``baselines``)."""

BASELINE_PAIRS: dict[str, tuple[str, ...]] = {
    "centered": (
        "anchor_icl_centered",
        "anchor_it_centered",
        "icl_it_centered",
        "anchor_icl_centered_ref",
        "anchor_it_centered_ref",
        "icl_it_centered_ref",
    ),
    "shuffled": ("icl_it_shuffled",),
    "update": ("update_cosine",),
    "noise_ceiling": ("it_it_seed", "icl_icl_order"),
    "cka": (),  # across queries, not per trial: see iclit.analysis.frames (per cell)
    "query_mean": ("anchor_icl_qmean", "anchor_it_qmean", "icl_it_qmean"),
}
"""The extra "pairs" each baseline stores per trial × layer, like the three of :data:`PAIRS`:

* ``*_centered``: the cosine after subtracting the per-layer mean of the anchor states of
  the trials compared (a cell's, in :mod:`iclit.analysis.frames`): the component every
  state at the end of this task's template shares (anisotropy-corrected); ``*_centered_ref``:
  after subtracting the base model's mean over a reference set of unrelated prompts instead
  (the named alternative);
* ``icl_it_shuffled``: ICL of trial i against IT of trial (i + 1) mod n of the trials given
  (:mod:`iclit.analysis.frames` gives all trials of a cell and seed, in resample order): the
  similarity of mismatched queries, a null;
* ``update_cosine``: cos(h_ICL − h_anchor, h_IT − h_anchor), whether ICL and IT move the
  query's state in the same direction (the residual-stream version of SimAOU);
* ``it_it_seed``: IT against IT tuned with another seed (arm ``it_seed2``), the noise ceiling;
  ``icl_icl_order``: ICL against ICL with the demonstrations reordered (arm
  ``icl_reordered``), the ICL arm's ceiling (runs from before that arm lack it);
* ``*_qmean``: the three pairs at another position than the last token: each arm's states
  averaged over the query's tokens (the query block that ends every arm's prompt).

``cka`` adds no per-trial pair: linear CKA between two arms' states is across queries, so
:func:`iclit.analysis.frames.state_tables` computes it per layer over all the queries of a
cell (``iclit results RUN --metric cka``).
"""


def _f64(x: Tensor) -> Tensor:
    return torch.as_tensor(x).to(torch.float64)


def cosine_per_layer(a: Tensor, b: Tensor, *, eps: float = EPS) -> Tensor:
    """Cosine similarity along the last (hidden) dimension.

    a, b: ``[n, L, d]`` or ``[L, d]`` (any leading shape, broadcastable).
    Returns ``[n, L]`` or ``[L]`` in float64. Each norm is clamped to ``eps`` so a
    zero vector gives cosine 0 instead of NaN (same convention as
    ``torch.nn.functional.cosine_similarity``).
    """
    a, b = _f64(a), _f64(b)
    dot = (a * b).sum(-1)
    na = a.norm(dim=-1).clamp_min(eps)
    nb = b.norm(dim=-1).clamp_min(eps)
    return dot / (na * nb)


def centered_cosine_per_layer(a: Tensor, b: Tensor, mean: Tensor, *, eps: float = EPS) -> Tensor:
    """Anisotropy-corrected cosine: subtract a per-layer mean vector from both first.

    a, b: ``[n, L, d]`` or ``[L, d]``; mean: ``[L, d]``, the mean hidden state of a
    reference set of unrelated prompts at each layer. Returns ``[n, L]`` or ``[L]``.
    """
    m = _f64(mean)
    return cosine_per_layer(_f64(a) - m, _f64(b) - m, eps=eps)


def update_cosine_per_layer(anchor: Tensor, icl: Tensor, it: Tensor, *, eps: float = EPS) -> Tensor:
    """Cosine between the updates ``icl - anchor`` and ``it - anchor``, per layer.

    Measures whether demonstrations in context and tuning on them move the query's
    state in the same direction. anchor, icl, it: ``[n, L, d]`` or ``[L, d]``.
    Returns ``[n, L]`` or ``[L]``; a zero update gives 0.
    """
    a = _f64(anchor)
    return cosine_per_layer(_f64(icl) - a, _f64(it) - a, eps=eps)


def _cka_batched(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA for a batch of representation pairs: x ``[B, n, dx]``, y ``[B, n, dy]`` -> ``[B]``."""
    x = _f64(x)
    y = _f64(y)
    x = x - x.mean(dim=-2, keepdim=True)
    y = y - y.mean(dim=-2, keepdim=True)
    n, dx, dy = x.shape[-2], x.shape[-1], y.shape[-1]
    if n <= max(dx, dy):
        # Gram form: <K, M>_F / (|K|_F |M|_F) with K = X X^T, M = Y Y^T  ([B, n, n])
        k = x @ x.transpose(-1, -2)
        m = y @ y.transpose(-1, -2)
        hsic = (k * m).sum((-1, -2))
        nx = k.norm(dim=(-1, -2))
        ny = m.norm(dim=(-1, -2))
    else:
        # feature form: |Y^T X|_F^2 / (|X^T X|_F |Y^T Y|_F)
        hsic = (y.transpose(-1, -2) @ x).pow(2).sum((-1, -2))
        nx = (x.transpose(-1, -2) @ x).norm(dim=(-1, -2))
        ny = (y.transpose(-1, -2) @ y).norm(dim=(-1, -2))
    denom = nx * ny
    # constant representations have no variance: CKA is undefined -> NaN
    return torch.where(denom > 0, hsic / denom.clamp_min(torch.finfo(torch.float64).tiny), torch.nan)


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) between two representations of the same n inputs.

    x: ``[n, dx]``, y: ``[n, dy]`` (rows paired). Features are centred over n.
    1.0 for representations equal up to an orthogonal transform and isotropic
    scaling; NaN if either has zero variance.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected [n, dx] and [n, dy], got {tuple(x.shape)} and {tuple(y.shape)}")
    return float(_cka_batched(x[None], y[None])[0])


def cka_per_layer(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA at each layer across the n resamples: x, y ``[n, L, d]`` -> ``[L]`` (float64)."""
    if x.ndim != 3 or y.ndim != 3 or x.shape[:2] != y.shape[:2]:
        raise ValueError(f"expected [n, L, d] twice, got {tuple(x.shape)} and {tuple(y.shape)}")
    return _cka_batched(x.transpose(0, 1), y.transpose(0, 1))


def pairwise_cosines(states: dict[str, Tensor], *, eps: float = EPS) -> dict[str, Tensor]:
    """Per-layer cosines of the three arm pairs.

    states: ``{"anchor": [n, L, d], "icl": [n, L, d], "it": [n, L, d]}``.
    Returns ``{"anchor_icl": [n, L], "anchor_it": [n, L], "icl_it": [n, L]}`` (keys as in
    :data:`PAIRS`).
    """
    missing = {"anchor", "icl", "it"} - states.keys()
    if missing:
        raise KeyError(f"states lacks arms: {sorted(missing)}")
    out: dict[str, Tensor] = {}
    for pair in PAIRS:
        left, right = pair.split("_")
        out[pair] = cosine_per_layer(states[left], states[right], eps=eps)
    return out


def shuffled_partner(n: int) -> list[int]:
    """The IT row paired with ICL row i by the shuffled-pair null: (i + 1) mod n."""
    return [(i + 1) % n for i in range(n)]


def baseline_cosines(
    states: dict[str, Tensor],
    baselines: tuple[str, ...] | list[str],
    *,
    reference_mean: Tensor | None = None,
    pooled: dict[str, Tensor] | None = None,
    eps: float = EPS,
) -> dict[str, Tensor]:
    """The extra per-trial, per-layer similarities of :data:`BASELINE_PAIRS`, ``{name: [n, L]}``.

    states: ``{"anchor", "icl", "it"[, "it_seed2", "icl_reordered"]: [n, L, d]}``;
    ``centered`` subtracts the mean of the n anchor states, and the reference_mean ``[L, d]``
    where given (``*_centered_ref``). ``shuffled`` needs n >= 2 and is left out otherwise;
    ``noise_ceiling`` needs the ``it_seed2`` states; ``query_mean`` needs ``pooled``, the
    arms' states averaged over the query's tokens (same keys and shapes as ``states``).
    """
    unknown = [b for b in baselines if b not in BASELINE_PAIRS]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; known: {list(BASELINE_PAIRS)}")
    out: dict[str, Tensor] = {}
    if "centered" in baselines:
        anchor_mean = _f64(states["anchor"]).mean(dim=0)
        for pair in PAIRS:
            left, right = pair.split("_")
            out[f"{pair}_centered"] = centered_cosine_per_layer(states[left], states[right], anchor_mean, eps=eps)
        if reference_mean is not None:
            for pair in PAIRS:
                left, right = pair.split("_")
                out[f"{pair}_centered_ref"] = centered_cosine_per_layer(
                    states[left], states[right], reference_mean, eps=eps
                )
    if "shuffled" in baselines:
        n = states["icl"].shape[0]
        if n >= 2:
            out["icl_it_shuffled"] = cosine_per_layer(states["icl"], states["it"][shuffled_partner(n)], eps=eps)
    if "update" in baselines:
        out["update_cosine"] = update_cosine_per_layer(states["anchor"], states["icl"], states["it"], eps=eps)
    if "noise_ceiling" in baselines:
        if "it_seed2" not in states:
            raise KeyError("the noise_ceiling baseline needs the it_seed2 arm's states")
        out["it_it_seed"] = cosine_per_layer(states["it"], states["it_seed2"], eps=eps)
        if "icl_reordered" in states:
            out["icl_icl_order"] = cosine_per_layer(states["icl"], states["icl_reordered"], eps=eps)
    if "query_mean" in baselines:
        if pooled is None:
            raise ValueError("the query_mean baseline needs the states averaged over the query (pooled)")
        out.update({f"{pair}_qmean": c for pair, c in pairwise_cosines(pooled, eps=eps).items()})
    return out


def step_pair(pair: str, step: int) -> str:
    """Name of a pair measured after tuning step ``step`` (the dose curve): ``icl_it_step4``."""
    return f"{pair}_step{step}"


def dose_cosines(states: dict[str, Tensor], it_by_step: dict[int, Tensor], *, eps: float = EPS) -> dict[str, Tensor]:
    """ICL–IT and anchor–IT cosines of the IT states read after each captured tuning step.

    states: ``{"anchor", "icl": [n, L, d]}``; it_by_step: ``{step: [n, L, d]}``.
    Returns ``{step_pair("icl_it", s), step_pair("anchor_it", s): [n, L]}`` for every step.
    """
    out: dict[str, Tensor] = {}
    for step, it in sorted(it_by_step.items()):
        out[step_pair("icl_it", step)] = cosine_per_layer(states["icl"], it, eps=eps)
        out[step_pair("anchor_it", step)] = cosine_per_layer(states["anchor"], it, eps=eps)
    return out
