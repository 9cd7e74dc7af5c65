"""tuning.py: answer-only loss against transformers' loss, LoRA that leaves the base model
untouched, full fine-tuning on a copy, and seeded determinism."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from iclit.engine.capture import capture
from iclit.models.arch import decoder_of, layers_of, lm_head_logits
from iclit.tuning import (
    TuningRecipe,
    answer_loss,
    answer_token_losses,
    encode_pairs,
    head_cross_entropy,
    last_block_rows,
    lora_config,
    subset_batch,
    tuned,
)

PAIRS = [
    ("Classify the sentiment.\n\nReview: A warm, funny film.\nSentiment:", " positive"),
    (
        "Classify the sentiment.\n\nReview: The plot makes no sense at all and the ending is worse.\nSentiment:",
        " negative",
    ),
    ("English: Please open your books on page twelve.\nCzech:", " Otevřete si prosím knihy na straně dvanáct."),
]
FAST = TuningRecipe(lr=1e-2, epochs=30)
SHORT = TuningRecipe(lr=1e-2, epochs=5)  # enough to move every LoRA weight


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def assert_state_equal(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert list(now) == list(before)
    for name, t in now.items():
        assert torch.equal(t, before[name]), f"{name} changed"


# --- encoding and loss -------------------------------------------------------------------


def test_encode_pairs_prompt_tokens_exact(tiny):
    tok = tiny.tokenizer
    batch = encode_pairs(tok, PAIRS)
    width = batch.input_ids.shape[1]
    for row, (prompt, answer) in enumerate(PAIRS):
        p = tok(prompt)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"]
        n = len(p) + len(a)
        assert batch.input_ids[row, : len(p)].tolist() == p
        assert batch.input_ids[row, len(p) : n].tolist() == a
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (width - n)
        assert (batch.input_ids[row, n:] == tok.pad_token_id).all()
        sel = batch.example == row
        # each answer token is predicted from the position just before it
        assert batch.targets[sel].tolist() == a
        assert batch.predict_at[sel].tolist() == [row * width + t - 1 for t in range(len(p), n)]


def test_encode_pairs_rejects_empty_answer(tiny):
    with pytest.raises(ValueError, match="tokenises to nothing"):
        encode_pairs(tiny.tokenizer, [("Review: x\nSentiment:", "")])


def test_answer_loss_equals_hf_loss_one_sequence(tiny):
    tok = tiny.tokenizer
    prompt, answer = PAIRS[2]
    batch = encode_pairs(tok, [(prompt, answer)])
    labels = batch.input_ids.clone()
    labels[0, : len(tok(prompt)["input_ids"])] = -100
    with torch.no_grad():
        ref = tiny.model(input_ids=batch.input_ids, labels=labels).loss
        got = answer_loss(tiny.model, batch)
    assert got.ndim == 0
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_answer_loss_is_token_mean_across_sequences(tiny):
    tok = tiny.tokenizer
    batch = encode_pairs(tok, PAIRS)
    with torch.no_grad():
        logits = tiny.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        got = answer_loss(tiny.model, batch)
        per_token = answer_token_losses(tiny.model, batch)
    manual = []
    for row, (prompt, answer) in enumerate(PAIRS):
        start = len(tok(prompt)["input_ids"])
        for j, target in enumerate(tok(answer, add_special_tokens=False)["input_ids"]):
            manual.append(-torch.log_softmax(logits[row, start + j - 1].double(), dim=-1)[target])
    manual_t = torch.stack(manual).float()
    assert per_token.shape == manual_t.shape  # one loss per answer token, all sequences
    torch.testing.assert_close(per_token, manual_t, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, manual_t.mean(), atol=1e-5, rtol=0)
    # and HF's own loss with -100 on prompt and pad tokens agrees (it is a per-token mean)
    labels = batch.input_ids.clone()
    labels[batch.attention_mask == 0] = -100
    for row, (prompt, _) in enumerate(PAIRS):
        labels[row, : len(tok(prompt)["input_ids"])] = -100
    with torch.no_grad():
        hf = tiny.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
    torch.testing.assert_close(got, hf, atol=1e-5, rtol=0)
    # not the mean of per-sequence means (the sequences have very different answer lengths)
    seq_means = torch.stack([per_token[batch.example == r].mean() for r in range(len(PAIRS))]).mean()
    assert not torch.isclose(got, seq_means, atol=1e-4)


def test_subset_equals_encoding_the_subset(tiny):
    tok = tiny.tokenizer
    full = encode_pairs(tok, PAIRS)
    for rows in ([1], [2, 0], [0, 1, 2]):
        sub = subset_batch(full, rows)
        alone = encode_pairs(tok, [PAIRS[r] for r in rows])
        with torch.no_grad():
            torch.testing.assert_close(answer_loss(tiny.model, sub), answer_loss(tiny.model, alone), atol=1e-5, rtol=0)
        # the same answer tokens (order within the flat batch may differ) and losses
        assert sorted(sub.targets.tolist()) == sorted(alone.targets.tolist())
        with torch.no_grad():
            torch.testing.assert_close(
                answer_token_losses(tiny.model, sub).sort().values,
                answer_token_losses(tiny.model, alone).sort().values,
                atol=1e-5,
                rtol=0,
            )


# --- recipe ------------------------------------------------------------------------------


def test_recipe_defaults_and_validation():
    assert TuningRecipe().learning_rate == 1e-3
    assert TuningRecipe(method="full").learning_rate == 1e-5
    assert TuningRecipe(lr=0.5).learning_rate == 0.5
    d = TuningRecipe(method="full").to_dict()
    assert d["lr"] == 1e-5 and d["targets"] == ["q_proj", "v_proj"] and d["method"] == "full"
    for bad, match in (
        (dict(method="prefix"), "method"),
        (dict(epochs=0), "epochs"),
        (dict(rank=0), "rank"),
        (dict(lr=0.0), "lr"),
        (dict(batch_size=-1), "batch_size"),
    ):
        with pytest.raises(ValueError, match=match):
            TuningRecipe(**bad)


# --- LoRA --------------------------------------------------------------------------------


def test_lora_lowers_answer_loss(tiny):
    batch = encode_pairs(tiny.tokenizer, PAIRS)
    with torch.no_grad():
        initial = float(answer_loss(tiny.model, batch))
    with tuned(tiny.model, tiny.tokenizer, PAIRS, FAST, seed=0) as (model, result):
        assert len(result.losses) == FAST.epochs  # batch_size 0: one step per epoch
        # lora_B starts at zero, so the first step's loss is the base model's loss
        assert result.losses[0] == pytest.approx(initial, abs=1e-5)
        with torch.no_grad():
            inside = float(answer_loss(model, batch))
    assert result.final_loss == pytest.approx(inside, abs=1e-6)
    assert result.final_loss < initial - 0.5, (initial, result.final_loss)
    assert result.losses[-1] < result.losses[0]
    assert result.seconds > 0


def test_lora_changes_only_lora_weights(tiny):
    base = tiny.model
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    n_layers = tiny.n_layers
    with tuned(base, tiny.tokenizer, PAIRS, SHORT, seed=0) as (model, _):
        seen = set()
        for name, p in model.named_parameters():
            if "lora_" in name:
                assert p.requires_grad, name
                continue
            assert not p.requires_grad, f"base parameter {name} is trainable"
            base_name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(p, before[base_name]), f"base parameter {base_name} changed"
            seen.add(base_name)
        assert seen == set(before)
        expected = {f"model.layers.{i}.self_attn.{m}" for i in range(n_layers) for m in ("q_proj", "v_proj")}
        for part in ("lora_A", "lora_B"):
            adapted = {
                n.removeprefix("base_model.model.").rsplit(f".{part}", 1)[0]
                for n, _ in model.named_modules()
                if n.endswith(part)
            }
            assert adapted == expected, part
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert len(lora_b) == 2 * n_layers
        assert all(p.abs().sum() > 0 for p in lora_b), "training left a lora_B at zero"


def test_lora_tuned_model_reads_differently(tiny):
    prompt = [PAIRS[0][0]]
    base_states = capture(tiny.model, tiny.tokenizer, prompt).states
    with tuned(tiny.model, tiny.tokenizer, PAIRS, SHORT, seed=0) as (model, _):
        tuned_states = capture(model, tiny.tokenizer, prompt).states
    # embeddings are untouched by q/v LoRA, the later layers are not
    torch.testing.assert_close(tuned_states[0, 0], base_states[0, 0], atol=0, rtol=0)
    assert (tuned_states[0, -1] - base_states[0, -1]).abs().max() > 1e-3


def test_lora_restores_base_model_exactly(tiny):
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = tiny.model
    before = snapshot(base)
    module_names = [n for n, _ in base.named_modules()]
    states_before = capture(base, tiny.tokenizer, [PAIRS[1][0]]).states
    with tuned(base, tiny.tokenizer, PAIRS, SHORT, seed=0):
        pass
    assert_state_equal(base, before)
    assert [n for n, _ in base.named_modules()] == module_names
    assert not any("lora" in n for n, _ in base.named_modules())
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())
    assert not hasattr(base, "peft_config")
    assert not base.training
    assert not any(p.requires_grad for p in base.parameters())
    assert torch.equal(capture(base, tiny.tokenizer, [PAIRS[1][0]]).states, states_before)


def test_lora_restores_base_model_after_an_error(tiny):
    base = tiny.model
    before = snapshot(base)
    with pytest.raises(RuntimeError, match="boom"):
        with tuned(base, tiny.tokenizer, PAIRS, SHORT, seed=0):
            raise RuntimeError("boom")
    assert_state_equal(base, before)
    assert not hasattr(base, "peft_config")
    assert not any("lora" in n for n, _ in base.named_modules())


def test_lora_same_seed_same_adapter_other_seed_differs(tiny):
    recipe = TuningRecipe(lr=1e-2, epochs=5)
    runs = []
    for seed in (7, 7, 8):
        with tuned(tiny.model, tiny.tokenizer, PAIRS, recipe, seed=seed) as (model, result):
            runs.append((lora_state(model), list(result.losses), result.final_loss))
    (a, la, fa), (b, lb, fb), (c, lc, fc) = runs
    assert list(a) == list(b) == list(c)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert la == lb and fa == fb
    assert any(not torch.equal(a[n], c[n]) for n in a)
    assert la != lc and fa != fc


def test_lora_minibatches(tiny):
    recipe = TuningRecipe(lr=1e-2, epochs=4, batch_size=2)
    with tuned(tiny.model, tiny.tokenizer, PAIRS, recipe, seed=0) as (_, result):
        pass
    assert len(result.losses) == 4 * 2  # ceil(3 / 2) steps per epoch
    assert result.final_loss < result.losses[0]


# --- full fine-tuning --------------------------------------------------------------------


def test_full_finetuning_tunes_a_copy(tiny):
    base = tiny.model
    before = snapshot(base)
    batch = encode_pairs(tiny.tokenizer, PAIRS)
    with torch.no_grad():
        initial = float(answer_loss(base, batch))
    recipe = TuningRecipe(method="full", lr=1e-3, epochs=10)
    with tuned(base, tiny.tokenizer, PAIRS, recipe, seed=0) as (clone, result):
        assert clone is not base
        changed = [n for n, t in clone.state_dict().items() if not torch.equal(t, before[n])]
        assert changed, "full fine-tuning changed no weight"
        assert any("mlp" in n for n in changed) and any("embed_tokens" in n for n in changed)
        assert not any(p.requires_grad for p in clone.parameters())
        assert not clone.training
        # the base model is untouched while the clone is alive
        assert_state_equal(base, before)
    assert_state_equal(base, before)
    assert result.losses[0] == pytest.approx(initial, abs=1e-5)
    assert result.final_loss < initial - 0.5, (initial, result.final_loss)
    assert not any(p.requires_grad for p in base.parameters())


# --- the fast loss: chunked head cross-entropy, last block at answer positions only --------


def library_token_losses(model: torch.nn.Module, batch) -> torch.Tensor:
    """answer_token_losses the library way: the whole decoder, then logits and cross_entropy."""
    hidden = decoder_of(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    rows = hidden.flatten(0, 1)[batch.predict_at]
    return torch.nn.functional.cross_entropy(lm_head_logits(model, rows).float(), batch.targets, reduction="none")


@pytest.mark.parametrize("chunk", [7, 64, 100_000])  # 600-token vocabulary: ragged chunks, one chunk
def test_head_cross_entropy_equals_library_loss_and_gradient(tiny, chunk):
    model = tiny.model
    assert not model.lm_head.weight.requires_grad  # frozen head: the chunked path
    gen = torch.Generator().manual_seed(0)
    rows = (3 * torch.randn(6, model.config.hidden_size, generator=gen)).requires_grad_()
    targets = torch.randint(0, model.config.vocab_size, (6,), generator=gen)
    weights = torch.rand(6, generator=gen)
    ref = torch.nn.functional.cross_entropy(lm_head_logits(model, rows).float(), targets, reduction="none")
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), rows)
    got = head_cross_entropy(model, rows, targets, chunk=chunk)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), rows)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, ref_grad, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(head_cross_entropy(model, rows, targets, chunk=chunk), ref, atol=1e-5, rtol=1e-5)


def test_head_cross_entropy_in_bfloat16(tiny):
    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(4, model.config.hidden_size, generator=gen).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, model.config.vocab_size, (4,), generator=gen)
    ref = torch.nn.functional.cross_entropy(lm_head_logits(model, rows).float(), targets, reduction="none")
    (ref_grad,) = torch.autograd.grad(ref.sum(), rows)
    got = head_cross_entropy(model, rows, targets, chunk=64)
    (got_grad,) = torch.autograd.grad(got.sum(), rows)
    assert got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got_grad.float(), ref_grad.float(), atol=2e-3, rtol=2e-2)


def test_head_cross_entropy_trains_a_trainable_head_and_soft_caps(tiny):
    """A head that is being trained (full fine-tuning) gets its gradient: the library path.
    So does a soft-capped head (Gemma-2)."""
    model = copy.deepcopy(tiny.model).requires_grad_(True)
    rows = torch.randn(3, model.config.hidden_size)
    targets = torch.tensor([5, 17, 300])
    head_cross_entropy(model, rows, targets).sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    model.requires_grad_(False)
    model.config.final_logit_softcapping = 2.0
    capped = torch.nn.functional.cross_entropy(torch.tanh(model.lm_head(rows) / 2.0) * 2.0, targets, reduction="none")
    torch.testing.assert_close(head_cross_entropy(model, rows, targets), capped)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_answer_loss_and_gradients_equal_the_library_path(tiny, method):
    """Last block's feed-forward at answer positions only + chunked head: the same losses and
    the same gradient for every trained weight as the whole forward with logits."""
    from peft import get_peft_model

    batch = encode_pairs(tiny.tokenizer, PAIRS)
    if method == "full":
        model = copy.deepcopy(tiny.model).requires_grad_(True)
    else:
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(tiny.model), lora_config(TuningRecipe()))
        for n, p in model.named_parameters():  # B starts at zero: move it so A's gradient is not zero
            if "lora_B" in n:
                p.data.normal_()
    params = [p for p in model.parameters() if p.requires_grad]
    mlp = type(layers_of(model)[-1].mlp)
    ref = library_token_losses(model, batch)
    ref_grads = torch.autograd.grad(ref.mean(), params)
    got = answer_token_losses(model, batch)
    got_grads = torch.autograd.grad(got.mean(), params)
    assert type(layers_of(model)[-1].mlp) is mlp  # the block's own module is back
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert len(got_grads) == len(params) > 0
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4)


def test_last_block_rows_restores_the_block_after_an_error(tiny):
    layer = layers_of(tiny.model)[-1]
    mlp = layer.mlp
    with pytest.raises(RuntimeError, match="boom"):
        with last_block_rows(tiny.model, torch.tensor([0])):
            assert layer.mlp is not mlp
            raise RuntimeError("boom")
    assert layer.mlp is mlp


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fast_loss_tunes_like_transformers_loss(tiny, method):
    """Whole training runs: the fast loss (and fused AdamW for full fine-tuning) against
    transformers' ``labels=`` loss and the default AdamW end at the same weights."""
    recipe = TuningRecipe(method=method, lr=1e-2 if method == "lora" else 1e-3, epochs=5)
    states = {}
    for reference in (True, False):
        with tuned(tiny.model, tiny.tokenizer, PAIRS, recipe, seed=3, reference=reference) as (m, result):
            states[reference] = ({n: p.detach().clone() for n, p in m.named_parameters()}, result)
    (ref, ref_result), (got, got_result) = states[True], states[False]
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(got_result.losses, ref_result.losses, rtol=1e-4, atol=1e-5)
    assert ref_result.losses[-1] < ref_result.losses[0] - 0.1  # the weights moved
