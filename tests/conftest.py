"""Shared fixtures: a tiny randomly initialised LLaMA-architecture model and a byte-level BPE
tokenizer trained in the test on iclit's own task texts (see iclit.models.tiny). No files,
no network."""

from __future__ import annotations

import pytest

from iclit.models.tiny import TINY_VOCAB, build_tiny_llama, build_tiny_tokenizer  # noqa: F401


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        help="device of the tiny-model fixtures (`tiny`, `device`): cpu (default) or cuda (benchmarks/gpu.sh)",
    )


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    """The device the tiny-model tests run on (``--device``)."""
    return str(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture()
def tiny(tiny_tokenizer, device):
    """A fresh tiny LoadedModel (fp32) per test, on ``--device`` (the CPU by default)."""
    from iclit.models import prepare

    model = build_tiny_llama(len(tiny_tokenizer))
    return prepare(model, tiny_tokenizer, name="tiny-llama", device=device)
