"""interventions.py: patching and steering at the last prompt token, on every tiny
architecture of the grid (test_architectures' families, including the structural-fallback
``toy``): putting a run's own captured state back is a no-op at every state index, the fast
(prefix-cached, one-token) path equals the reference (full forward per run) path, the last
state index is what the LM head reads, steering along a label's head direction raises that
label, and each row reaches the adapter of its prompt."""

from __future__ import annotations

import math

import pytest
import torch
from test_architectures import FAMILIES, build

from iclit.core.tokens import label_token_ids
from iclit.engine.capture import capture
from iclit.engine.interventions import Intervention, intervene, kl_divergence, layerwise, random_directions
from iclit.models import prepare
from iclit.models.arch import decoder_of, final_norm_of, layers_of, lm_head_logits, n_states, output_head
from iclit.tuning import TuningRecipe, multi_lora

ATOL = 1e-5

PROMPTS = [
    "Review: Fine.\nSentiment:",
    "Hi",
    "",  # BOS alone: no prefix to cache
    # outgrows a 24-token window
    "Classify the sentiment of the review as positive or negative.\n\nReview: It broke after two days.\n"
    "Sentiment: negative\n\nReview: The plot is thin but the actors carry it.\nSentiment:",
    "English: Please open your books on page twelve.\nCzech:",
]


class Grid:
    def __init__(self, lm, labels: torch.Tensor) -> None:
        self.lm, self.model, self.tok, self.labels = lm, lm.model, lm.tokenizer, labels
        self.cap = capture(self.model, self.tok, PROMPTS, label_ids=labels)
        self.L = n_states(self.model) - 1

    def run(self, runs, reference: bool, batch_size: int = 16, prompts=PROMPTS, **kw):
        return intervene(
            self.model,
            self.tok,
            prompts,
            runs,
            label_ids=kw.pop("label_ids", self.labels),
            batch_size=batch_size,
            reference=reference,
            **kw,
        )


@pytest.fixture(scope="module")
def labels(tiny_tokenizer):
    return label_token_ids(tiny_tokenizer, [" negative", " positive"])


@pytest.fixture(scope="module", params=FAMILIES)
def grid(request, tiny_tokenizer, labels, device):
    model = build(request.param, len(tiny_tokenizer))
    return Grid(prepare(model, tiny_tokenizer, name=f"tiny-{request.param}", device=device), labels)


@pytest.fixture(scope="module")
def llama(tiny_tokenizer, labels, device):
    return Grid(prepare(build("llama", len(tiny_tokenizer)), tiny_tokenizer, name="tiny-llama", device=device), labels)


def test_prompts_cover_the_edge_cases(llama):
    lengths = [len(llama.tok(p)["input_ids"]) for p in PROMPTS]
    assert 1 in lengths and max(lengths) > 48 and len(set(lengths)) == len(lengths)


# --- the state index is capture's ---------------------------------------------------------


@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
def test_self_patch_is_a_no_op_at_every_state_index(grid, reference):
    """Each prompt's own captured state put back at ℓ, for every ℓ in 0..L (and one run
    without an intervention): the label logits are the unpatched ones."""
    runs = [layerwise(grid.cap.states[i]) + [None] for i in range(len(PROMPTS))]
    got = grid.run(runs, reference, batch_size=4)
    assert got.shape == (len(PROMPTS), grid.L + 2, 2)
    want = grid.cap.label_logits[:, None].expand_as(got)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
def test_last_state_replacement_gives_the_other_prompts_logits(grid, reference):
    n = len(PROMPTS)
    runs = [[Intervention(grid.L, grid.cap.states[(i + 1) % n, grid.L], "replace")] for i in range(n)]
    got = grid.run(runs, reference, batch_size=3)[:, 0]
    torch.testing.assert_close(got, grid.cap.label_logits[[(i + 1) % n for i in range(n)]], atol=ATOL, rtol=0)
    assert not torch.allclose(got, grid.cap.label_logits, atol=1e-4)  # it did change something


