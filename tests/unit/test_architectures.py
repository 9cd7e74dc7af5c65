"""Every architecture through the same checks (the PEFT habit: one common tester, parametrised
over tiny random models). For each family: captured states equal ``output_hidden_states``,
prefix-cached ICL equals uncached, batched multi-adapter LoRA equals sequential PEFT, the
fast loss (last block at the answer positions, chunked head) equals the whole forward, full
fine-tuning and dose steps run, every arm of the engine runs, and the LoRA targets are the
architecture's query/value projections. ``toy`` is a model class defined here that is in no
table: it runs on the structural fallback of :mod:`iclit.models.arch`.

Tiny configurations are built here (no files, no network); every dropout is 0 so the batched
and the PEFT paths draw no random numbers in training.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.pytorch_utils import Conv1D

from iclit.core.tokens import label_token_ids
from iclit.engine.capture import capture
from iclit.engine.evaluate import evaluate, state_name
from iclit.models import prepare
from iclit.models.arch import (
    ARCHITECTURES,
    ArchSpec,
    arch_for,
    decoder_of,
    final_norm_of,
    infer_arch,
    layers_of,
    lm_head_logits,
    lora_targets,
    resolve_targets,
    target_linears,
)
from iclit.tasks import draw_resamples, get_task
from iclit.tuning import (
    AdapterRouter,
    MultiLoRALinear,
    TuningRecipe,
    answer_token_losses,
    encode_pairs,
    head_cross_entropy,
    last_block_rows,
    lora_config,
    shared_prefix_length,
    tuned,
    tuned_many,
)

# --- the grid ----------------------------------------------------------------------------------

_LLAMA_LIKE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
_GEMMA = dict(_LLAMA_LIKE, head_dim=8, query_pre_attn_scalar=8, sliding_window=24)  # prompts outgrow the window

CONFIGS: dict[str, dict] = {
    "llama": _LLAMA_LIKE,
    "mistral": dict(_LLAMA_LIKE, sliding_window=24),
    "qwen2": _LLAMA_LIKE,
    "qwen3": dict(_LLAMA_LIKE, head_dim=8),
    "gemma2": dict(_GEMMA, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": _GEMMA,
    "phi3": dict(_LLAMA_LIKE, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0),
    "olmo2": _LLAMA_LIKE,
    "gpt_neox": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    ),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}
# transformers architectures that are in no row of the table: read from the module tree
UNLISTED: dict[str, dict] = {
    "falcon": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, attention_dropout=0.0, hidden_dropout=0.0
    ),
    "gptj": dict(
        n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    ),
    "opt": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        word_embed_proj_dim=32,
        max_position_embeddings=512,
        dropout=0.0,
        attention_dropout=0.0,
    ),
    "phi": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
    ),
    "gpt_bigcode": dict(
        n_embd=32, n_layer=2, n_head=4, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    ),
}
CONFIGS.update(UNLISTED)
FAMILIES = [*CONFIGS, "toy"]
NOT_IN_TABLE = {*UNLISTED, "toy"}

# the query/value projections the IT arm adapts by default, per family (fused: the whole module)
EXPECTED_TARGETS = {
    **{f: ("q_proj", "v_proj") for f in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2")},
    "phi3": ("qkv_proj",),
    "gpt_neox": ("query_key_value",),
    "gpt2": ("c_attn",),
    "toy": ("wq", "wv"),
    "falcon": ("query_key_value",),
    "gptj": ("q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj"),
    "gpt_bigcode": ("c_attn",),
}


# --- a causal LM that is in no table (the structural fallback) ----------------------------------


class ToyConfig(PreTrainedConfig):
    model_type = "iclit-toy"

    def __init__(
        self,
        vocab_size=600,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class ToyAttention(nn.Module):
    def __init__(self, config: ToyConfig, index: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.heads, self.index = config.num_attention_heads, index
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        b, s, d = x.shape

        def split(t):
            return t.view(b, s, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.wq(x)), split(self.wk(x)), split(self.wv(x))
        if cache is not None:
            k, v = cache.update(k, v, self.index)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(b, s, d))


class ToyFeedForward(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x)))


class ToyBlock(nn.Module):
    def __init__(self, config: ToyConfig, index: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.ln_a, self.attn, self.ln_b, self.ffn = (
            nn.LayerNorm(d),
            ToyAttention(config, index),
            nn.LayerNorm(d),
            ToyFeedForward(d),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        x = x + self.attn(self.ln_a(x), mask, cache)
        return x + self.ffn(self.ln_b(x))


class ToyPreTrained(PreTrainedModel):
    config_class = ToyConfig
    base_model_prefix = "body"

    def _init_weights(self, module: nn.Module) -> None:  # torch's defaults, under the caller's seed
        pass


class ToyModel(ToyPreTrained):
    """Unusual names throughout: ``blocks``, ``ln_out``, ``attn.wq``/``wv``, ``ffn``."""

    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.tok = nn.Embedding(config.vocab_size, d)
        self.pos = nn.Embedding(config.max_position_embeddings, d)
        self.blocks = nn.ModuleList(ToyBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_out = nn.LayerNorm(d)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.tok

    def forward(
        self, input_ids=None, attention_mask=None, cache=None, use_cache=False, output_hidden_states=False, **_
    ):
        b, s = input_ids.shape
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, past + s, dtype=torch.long, device=input_ids.device)
        pos = torch.arange(past, past + s, device=input_ids.device)
        causal = torch.arange(past + s, device=pos.device)[None, :] <= pos[:, None]  # [s, past + s]
        mask = (causal[None] & attention_mask.bool()[:, None, :])[:, None]  # [b, 1, s, past + s]
        x = self.tok(input_ids) + self.pos(pos)[None]
        states = [x]
        for block in self.blocks:
            x = block(x, mask, cache)
            states.append(x)
        x = self.ln_out(x)
        states[-1] = x  # transformers' convention: the last state after the final norm
        return BaseModelOutputWithPast(
            last_hidden_state=x,
            cache=cache if use_cache else None,
            hidden_states=tuple(states) if output_hidden_states else None,
        )


class ToyForCausalLM(ToyPreTrained, GenerationMixin):
    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config)
        self.body = ToyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_input_embeddings(self) -> nn.Module:
        return self.body.tok

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        labels=None,
        cache=None,
        use_cache=False,
        output_hidden_states=False,
        **_,
    ):
        out = self.body(
            input_ids, attention_mask, cache=cache, use_cache=use_cache, output_hidden_states=output_hidden_states
        )
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)


# --- building ----------------------------------------------------------------------------------


def build(family: str, vocab: int, seed: int = 0) -> nn.Module:
    ids = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if family == "toy":
            model = ToyForCausalLM(ToyConfig(**ids))
        else:
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **ids, **CONFIGS[family]))
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture()
def lm(family, tiny_tokenizer):
    return prepare(build(family, len(tiny_tokenizer)), tiny_tokenizer, name=f"tiny-{family}", device="cpu")


@pytest.fixture(scope="module")
def task():
    return get_task("sentiment")


@pytest.fixture(scope="module")
def draws(task):
    return draw_resamples(task, k=2, n=3, seed=0)


def pair_sets(task, n: int = 2, k: int = 2) -> list[list[tuple[str, str]]]:
    ex = task.examples
    return [[task.template.training_pair(e) for e in ex[j * k : (j + 1) * k]] for j in range(n)]


def queries(task, n: int = 2) -> list[str]:
    return [task.template.query(e.input) for e in task.examples[20 : 20 + n]]


SEEDS = [11, 22]

pytestmark = [  # from PEFT itself where the tests call it directly (iclit's own calls avoid both)
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
]


# --- the architecture table / fallback ---------------------------------------------------------


def test_table_or_fallback(lm, family):
    spec = arch_for(lm.model)
    assert (family in ARCHITECTURES) == (family not in NOT_IN_TABLE)
    if family == "toy":
        assert spec == ArchSpec(layers="blocks", final_norm="ln_out", query="wq", value="wv", mlp="ffn")
    # the table's row is what the module tree shows
    inferred = infer_arch(lm.model)
    assert (inferred.layers, inferred.final_norm, inferred.lora_targets) == (
        spec.layers,
        spec.final_norm,
        spec.lora_targets,
    )
    assert len(layers_of(lm.model)) == lm.model.config.num_hidden_layers
    if family == "opt":  # fc1/fc2 sit in the block itself: no feed-forward module, the last block is not trimmed
        assert spec.mlp == ""
    else:
        assert getattr(layers_of(lm.model)[-1], spec.mlp, None) is not None


def test_lora_targets_per_family(lm, family):
    model = lm.model
    assert lora_targets(model) == EXPECTED_TARGETS[family]
    assert resolve_targets(model, TuningRecipe().targets) == EXPECTED_TARGETS[family]  # the recipe's default
    assert resolve_targets(model, None) == EXPECTED_TARGETS[family]
    picked = target_linears(model, TuningRecipe().targets)
    assert len(picked) == len(EXPECTED_TARGETS[family]) * lm.n_layers
    # and PEFT adapts exactly those modules
    from peft import get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(model), lora_config(TuningRecipe(), model))
    adapted = sorted(
        n.removeprefix("base_model.model.").removesuffix(".lora_A")
        for n, _ in pm.named_modules()
        if n.endswith(".lora_A")
    )
    assert adapted == sorted(n for n, _ in picked)


def test_all_linear_is_peft_all_linear(lm):
    from peft import LoraConfig, get_peft_model

    model = lm.model
    ours = [n for n, _ in target_linears(model, ("all-linear",))]
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    theirs = [
        n.removeprefix("base_model.model.").removesuffix(".lora_A")
        for n, _ in pm.named_modules()
        if n.endswith(".lora_A")
    ]
    assert sorted(ours) == sorted(theirs) and len(ours) > len(target_linears(model, None))


def test_targets_that_match_nothing_are_one_clear_error(lm):
    with pytest.raises(ValueError) as info:
        resolve_targets(lm.model, ("q_prj", "v_proj"))
    msg = str(info.value)
    assert "q_prj" in msg and "linear layers are named" in msg
    assert any(
        t in msg for t in EXPECTED_TARGETS["toy"] + EXPECTED_TARGETS["gpt2"] + ("q_proj", "qkv_proj", "query_key_value")
    )
    with pytest.raises(ValueError, match="not a|is a"):
        resolve_targets(lm.model, (arch_for(lm.model).mlp,))  # a module, but not a linear layer
    with pytest.raises(ValueError, match="q_prj"):
        with tuned_many(lm.model, lm.tokenizer, [[("a b", " c")]], TuningRecipe(targets=("q_prj",)), seeds=[0]):
            pass


def test_unreadable_architecture_names_what_is_missing_and_the_row_to_add():
    model = ToyForCausalLM(ToyConfig(vocab_size=50, hidden_size=8, num_attention_heads=2))
    model.body.ln_out = nn.Identity()
    with pytest.raises(ValueError) as info:
        arch_for(model)
    msg = str(info.value)
    assert "final norm" in msg and "register_architecture('iclit-toy', ArchSpec(" in msg
    assert "layers='blocks'" in msg and "final_norm='<final_norm>'" in msg and "query='wq'" in msg

    class Flat(nn.Module):  # no blocks at all, no config
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(
        ValueError, match=r"Flat \(no config.model_type\).* the blocks .*register_architecture\('<model_type>'"
    ):
        arch_for(Flat())


# --- capture -----------------------------------------------------------------------------------


def test_capture_equals_output_hidden_states(lm, task):
    """Padded batches through the hooks equal each prompt's own forward with
    ``output_hidden_states``; the last state is after the final norm (``final_norm_of``'s
    output, what the LM head reads); label log-probabilities are the model's."""
    model, tok = lm.model, lm.tokenizer
    prompts = queries(task, 3) + ["Hi", task.template.icl_prompt(task.examples[:2], task.examples[30])]
    labels = label_token_ids(tok, [task.template.answer(label) for label in task.labels])
    got = capture(model, tok, prompts, batch_size=3, label_ids=labels)
    ref = capture(model, tok, prompts, batch_size=3, label_ids=labels, reference=True)
    normed = []
    hook = final_norm_of(model).register_forward_hook(lambda m, a, out: normed.append(out[0, -1]))
    try:
        for i, p in enumerate(prompts):
            enc = tok(p, return_tensors="pt")
            with torch.no_grad():
                out = model(**enc, output_hidden_states=True)
            want = torch.stack([h[0, -1] for h in out.hidden_states])
            assert got.states[i].shape == (lm.n_layers + 1, lm.hidden_size)
            torch.testing.assert_close(got.states[i], want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ref.states[i], want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(normed[-1], want[-1], atol=1e-6, rtol=0)
            logits = lm_head_logits(model, want[-1])
            torch.testing.assert_close(logits, out.logits[0, -1], atol=1e-5, rtol=1e-5)
            logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)[labels]
            torch.testing.assert_close(got.label_logprobs[i], logp, atol=1e-5, rtol=1e-5)
    finally:
        hook.remove()


