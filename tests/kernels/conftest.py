"""Kernel tests: without CUDA, Triton kernels run under its interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before triton is imported); `@pytest.mark.gpu` tests are skipped there."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kernel_device() -> str:
    """Where Triton kernels run: cuda when present, else cpu under the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"
