"""The control model ``NAME@random[:SEED]``: NAME's architecture, config and tokenizer with
freshly initialised weights. Names parse without torch; a load reads no weights file; the
same seed gives the same weights, another seed other weights."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
import torch
from test_architectures import build

from iclit.models import ModelNotFoundError, load_model
from iclit.models.loading import preview_model
from iclit.models.names import RANDOM_SUFFIX, resolve, split_random
from iclit.models.tiny import build_tiny_llama, build_tiny_tokenizer

PROMPT = "Review: The plot is thin but the actors carry it.\nSentiment:"


# --- names --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("gemma-3-270m", ("gemma-3-270m", None)),
        ("gemma-3-270m@random", ("gemma-3-270m", 0)),
        ("gemma-3-270m@random:0", ("gemma-3-270m", 0)),
        ("gemma-3-270m@random:17", ("gemma-3-270m", 17)),
        (f"gemma-3-270m@random:{2**70}", ("gemma-3-270m", 2**70)),
        ("some-org/some-model@random:3", ("some-org/some-model", 3)),
        ("tiny-random-llama@random", ("tiny-random-llama", 0)),
        ("/a@b/model", ("/a@b/model", None)),  # an @ inside a path is no suffix
    ],
)
def test_split_random(name, split):
    assert split_random(name) == split
    assert RANDOM_SUFFIX == "@random"


@pytest.mark.parametrize(
    "suffix", ["@bogus", "@random:", "@random:-1", "@random:abc", "@random:1.5", "@Random", "@random:0:1", "@random:²"]
)
def test_bad_suffix_names_the_value(suffix):
    with pytest.raises(ModelNotFoundError, match="is not '@random' or '@random:SEED'") as info:
        split_random("gemma-3-270m" + suffix)
    assert repr(suffix) in str(info.value)
    with pytest.raises(ModelNotFoundError):
        resolve("gemma-3-270m" + suffix)


def test_suffix_needs_a_base_and_comes_once():
    with pytest.raises(ModelNotFoundError, match="follows the name"):
        split_random("@random")
    with pytest.raises(ModelNotFoundError, match="one @random suffix at most"):
        split_random("tiny-random-llama@random@random:1")


def test_resolve_is_the_base_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve("tiny-random-llama@random:5") == resolve("tiny-random-llama") == ("factory", "tiny-random-llama")
    assert resolve("some-org/some-model@random") == ("hub", "some-org/some-model")
    with pytest.raises(ModelNotFoundError, match="not a model directory"):
        resolve("./nope@random")


def test_an_existing_path_with_an_at_is_taken_whole(tmp_path):
    folder = tmp_path / "model@random"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert split_random(str(folder)) == (str(folder), None)
    assert resolve(str(folder)) == ("dir", folder)


def test_spec_validation_checks_the_suffix():
    from iclit.experiments.spec import SpecError, loads_spec

    spec = loads_spec(
        "model: gemma-3-270m@random\nfactors:\n  model: [tiny-random-llama, tiny-random-llama@random:2]\n"
    )
    assert spec.model == "gemma-3-270m@random" and spec.factors["model"][1] == "tiny-random-llama@random:2"
    with pytest.raises(SpecError, match="'@bogus'") as info:
        loads_spec("model: gemma-3-270m@bogus\n")
    assert "gemma-3-270m@bogus" in str(info.value)


# --- loading --------------------------------------------------------------------------------------


def _weights(lm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def _same_shapes_other_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    varied = [k for k in a if a[k].float().std() > 0]  # norms start at constants
    assert varied and not any(torch.equal(a[k], b[k]) for k in varied)


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_factory_control():
    base = load_model("tiny-random-llama", device="cpu")
    control = load_model("tiny-random-llama@random", device="cpu")
    assert control.name == "tiny-random-llama@random"
    assert "random init, seed 0" in control.source
    assert control.model.config.to_diff_dict() == base.model.config.to_diff_dict() | {"dtype": "float32"}
    assert type(control.model) is type(base.model) and control.arch == base.arch
    assert control.tokenizer.get_vocab() == base.tokenizer.get_vocab()
    assert control.tokenizer(PROMPT).input_ids == base.tokenizer(PROMPT).input_ids
    assert not control.model.training and not any(p.requires_grad for p in control.model.parameters())
    _same_shapes_other_weights(_weights(base), _weights(control))  # tiny-random-llama is itself seed 0
    _same_weights(_weights(control), _weights(load_model("tiny-random-llama@random:0", device="cpu")))
    _same_shapes_other_weights(_weights(control), _weights(load_model("tiny-random-llama@random:1", device="cpu")))


def test_control_dtype_is_a_cast_of_fp32():
    fp32 = load_model("tiny-random-llama@random:4", device="cpu")
    bf16 = load_model("tiny-random-llama@random:4", device="cpu", dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and bf16.model.config.dtype == torch.bfloat16
    a, b = _weights(fp32), _weights(bf16)
    assert all(torch.equal(a[k].to(torch.bfloat16), b[k]) for k in a)


@pytest.fixture()
def checkpoint(tmp_path: Path, tiny_tokenizer):
    """A saved tiny gemma3_text checkpoint (tied embeddings): another architecture than LLaMA."""
    folder = tmp_path / "tiny-gemma3"
    model = build("gemma3_text", len(tiny_tokenizer))
    assert model.config.tie_word_embeddings
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_local_checkpoint_control_reads_no_weights(checkpoint: Path, tmp_path: Path):
    base = load_model(str(checkpoint), device="cpu")
    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy)
    (copy / "model.safetensors").write_bytes(b"not safetensors at all")  # a load that read it would fail
    name = f"{copy}@random"
    control = load_model(name, device="cpu")
    assert control.name == name and control.source.startswith(str(copy))
    assert control.model.config.to_diff_dict() == base.model.config.to_diff_dict()
    assert type(control.model) is type(base.model) and control.arch == base.arch
    assert control.tokenizer(PROMPT).input_ids == base.tokenizer(PROMPT).input_ids
    emb, head = control.model.get_input_embeddings().weight, control.model.get_output_embeddings().weight
    assert emb.data_ptr() == head.data_ptr()  # tied, as the config says
    _same_shapes_other_weights(_weights(base), _weights(control))
    (copy / "model.safetensors").unlink()
    _same_weights(_weights(control), _weights(load_model(name, device="cpu")))
    _same_shapes_other_weights(_weights(control), _weights(load_model(f"{copy}@random:9", device="cpu")))
    assert preview_model(name).name == name and preview_model(name).config.model_type == "gemma3_text"


def test_control_outputs_differ_from_the_trained_model(tmp_path: Path):
    tok = build_tiny_tokenizer()
    build_tiny_llama(len(tok), seed=3).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    base, control = load_model(str(tmp_path), device="cpu"), load_model(f"{tmp_path}@random:3", device="cpu")
    enc = base.tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(base.model(**enc).logits, control.model(**enc).logits)


def test_gguf_control_uses_the_cached_config(checkpoint: Path, tmp_path: Path, monkeypatch):
    """A GGUF model's control reads the dequantised checkpoint's config.json, else the
    config-only folder an earlier control load left; the GGUF file itself is not opened then."""
    from iclit.models.loading import _gguf_cache, _gguf_config_only

    monkeypatch.setenv("ICLIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF but not really")  # transformers could not parse this
    config_only = _gguf_config_only(gguf)
    shutil.copytree(checkpoint, config_only, ignore=shutil.ignore_patterns("*.safetensors"))
    control = load_model(f"{gguf}@random", device="cpu")
    assert control.source.startswith(str(config_only)) and control.model.config.model_type == "gemma3_text"
    assert preview_model(str(gguf)).config.model_type == "gemma3_text"
    # the trained model does read the (unreadable) GGUF file: transformers' GGUF reader fails on its truncated header
    with pytest.raises(struct.error):
        load_model(str(gguf), device="cpu")
    full = _gguf_cache(gguf)
    shutil.copytree(checkpoint, full)
    (full / "model.safetensors").write_bytes(b"corrupt")
    again = load_model(f"{gguf}@random", device="cpu")
    assert again.source.startswith(str(full))
    _same_weights(_weights(control), _weights(again))


def test_control_of_a_missing_config(tmp_path: Path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(f"{folder}@random", device="cpu")
