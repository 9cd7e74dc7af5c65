"""Batched multi-adapter LoRA against PEFT adapters trained one after another."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from iclit.api import run_comparison
from iclit.engine.capture import capture
from iclit.tasks import get_task
from iclit.tuning import MultiLoRALinear, TuningRecipe, lora_config, peft_like_init, tuned, tuned_many

SEEDS = [11, 22, 33]


@pytest.fixture(scope="module")
def task():
    return get_task("sentiment")


def pair_sets(task, n=3, k=4):
    ex = task.examples
    return [[task.template.training_pair(e) for e in ex[j * k : (j + 1) * k]] for j in range(n)]


def peft_reference(lm, sets, recipe, queries):
    """Each adapter trained alone with PEFT: (lora weights by module name, result, IT states)."""
    out = []
    for pairs, seed, q in zip(sets, SEEDS, queries, strict=True):
        with tuned(lm.model, lm.tokenizer, pairs, recipe, seed=seed) as (pm, res):
            weights = {
                n.replace("base_model.model.", "").replace(".default.weight", ""): p.detach().clone()
                for n, p in pm.named_parameters()
                if "lora_" in n
            }
            states = capture(pm, lm.tokenizer, [q]).states[0]
        out.append((weights, res, states))
    return out


@pytest.mark.parametrize(
    "recipe, max_tokens",
    [
        (TuningRecipe(lr=1e-2, epochs=5), 4096),  # full batch, one micro-batch
        (TuningRecipe(lr=1e-2, epochs=4, batch_size=2), 4096),  # per-adapter shuffled minibatches
        (TuningRecipe(lr=1e-2, epochs=4, max_grad_norm=1e-3), 40),  # clipping bites; tiny micro-batches
    ],
)
def test_batched_adapters_equal_sequential_peft(tiny, task, recipe, max_tokens):
    sets = pair_sets(task)
    queries = [task.template.query(e.input) for e in task.examples[20:23]]
    ref = peft_reference(tiny, sets, recipe, queries)
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with tuned_many(tiny.model, tiny.tokenizer, sets, recipe, seeds=SEEDS, max_tokens=max_tokens) as (
        m,
        router,
        results,
    ):
        modules = {n: mod for n, mod in m.named_modules() if isinstance(mod, MultiLoRALinear)}
        assert len(modules) == 2 * tiny.n_layers  # q_proj and v_proj of every layer
        states = capture(m, tiny.tokenizer, queries, before_batch=lambda rows: router.set(rows)).states
        for j, (weights, res, ref_states) in enumerate(ref):
            for name, mod in modules.items():
                torch.testing.assert_close(mod.lora_A[j], weights[f"{name}.lora_A"], atol=2e-5, rtol=1e-4)
                torch.testing.assert_close(mod.lora_B[j], weights[f"{name}.lora_B"], atol=2e-5, rtol=1e-4)
            np.testing.assert_allclose(results[j].losses, res.losses, rtol=1e-4, atol=1e-5)
            assert results[j].final_loss == pytest.approx(res.final_loss, rel=1e-4, abs=1e-5)
            torch.testing.assert_close(states[j], ref_states, atol=1e-4, rtol=1e-4)
        assert results[0].losses[-1] < results[0].losses[0]  # it learns
    # the base model is back: plain Linear modules, identical weights
    assert not any(isinstance(mod, MultiLoRALinear) for mod in tiny.model.modules())
    after = tiny.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_peft_like_init_matches_peft(tiny):
    from peft import get_peft_model

    recipe = TuningRecipe()
    torch.manual_seed(5)
    pm = get_peft_model(tiny.model, lora_config(recipe))
    peft_a = [p.detach().clone() for n, p in pm.named_parameters() if "lora_A" in n]
    peft_b = [p.detach().clone() for n, p in pm.named_parameters() if "lora_B" in n]
    pm.unload()
    shapes = [
        (m.in_features, m.out_features) for n, m in tiny.model.named_modules() if n.endswith(("q_proj", "v_proj"))
    ]
    ours = peft_like_init(shapes, recipe.rank, 5)
    assert len(ours) == len(peft_a)
    for a, b in zip(ours, peft_a, strict=True):
        assert torch.equal(a, b)
    assert all(torch.count_nonzero(b) == 0 for b in peft_b)


def test_router_sends_each_row_to_its_adapter(tiny, task):
    """Two adapters, rows interleaved: each row's state is the one of its own adapter."""
    sets = pair_sets(task, n=2)
    q = task.template.query(task.examples[30].input)
    with tuned_many(tiny.model, tiny.tokenizer, sets, TuningRecipe(lr=5e-2, epochs=3), seeds=SEEDS[:2]) as (
        m,
        router,
        _,
    ):
        alone = [
            capture(m, tiny.tokenizer, [q], before_batch=lambda rows, j=j: router.set([j])).states[0] for j in (0, 1)
        ]
        mixed = capture(
            m, tiny.tokenizer, [q, q, q], before_batch=lambda rows: router.set([[1, 0, 1][i] for i in rows])
        ).states
    assert not torch.allclose(alone[0], alone[1])
    torch.testing.assert_close(mixed[0], alone[1])
    torch.testing.assert_close(mixed[1], alone[0])


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_shared_prefix_per_adapter_equals_whole_prompts(tiny, task, batch_size, monkeypatch):
    """IT's read-out on the fast path: the instruction's key/value cache is computed once per
    adapter (``variants``) and each row continues its own adapter's; the states, pooled
    states and label scores equal whole prompts through the same adapters. Reading every row
    on one adapter's prefix instead is visibly wrong, so the check can fail."""
    import iclit.engine.capture as capture_module
    from iclit.core.tokens import label_token_ids

    sets = pair_sets(task, n=3)
    head = task.template.icl_prefix(())
    inputs = [e.input for e in task.examples[30:35]]
    prompts = [task.template.query(x) for x in inputs for _ in range(3)]
    adapter = [j for _ in inputs for j in (2, 0, 1)]
    spans = [len(head) for _ in prompts]
    label_ids = label_token_ids(tiny.tokenizer, [" negative", " positive"])
    made = []
    real = capture_module.SharedPrefix
    monkeypatch.setattr(capture_module, "SharedPrefix", lambda *a, **kw: made.append(a[2].tolist()) or real(*a, **kw))
    with tuned_many(tiny.model, tiny.tokenizer, sets, TuningRecipe(lr=5e-2, epochs=3), seeds=SEEDS) as (m, router, _):

        def route(rows):
            return router.set([adapter[i] for i in rows])

        whole = capture(m, tiny.tokenizer, prompts, label_ids=label_ids, before_batch=route, span_from=spans)
        cached = capture(
            m,
            tiny.tokenizer,
            prompts,
            label_ids=label_ids,
            before_batch=route,
            span_from=spans,
            prefixes=[head] * len(prompts),
            variants=adapter,
            batch_size=batch_size,
        )
        one = capture(
            m,
            tiny.tokenizer,
            prompts,
            label_ids=label_ids,
            before_batch=route,
            span_from=spans,
            prefixes=[head] * len(prompts),
            variants=[0] * len(prompts),
            batch_size=batch_size,
        )
    assert made[0] == [2, 0, 1]  # the prefix ran once, one row per adapter
    for name in ("states", "pooled", "label_logits"):
        torch.testing.assert_close(getattr(cached, name), getattr(whole, name), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(one.states, whole.states, atol=1e-3)


def test_multilora_linear_matches_formula():
    base = nn.Linear(6, 5)
    from iclit.tuning import AdapterRouter

    router = AdapterRouter()
    layer = MultiLoRALinear(base, n=2, rank=3, alpha=6.0, dropout=0.0, router=router)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = torch.randn(2, 4, 6)
    router.set([1, 0])
    y = layer(x)
    for row, a in enumerate([1, 0]):
        expected = base(x[row]) + 2.0 * x[row] @ layer.lora_A[a].T @ layer.lora_B[a].T
        torch.testing.assert_close(y[row], expected)


@pytest.mark.parametrize("task_name", ["sentiment", "translation-en-cs"])
def test_fast_and_straightforward_paths_agree(task_name):
    """compare's fast engine (prefix cache, batched adapters, memoised anchors) and the
    straightforward path (full forwards, PEFT one at a time, transformers' loss) agree."""
    from iclit.models import load_model

    runs = {}
    for fast in (True, False):
        lm = load_model("tiny-random-llama")
        runs[fast] = run_comparison(
            lm, task_name, k=3, resamples=4, seed=1, recipe=TuningRecipe(lr=1e-2, epochs=3), fast=fast, max_new_tokens=4
        )
    for pair in ("anchor_icl", "anchor_it", "icl_it"):
        a = np.array([t[pair] for t in runs[True].trials])
        b = np.array([t[pair] for t in runs[False].trials])
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert [t["predictions"] for t in runs[True].trials] == [t["predictions"] for t in runs[False].trials]
    np.testing.assert_allclose(
        [t["it_final_loss"] for t in runs[True].trials], [t["it_final_loss"] for t in runs[False].trials], rtol=1e-4
    )