def test_adding_zero_is_a_no_op(grid):
    d = grid.cap.states.shape[-1]
    runs = [[Intervention(layer, torch.zeros(d), "add", scale=5.0) for layer in range(grid.L + 1)] for _ in PROMPTS]
    for reference in (False, True):
        got = grid.run(runs, reference, batch_size=3)
        torch.testing.assert_close(got, grid.cap.label_logits[:, None].expand_as(got), atol=ATOL, rtol=0)


def test_fast_path_equals_reference(grid):
    """Random replacements and additions at every state index, several rows per prompt,
    prompts of different lengths: the one-token path on the prefix cache (runs chunked, so
    one cache serves several forwards) equals full forwards of padded rows of mixed prompts;
    every intervention changes the logits (the hooks fire at every ℓ)."""
    g = torch.Generator().manual_seed(0)
    states = grid.cap.states
    norms = states.norm(dim=-1).mean(dim=0)  # [L+1] typical norm per state index
    runs = []
    for i in range(len(PROMPTS)):
        rows = []
        for layer in range(grid.L + 1):
            v = torch.randn(states.shape[-1], generator=g)
            rows.append(Intervention(layer, v / v.norm() * norms[layer], "replace"))
            rows.append(Intervention(layer, v / v.norm() * norms[layer], "add", scale=float(1 + i)))
        runs.append(rows[i % 3 :])  # prompts get different numbers of runs
    fast = grid.run(runs, False, batch_size=3)
    ref = grid.run(runs, True, batch_size=5)
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=1e-5, equal_nan=True)
    clean = grid.cap.label_logits
    for i, rows in enumerate(runs):
        assert torch.isnan(fast[i, len(rows) :]).all() and not torch.isnan(fast[i, : len(rows)]).any()
        changed = (fast[i, : len(rows)] - clean[i]).abs().amax(dim=-1)
        assert (changed > 1e-4).all(), (i, changed)


def test_planted_steering_raises_the_label(grid):
    """Adding, after the final norm, the head direction W[a] − W[b] (unit length) at growing
    scales raises P(label a) (softmax over the two labels) strictly, on both paths."""
    weight = output_head(grid.model)[0].detach().float().cpu()
    a, b = grid.labels.tolist()
    u = weight[a] - weight[b]
    u = u / u.norm()
    scales = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    runs = [[Intervention(grid.L, u, "add", scale=s) for s in scales] for _ in PROMPTS]
    for reference in (False, True):
        probs = torch.softmax(grid.run(runs, reference).double(), dim=-1)[..., 0]  # [n, scales]
        assert (probs.diff(dim=1) > 0).all(), probs
        torch.testing.assert_close(
            probs[:, 0], torch.softmax(grid.cap.label_logits.double(), -1)[:, 0], atol=1e-5, rtol=0
        )