def test_prefix_cached_icl_equals_uncached(lm, task, monkeypatch):
    """One key/value cache per demonstration set, copied per batch of its queries (positions
    continuing from the prefix; sliding-window caches where the prompts outgrow the window)."""
    import iclit.engine.capture as capture_module

    sets = [task.examples[0:2], task.examples[2:4]]
    qs = task.examples[20:23]
    prompts = [task.template.icl_prompt(d, q) for d in sets for q in qs]
    prefixes = [task.template.icl_prefix(d) for d in sets for _ in qs]
    lengths = []
    real = capture_module.prefix_cache
    monkeypatch.setattr(capture_module, "prefix_cache", lambda m, ids: lengths.append(len(ids)) or real(m, ids))
    cached = capture(
        lm.model, lm.tokenizer, prompts, prefixes=prefixes, batch_size=2, span_from=[len(p) - 10 for p in prompts]
    )
    assert len(lengths) == 2 and min(lengths) > 50  # the cached path ran, with long prefixes
    plain = capture(lm.model, lm.tokenizer, prompts, batch_size=2, span_from=[len(p) - 10 for p in prompts])
    torch.testing.assert_close(cached.states, plain.states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached.pooled, plain.pooled, atol=1e-5, rtol=1e-5)


# --- tuning ------------------------------------------------------------------------------------


