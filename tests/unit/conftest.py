import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Unit tests run tiny models: intra-op threads gain nothing there, and on a busy machine
    OpenMP's spinning threads make them many times slower. One thread per unit-test module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    """The tiny random Llama (seed 0, fp32, CPU) as a LoadedModel, one per test module; a module
    that needs another model defines its own ``lm``."""
    from iclit.models import prepare
    from iclit.models.tiny import build_tiny_llama

    return prepare(build_tiny_llama(len(tiny_tokenizer), seed=0), tiny_tokenizer, name="tiny-llama", device="cpu")