def test_state_index_meaning(llama):
    """ℓ = 0 is block 0's input, 1 ≤ ℓ < L block ℓ−1's output, ℓ = L the final norm's output."""
    model, tok = llama.model, llama.tok
    seen: dict[str, torch.Tensor] = {}
    layers = layers_of(model)
    hooks = [
        layers[0].register_forward_pre_hook(
            lambda m, a, k: seen.__setitem__("in0", (a[0] if a else k["hidden_states"])[0, -1]), with_kwargs=True
        ),
        layers[0].register_forward_hook(
            lambda m, a, o: seen.__setitem__("out0", (o[0] if isinstance(o, tuple) else o)[0, -1])
        ),
        final_norm_of(model).register_forward_hook(lambda m, a, o: seen.__setitem__("norm", o[0, -1])),
    ]
    try:
        with torch.no_grad():
            model(**tok(PROMPTS[0], return_tensors="pt").to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    states = llama.cap.states[0]
    torch.testing.assert_close(states[0], seen["in0"].cpu(), atol=1e-6, rtol=0)
    torch.testing.assert_close(states[1], seen["out0"].cpu(), atol=1e-6, rtol=0)
    torch.testing.assert_close(states[llama.L], seen["norm"].cpu(), atol=1e-6, rtol=0)


# --- outputs ------------------------------------------------------------------------------


def full_logits(grid: Grid, prompt: str) -> torch.Tensor:
    enc = grid.tok(prompt, return_tensors="pt").to(next(grid.model.parameters()).device)
    with torch.no_grad():
        return grid.model(**enc).logits[0, -1].float().cpu()


def test_log_probabilities_and_top_token(llama):
    u = torch.randn(llama.cap.states.shape[-1], generator=torch.Generator().manual_seed(1))
    runs = [[None, Intervention(llama.L, u, "add", scale=3.0)] for _ in PROMPTS]
    for reference in (False, True):
        logp = llama.run(runs, reference, logprobs=True)
        top = llama.run(runs, reference, label_ids=None)
        assert top.shape == (len(PROMPTS), 2, 1)
        for i, p in enumerate(PROMPTS):
            logits = full_logits(llama, p)
            torch.testing.assert_close(
                logp[i, 0], torch.log_softmax(logits.double(), -1)[llama.labels].float(), atol=ATOL, rtol=0
            )
            assert top[i, 0, 0].item() == logits.argmax().item()
            # the steered row: the LM head on the steered final state
            h = llama.cap.states[i, llama.L] + 3.0 * u
            steered = lm_head_logits(llama.model, h.to(next(llama.model.parameters()).device)).float().cpu()
            assert top[i, 1, 0].item() == steered.argmax().item()
            torch.testing.assert_close(
                logp[i, 1], torch.log_softmax(steered.double(), -1)[llama.labels].float(), atol=ATOL, rtol=0
            )


def test_empty_lists_and_padding(llama):
    d = llama.cap.states.shape[-1]
    runs = [[], [Intervention(1, torch.ones(d), "add")] * 3, [None], [], []]
    got = llama.run(runs, False)
    assert got.shape == (len(PROMPTS), 3, 2) and got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got[[0, 2, 3, 4], 0], llama.cap.label_logits[[0, 2, 3, 4]], atol=ATOL, rtol=0)
    assert torch.isnan(got[[0, 2, 3, 4], 1:]).all() and not torch.isnan(got[1]).any()
    # the same intervention three times in one call: equal up to float rounding (rows of a batch
    # may take different BLAS paths; a 6e-9 difference was seen on CI)
    torch.testing.assert_close(got[1, 1], got[1, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[1, 2], got[1, 0], atol=1e-6, rtol=0)


def test_no_hooks_left_behind(llama):
    d = llama.cap.states.shape[-1]
    runs = [[Intervention(layer, torch.ones(d), "add") for layer in range(llama.L + 1)] for _ in PROMPTS]
    for reference in (False, True):
        llama.run(runs, reference)
        for m in [*layers_of(llama.model), final_norm_of(llama.model)]:
            assert not m._forward_hooks and not m._forward_pre_hooks


def test_bad_arguments_are_refused(llama):
    d = llama.cap.states.shape[-1]
    with pytest.raises(ValueError, match="scale must be 1.0"):
        Intervention(0, torch.zeros(d), "replace", scale=2.0)
    with pytest.raises(ValueError, match="mode"):
        Intervention(0, torch.zeros(d), "swap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[d\]"):
        Intervention(0, torch.zeros(2, d), "add")
    with pytest.raises(ValueError, match=rf"state index {llama.L + 1} outside 0\.\.{llama.L}"):
        llama.run([[Intervention(llama.L + 1, torch.zeros(d), "add")]] * len(PROMPTS), False)
    with pytest.raises(ValueError, match="size 5"):
        llama.run([[Intervention(0, torch.zeros(5), "add")]] * len(PROMPTS), False)
    with pytest.raises(ValueError, match="prompts"):
        llama.run([[]], False)
    with pytest.raises(ValueError, match="give label_ids"):
        llama.run([[]] * len(PROMPTS), False, label_ids=None, logprobs=True)


# --- rows and their prompts (multi-adapter routing) ----------------------------------------


@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
def test_before_batch_gives_every_rows_prompt(llama, reference):
    """Before each forward, before_batch gets the prompt index of each of its rows: the
    decoder's input rows are those prompts' tokens (all of them on the reference path; the
    prefix, then the last token repeated per run on the fast path)."""
    calls: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
    pending: list[list[int]] = []
    hook = decoder_of(llama.model).register_forward_pre_hook(
        lambda m, a, k: calls.append((pending.pop(), k["input_ids"].cpu(), k["attention_mask"].cpu())), with_kwargs=True
    )
    d = llama.cap.states.shape[-1]
    runs = [[Intervention(1, torch.ones(d), "add")] * (i + 1) for i in range(len(PROMPTS))]
    try:
        llama.run(runs, reference, batch_size=3, before_batch=lambda rows: pending.append(list(rows)))
    finally:
        hook.remove()
    assert not pending
    encoded = [llama.tok(p)["input_ids"] for p in PROMPTS]
    if reference:  # whole prompts, padded together; every run once, under its prompt's index
        count = [0] * len(PROMPTS)
        for rows, ids, mask in calls:
            assert len(rows) == ids.shape[0] <= 3
            for r, i in enumerate(rows):
                assert ids[r, : int(mask[r].sum())].tolist() == encoded[i]
                count[i] += 1
        assert count == [len(r) for r in runs]
        return
    expected = []  # per prompt: its prefix alone, then its runs in chunks of 3 (the last token on the prefix)
    for i, ids in enumerate(encoded):
        if len(ids) > 1:
            expected.append(([i], [ids[:-1]], (1, len(ids) - 1)))
        for start in range(0, len(runs[i]), 3):
            k = min(3, len(runs[i]) - start)
            expected.append(([i] * k, [ids[-1:]] * k, (k, len(ids))))
    assert [(rows, ids.tolist(), tuple(mask.shape)) for rows, ids, mask in calls] == expected
    assert all(bool(mask.all()) for _, _, mask in calls)  # nothing padded on the fast path


def test_each_row_reaches_its_prompts_adapter(llama):
    """Batched multi-adapter LoRA (one adapter per prompt, routed by before_batch): each
    prompt's results equal that prompt run alone with its adapter, on both paths."""
    model, tok = llama.model, llama.tok
    prompts = PROMPTS[:3]
    device = next(model.parameters()).device
    with multi_lora(model, TuningRecipe(rank=2), seeds=[1, 2, 3]) as (router, modules):
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for mod in modules:
                mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=gen))
        alone = [
            capture(
                model,
                tok,
                [p],
                label_ids=llama.labels,
                before_batch=lambda rows, j=j: router.set([j] * len(rows), device),
            )
            for j, p in enumerate(prompts)
        ]
        other = llama.cap.states  # the base model's states: a real change under any adapter
        runs = [[None] + layerwise(other[(i + 1) % 3]) for i in range(3)]
        for reference in (False, True):
            got = intervene(
                model,
                tok,
                prompts,
                runs,
                label_ids=llama.labels,
                batch_size=4,
                reference=reference,
                before_batch=lambda rows: router.set(rows, device),
            )
            for j in range(3):
                one = intervene(
                    model,
                    tok,
                    [prompts[j]],
                    [runs[j]],
                    label_ids=llama.labels,
                    reference=not reference,
                    before_batch=lambda rows, j=j: router.set([j] * len(rows), device),
                )
                torch.testing.assert_close(got[j], one[0], atol=ATOL, rtol=1e-5)
                torch.testing.assert_close(got[j, 0], alone[j].label_logits[0], atol=ATOL, rtol=0)
    assert not torch.allclose(
        alone[0].label_logits, capture(model, tok, prompts[:1], label_ids=llama.labels).label_logits, atol=1e-3
    )