def test_batched_lora_equals_sequential_peft(lm, family, task):
    """Two adapters trained together (shared instruction prefix, batched forward/backward)
    against each trained alone by plain PEFT with transformers' ``labels=`` loss: the same
    adapter weights, losses and states (test_multilora's tolerances)."""
    model, tok = lm.model, lm.tokenizer
    recipe = TuningRecipe(lr=1e-2, epochs=3)
    sets, qs = pair_sets(task), queries(task)
    assert shared_prefix_length(encode_pairs(tok, [p for ps in sets for p in ps])) >= 8  # the shared-prefix path
    ref = []
    for pairs, seed, q in zip(sets, SEEDS, qs, strict=True):
        with tuned(model, tok, pairs, recipe, seed=seed, reference=True) as (pm, res):
            weights = {
                n.replace("base_model.model.", "").replace(".default.weight", ""): p.detach().clone()
                for n, p in pm.named_parameters()
                if "lora_" in n
            }
            ref.append((weights, res, capture(pm, tok, [q]).states[0]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with tuned_many(model, tok, sets, recipe, seeds=SEEDS) as (m, router, results):
        modules = {n: mod for n, mod in m.named_modules() if isinstance(mod, MultiLoRALinear)}
        assert {n.rsplit(".", 1)[-1] for n in modules} == set(EXPECTED_TARGETS[family])
        states = capture(m, tok, qs, before_batch=lambda rows: router.set(rows)).states
        for j, (weights, res, ref_states) in enumerate(ref):
            np.testing.assert_allclose(results[j].losses, res.losses, rtol=1e-4, atol=1e-5)
            assert results[j].final_loss == pytest.approx(res.final_loss, rel=1e-4, abs=1e-5)
            torch.testing.assert_close(states[j], ref_states, atol=1e-4, rtol=1e-4)
            assert len(weights) == 2 * len(modules)
            for name, mod in modules.items():
                # test_multilora's 2e-5, but 1e-4 on A: Adam turns float rounding of near-zero
                # gradients into weight differences (GPT-2's second adapter: 3.4e-5 on an AVX-512
                # machine, 5.8e-5 on an AVX2 one; 1.2e-5 between PEFT with and without the fast
                # loss; in float64 all paths agree to 1e-7)
                torch.testing.assert_close(mod.lora_A[j], weights[f"{name}.lora_A"], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(mod.lora_B[j], weights[f"{name}.lora_B"], atol=2e-5, rtol=1e-4)
        assert results[0].losses[-1] < results[0].losses[0]
    assert not any(isinstance(mod, MultiLoRALinear) for mod in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fast_loss_equals_the_whole_forward(lm, method):
    """Last block's feed-forward at the answer positions only + the chunked head (the library
    path for a trained or soft-capped head): the same losses and gradients as the decoder run
    whole and the logits built."""
    from peft import get_peft_model

    pairs = [
        ("Review: A warm, funny film.\nSentiment:", " positive"),
        ("Review: The plot makes no sense at all.\nSentiment:", " negative and dull"),
    ]
    batch = encode_pairs(lm.tokenizer, pairs)
    if method == "full":
        model = copy.deepcopy(lm.model).requires_grad_(True)
    else:
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(lm.model), lora_config(TuningRecipe(), lm.model))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_()
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = decoder_of(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    rows = hidden.flatten(0, 1)[batch.predict_at]
    ref = nn.functional.cross_entropy(lm_head_logits(model, rows).float(), batch.targets, reduction="none")
    ref_grads = torch.autograd.grad(ref.mean(), params)
    last = layers_of(model)[-1]
    mlp_name = arch_for(model).mlp
    mlp = getattr(last, mlp_name, None)
    with last_block_rows(model, batch.predict_at):
        assert mlp is None or getattr(last, mlp_name) is not mlp  # the trimming is in place
    got = answer_token_losses(model, batch)
    got_grads = torch.autograd.grad(got.mean(), params)
    assert mlp is None or getattr(last, mlp_name) is mlp
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        head_cross_entropy(model, rows.detach(), batch.targets, chunk=64), ref.detach(), atol=1e-5, rtol=1e-5
    )
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4)


def test_full_finetuning_and_dose_steps(lm, task):
    model, tok = lm.model, lm.tokenizer
    q = queries(task, 1)
    base = capture(model, tok, q).states
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}
    recipe = TuningRecipe(method="full", lr=1e-3, epochs=3, capture_steps=(1, 3))
    with tuned(
        model,
        tok,
        pair_sets(task, 1)[0],
        recipe,
        seed=0,
        on_step=lambda s, m: seen.setdefault(s, capture(m, tok, q).states),
    ) as (clone, result):
        final = capture(clone, tok, q).states
    assert sorted(seen) == [1, 3] and torch.equal(seen[3], final)
    assert len(result.losses) == 3 and np.isfinite(result.final_loss) and result.final_loss < result.losses[0]
    assert not torch.allclose(final, base)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- every arm of the engine -------------------------------------------------------------------

BASELINES = ("centered", "shuffled", "update", "noise_ceiling", "query_mean")


def test_every_arm_runs(lm, task, draws):
    recipe = TuningRecipe(lr=1e-2, epochs=2, capture_steps=(1, 2))
    out = evaluate(lm, task, draws, recipe=recipe, baselines=BASELINES)
    shape = (len(draws), lm.n_layers + 1, lm.hidden_size)
    for arm in ("anchor", "icl", "it", "it_seed2"):
        assert out.states[state_name(arm)].shape == shape
        assert out.states[state_name(arm, qmean=True)].shape == shape
        assert len(out.scores[arm]) == len(draws)
    for step in (1, 2):
        assert out.states[state_name("it", step=step)].shape == shape
    torch.testing.assert_close(out.states["it:step2"], out.states["it"])
    assert out.states["reference_mean"].shape == shape[1:]
    assert all(torch.isfinite(t).all() for t in out.states.values())
    assert len(out.trials) == len(draws)
    # and every baseline's similarity comes out of those states (the analysis needs no model)
    from iclit.analysis.similarity import baseline_cosines

    arms = {a: out.states[a] for a in ("anchor", "icl", "it", "it_seed2")}
    pooled = {a: out.states[state_name(a, qmean=True)] for a in arms}
    sims = baseline_cosines(arms, BASELINES, reference_mean=out.states["reference_mean"], pooled=pooled)
    assert {"icl_it_centered", "icl_it_shuffled", "update_cosine", "it_it_seed", "icl_it_qmean"} <= set(sims)
    assert all(v.shape == shape[:2] and torch.isfinite(v).all() for v in sims.values())


def test_full_finetuning_embedding_rows_are_autograds_bits(lm, task, monkeypatch):
    """The input table's gradient taken as the rows of the tokens seen (iclit's default for
    full fine-tuning) tunes to the same bits as autograd's dense embedding backward: tied head
    or not, padding row or not (the batches are right-padded)."""
    import iclit.tuning.peft_path as peft_path
    from iclit.tuning import embedding_rows

    routed = []
    lookup = embedding_rows._Lookup.apply
    monkeypatch.setattr(embedding_rows._Lookup, "apply", lambda *a: routed.append(1) or lookup(*a))
    recipe = TuningRecipe(method="full", lr=1e-3, epochs=3)

    def run() -> tuple[dict[str, torch.Tensor], list[float]]:
        with tuned(lm.model, lm.tokenizer, pair_sets(task, 1)[0], recipe, seed=0) as (clone, result):
            return {n: p.detach().clone() for n, p in clone.named_parameters()}, result.losses

    rows, rows_losses = run()
    assert len(routed) == recipe.epochs  # one lookup per step went through the rows path
    monkeypatch.setattr(peft_path, "embedding_rows_grad", lambda model: contextlib.nullcontext(lambda: None))
    dense, dense_losses = run()
    assert len(routed) == recipe.epochs
    assert rows.keys() == dense.keys()
    assert [n for n in rows if not torch.equal(rows[n], dense[n])] == []
    assert rows_losses == dense_losses


def test_every_arm_runs_with_full_finetuning(lm, task, draws):
    out = evaluate(lm, task, draws[:2], recipe=TuningRecipe(method="full", epochs=2), baselines=("noise_ceiling",))
    assert out.states["it"].shape == (2, lm.n_layers + 1, lm.hidden_size)
    assert not torch.allclose(out.states["it"], out.states["anchor"])


# --- GPT-2's Conv1D in the batched adapter -------------------------------------------------------


def test_multilora_on_conv1d_matches_formula():
    base = Conv1D(5, 6)  # nf=5 out, nx=6 in: weight [6, 5]
    router = AdapterRouter()
    layer = MultiLoRALinear(base, n=2, rank=3, alpha=6.0, dropout=0.0, router=router)
    assert (layer.in_features, layer.out_features) == (6, 5)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = torch.randn(2, 4, 6)
    router.set([1, 0])
    y = layer(x)
    for row, a in enumerate([1, 0]):
        expected = x[row] @ base.weight + base.bias + 2.0 * x[row] @ layer.lora_A[a].T @ layer.lora_B[a].T
        torch.testing.assert_close(y[row], expected)


# --- bfloat16 (the GPU default) on CPU -------------------------------------------------------------


@pytest.mark.parametrize("bf16_family", ["llama", "gpt2", "gemma3_text"])
def test_bfloat16_capture_and_one_lora_step(bf16_family, tiny_tokenizer, task):
    model = build(bf16_family, len(tiny_tokenizer)).to(torch.bfloat16)
    lm = prepare(model, tiny_tokenizer, name=f"tiny-{bf16_family}", device="cpu")
    tok = lm.tokenizer
    qs = queries(task)
    got = capture(model, tok, qs, batch_size=2).states
    for i, p in enumerate(qs):
        with torch.no_grad():
            out = model(**tok(p, return_tensors="pt"), output_hidden_states=True)
        want = torch.stack([h[0, -1] for h in out.hidden_states]).float()
        torch.testing.assert_close(got[i], want, atol=2e-2, rtol=2e-2)
    recipe = TuningRecipe(lr=1e-2, epochs=1)
    sets = pair_sets(task)
    with tuned(model, tok, sets[0], recipe, seed=SEEDS[0]) as (_, alone):
        pass
    with tuned_many(model, tok, sets, recipe, seeds=SEEDS) as (m, router, results):
        assert all(mod.lora_A.dtype == torch.float32 for mod in m.modules() if isinstance(mod, MultiLoRALinear))
        states = capture(m, tok, qs, before_batch=lambda rows: router.set(rows)).states
    assert torch.isfinite(states).all()
    assert results[0].losses[0] == pytest.approx(alone.losses[0], rel=2e-2)
    assert results[0].final_loss == pytest.approx(alone.final_loss, rel=5e-2)
