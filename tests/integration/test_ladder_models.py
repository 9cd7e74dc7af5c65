"""The size ladder's real files: Qwen2.5-Coder-0.5B/1.5B-Instruct from their part packages
(skipped when not installed: `make ladder`). The first run assembles, verifies and dequantises
them into ~/.cache/iclit (about a minute and a half for both); later runs load the cache."""

from __future__ import annotations

import hashlib

import pytest
import torch

from iclit.core.tokens import label_token_ids
from iclit.engine.capture import capture
from iclit.models import EMBEDDED, load_model
from iclit.models.arch import resolve_targets
from iclit.models.loading import resolve
from iclit.tasks import get_task
from iclit.tasks.chat import chat_frame, chat_template_of

pytestmark = pytest.mark.integration

LADDER = ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")
QWEN_HEAD = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n"
)
TAIL = "<|im_end|>\n<|im_start|>assistant\n"


def _installed(name: str) -> None:
    if not EMBEDDED[name].installed():
        pytest.skip(f"{name} is not installed: iclit models install {name}")


@pytest.mark.parametrize("name", LADDER)
def test_assembled_file_is_the_pinned_one(name):
    _installed(name)
    kind, path = resolve(name)
    split = EMBEDDED[name].split
    assert kind == "gguf" and path.stat().st_size == split.size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            digest.update(block)
    assert digest.hexdigest() == split.sha256


@pytest.mark.parametrize("name", LADDER)
def test_loads_as_qwen2_with_its_chat_template(name):
    _installed(name)
    lm = load_model(name, device="cpu")
    assert type(lm.model).__name__ == "Qwen2ForCausalLM" and lm.dtype == torch.float32
    assert sum(p.numel() for p in lm.model.parameters()) == EMBEDDED[name].parameters
    assert resolve_targets(lm.model, ("q_proj", "v_proj"))
    assert chat_frame(lm.tokenizer) == (QWEN_HEAD, TAIL)
    task = get_task("sentiment")
    chat = chat_template_of(task.template, lm.tokenizer)
    demos, query = task.examples[:2], task.examples[10]
    prompt = chat.icl_prompt(demos, query)
    labels = label_token_ids(lm.tokenizer, [chat.answer(label) for label in task.labels])
    out = capture(lm.model, lm.tokenizer, [prompt], prefixes=[chat.icl_prefix(demos)], label_ids=labels)
    assert out.states.shape == (1, lm.n_layers + 1, lm.hidden_size) and torch.isfinite(out.label_logits).all()


def test_smollm2_keeps_the_raw_format_by_default_and_frames_with_chatml():
    name = "smollm2-135m-instruct"
    if not EMBEDDED[name].installed():
        pytest.skip(f"{name} is not installed")
    lm = load_model(name, device="cpu")
    head, tail = chat_frame(lm.tokenizer)
    assert head.endswith("<|im_start|>user\n") and tail == TAIL