# --- helpers ------------------------------------------------------------------------------


def test_kl_divergence():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    kl = kl_divergence(p, q)
    assert kl.shape == (4,) and kl.dtype == torch.float64
    pp, lp, lq = torch.softmax(p.double(), -1), torch.log_softmax(p.double(), -1), torch.log_softmax(q.double(), -1)
    torch.testing.assert_close(kl, (pp * (lp - lq)).sum(-1), atol=1e-12, rtol=0)
    assert (kl > 0).all() and not torch.allclose(kl, kl_divergence(q, p))  # asymmetric
    torch.testing.assert_close(kl_divergence(p, p), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        kl_divergence(p, p + 3.0), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0
    )  # shift-invariant
    # broadcasting; NaN rows (intervene's padding) stay NaN; P = 0 adds nothing; Q = 0 where P > 0 is +inf
    assert kl_divergence(p[None], q[:, None]).shape == (4, 4)
    p2 = p.clone()
    p2[1, 0] = math.nan
    out = kl_divergence(p2, q)
    assert torch.isnan(out[1]) and not torch.isnan(out[[0, 2, 3]]).any()
    neg = torch.tensor([[0.0, -math.inf, 1.0]])
    torch.testing.assert_close(
        kl_divergence(neg, torch.tensor([[0.0, -math.inf, 1.0]])), torch.zeros(1, dtype=torch.float64)
    )
    finite = kl_divergence(neg, torch.tensor([[0.0, 5.0, 1.0]]))
    assert torch.isfinite(finite).all() and finite.item() > 0
    assert torch.isinf(kl_divergence(torch.tensor([0.0, 1.0]), torch.tensor([0.0, -math.inf]))).item()


