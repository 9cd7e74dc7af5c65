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
