"""Test configuration: Triton kernels run through the interpreter on CPU-only machines, and
tests marked ``cuda`` skip without a GPU."""

import os

import pytest
import torch

# Triton reads this when its kernels are defined, so it must be set before fastrob is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastrob  # noqa: E402  (after TRITON_INTERPRET)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits():
    """The scikit-learn digits set, split once per test session."""
    return fastrob.data.load_digits()