def test_random_directions():
    norms = torch.tensor([1.0, 2.5, 10.0, 0.0])
    v = random_directions(norms, 64, torch.Generator().manual_seed(0))
    assert v.shape == (4, 64) and v.dtype == torch.float32
    torch.testing.assert_close(v.norm(dim=1), norms)
    again = random_directions(norms, 64, torch.Generator().manual_seed(0))
    torch.testing.assert_close(v, again, atol=0, rtol=0)
    assert not torch.allclose(v, random_directions(norms, 64, torch.Generator().manual_seed(1)))
    many = random_directions(torch.ones(2000), 16, torch.Generator().manual_seed(2))
    assert many.mean(dim=0).abs().max() < 0.05  # no preferred direction
    cos = (many[:1000] * many[1000:]).sum(-1)
    assert abs(cos.mean().item()) < 0.03 and abs(cos.pow(2).mean().item() - 1 / 16) < 0.01


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_bfloat16(family, tiny_tokenizer, labels):
    """In bfloat16 (the GPU default) too: fp32 vectors are cast to the model's dtype (a
    captured state put back is exactly itself), additions are made in fp32; both paths agree."""
    g = Grid(
        prepare(build(family, len(tiny_tokenizer)).to(torch.bfloat16), tiny_tokenizer, name=family, device="cpu"),
        labels,
    )
    runs = [
        layerwise(g.cap.states[i]) + layerwise(g.cap.states[(i + 1) % len(PROMPTS)], "add", 0.5)
        for i in range(len(PROMPTS))
    ]
    fast, ref = g.run(runs, False, batch_size=4), g.run(runs, True, batch_size=4)
    torch.testing.assert_close(fast, ref, atol=2e-2, rtol=2e-2)
    want = g.cap.label_logits[:, None].expand(-1, g.L + 1, -1)
    torch.testing.assert_close(fast[:, : g.L + 1], want, atol=1e-2, rtol=1e-2)
