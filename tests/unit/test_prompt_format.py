"""Prompt formats for instruct models (:mod:`iclit.tasks.chat`) on the architecture grid's tiny
qwen2 with a ChatML tokenizer built here: the anchor, ICL and IT prompts follow one convention
(raw by default; ``chat``: every whole prompt one user message, the answer the start of the
assistant's reply), the prefix-cached path equals the straightforward one under it, a plan's
keys only change for ``chat``; and bf16 on the CPU equals fp32 within tolerance."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from iclit.engine.capture import capture
from iclit.engine.evaluate import evaluate
from iclit.experiments.plan import make_plan
from iclit.experiments.spec import ExperimentSpec
from iclit.models import prepare
from iclit.tasks import FramedTemplate, draw_sets, get_task
from iclit.tasks.chat import chat_frame, chat_template_of, framed_for
from iclit.tuning import TuningRecipe

CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HEAD = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
TAIL = "<|im_end|>\n<|im_start|>assistant\n"
QWEN2 = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def tiny_qwen2(tokenizer, dtype=torch.float32):
    ids = dict(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **ids, **QWEN2))
    return prepare(model.to(dtype), tokenizer, name="tiny-qwen2", device="cpu")


@pytest.fixture(scope="module")
def task():
    return get_task("sentiment")


@pytest.fixture(scope="module")
def draws(task):
    return draw_sets(task, 2, 2, 2, seed=0)  # two sets of two demonstrations, two queries each


def test_chat_frame_is_the_template_around_one_user_message(chat_tokenizer):
    assert chat_frame(chat_tokenizer) == (HEAD, TAIL)
    ids = chat_tokenizer(HEAD + "x" + TAIL)["input_ids"]
    assert chat_tokenizer.convert_tokens_to_ids("<|im_start|>") in ids  # special tokens are single tokens


def test_framed_prompts_share_one_convention(task, draws, chat_tokenizer):
    raw = task.template
    chat = chat_template_of(raw, chat_tokenizer)
    assert isinstance(chat, FramedTemplate) and chat.answer_sep == raw.answer_sep
    r = draws[0]
    query = chat.query(r.query.input)
    icl = chat.icl_prompt(r.demonstrations, r.query)
    assert query == HEAD + raw.query(r.query.input) + TAIL
    assert icl == HEAD + raw.icl_prompt(r.demonstrations, r.query) + TAIL  # one user message, demos inside it
    assert icl.startswith(chat.icl_prefix(r.demonstrations)) and icl.endswith(chat.query_end(r.query.input))
    assert query.startswith(chat.icl_prefix(())) and query.endswith(chat.query_end(r.query.input))
    # demonstrations keep the raw answer separator inside the message; the read-out answer starts the reply
    d = r.demonstrations[0]
    assert raw.demonstration(d) in icl and chat.demonstration(d) == raw.demonstration(d)
    assert chat.training_pair(d) == (chat.query(d.input), d.output)
    assert chat.answer("positive") == "positive" and raw.answer("positive") == " positive"
    assert framed_for("raw", raw, chat_tokenizer) is raw and framed_for("chat", None, chat_tokenizer) is None


def test_no_chat_template_is_a_clear_error(tiny_tokenizer, task):
    with pytest.raises(ValueError, match="has none.*prompt_format 'raw'"):
        chat_template_of(task.template, tiny_tokenizer)
    with pytest.raises(ValueError, match="unknown prompt format"):
        framed_for("jinja", task.template, tiny_tokenizer)


def test_every_arm_reads_the_chat_convention_and_cached_equals_uncached(chat_tokenizer, task, draws):
    lm = tiny_qwen2(chat_tokenizer)
    recipe = TuningRecipe(lr=1e-2, epochs=2)
    fast = evaluate(lm, task, draws, recipe=recipe, prompt_format="chat")
    slow = evaluate(tiny_qwen2(chat_tokenizer), task, draws, recipe=recipe, prompt_format="chat", fast=False)
    for trial, r in zip(fast.trials, draws, strict=True):
        assert trial["query_prompt"] == HEAD + task.template.query(r.query.input) + TAIL
        assert trial["icl_prompt"].startswith(HEAD) and trial["icl_prompt"].endswith(TAIL)
        assert trial["it_training_texts"] == [
            HEAD + task.template.query(d.input) + TAIL + d.output for d in r.demonstrations
        ]
    for arm in ("anchor", "icl", "it"):
        torch.testing.assert_close(fast.states[arm], slow.states[arm], rtol=1e-4, atol=1e-4)
    # the read-out is at the assistant turn's opening: the same last token in every arm
    last = chat_tokenizer(TAIL, add_special_tokens=False)["input_ids"][-1]
    for trial in fast.trials:
        for text in (trial["query_prompt"], trial["icl_prompt"]):
            assert chat_tokenizer(text)["input_ids"][-1] == last


def test_raw_is_the_default_even_for_a_chat_model(chat_tokenizer, task, draws):
    lm = tiny_qwen2(chat_tokenizer)
    out = evaluate(lm, task, draws[:2], recipe=TuningRecipe(epochs=1))
    trial = out.trials[0]
    assert trial["query_prompt"] == task.template.query(draws[0].query.input)
    assert "<|im_start|>" not in trial["icl_prompt"] + "".join(trial["it_training_texts"])


def test_the_plan_key_changes_only_for_chat():
    base = ExperimentSpec(model="tiny-random-llama", resamples=2)
    raw = make_plan(base).cells[0]
    chat = make_plan(base.model_copy(update={"prompt_format": "chat"})).cells[0]
    assert "prompt_format" not in raw.settings and chat.settings["prompt_format"] == "chat"
    assert raw.key != chat.key
    assert ExperimentSpec(model="tiny-random-llama", resamples=2, prompt_format="raw").model_dump() == base.model_dump()


def test_bf16_on_the_cpu_equals_fp32_within_tolerance(chat_tokenizer, task, draws):
    fp32, bf16 = tiny_qwen2(chat_tokenizer), tiny_qwen2(chat_tokenizer, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    prompts = [task.template.icl_prompt(r.demonstrations, r.query) for r in draws]
    prefix = [task.template.icl_prefix(r.demonstrations) for r in draws]
    labels = torch.tensor([chat_tokenizer(" positive")["input_ids"][-1], chat_tokenizer(" negative")["input_ids"][-1]])
    a = capture(fp32.model, chat_tokenizer, prompts, prefixes=prefix, label_ids=labels)
    b = capture(bf16.model, chat_tokenizer, prompts, prefixes=prefix, label_ids=labels)
    cos = torch.nn.functional.cosine_similarity(a.states.double(), b.states.double(), dim=-1)
    assert cos.min() > 0.999
    pa, pb = torch.softmax(a.label_logits.float(), -1), torch.softmax(b.label_logits.float(), -1)
    assert (pa - pb).abs().max() < 0.02
    # the whole engine, tuning included, runs in bf16 and stays close to fp32
    recipe = TuningRecipe(lr=1e-2, epochs=2)
    o32 = evaluate(fp32, task, draws, recipe=recipe)
    o16 = evaluate(bf16, task, draws, recipe=recipe)
    for arm in ("anchor", "icl", "it"):
        c = torch.nn.functional.cosine_similarity(o32.states[arm].double(), o16.states[arm].double(), dim=-1)
        assert c.min() > 0.99, arm
    losses32 = [t["it_final_loss"] for t in o32.trials]
    losses16 = [t["it_final_loss"] for t in o16.trials]
    assert all(abs(x - y) <= 0.05 * max(1.0, abs(x)) for x, y in zip(losses32, losses16, strict=True))
