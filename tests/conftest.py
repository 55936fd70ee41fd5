"""Suite-wide settings: the test models are tiny, where one thread beats two sharing a core."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def float64():
    """float64 as the default dtype for a module's tests (the plain loops compare to ~1e-12)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
