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


@pytest.fixture
def one_thread():
    """One intra-op thread for tests that train small nets: on a loaded 2-core machine they ran
    10-40x faster than on two contended threads (3 epochs of digits training: 7.0 s -> 0.18 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def plain(digits):
    """A digits CNN trained without any defence (bench.autoattack.digits_cnn, 12 epochs, seed 0),
    trained once per session for the evaluation-attack tests (a module may override it)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_loop
    from train_loop import fit

    from bench.autoattack import digits_cnn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = digits_cnn()
        fit(model, digits.x_train, digits.y_train, epochs=12, batch=128)
    finally:
        torch.set_num_threads(threads)
    for p in model.parameters():
        p.grad = None
    return model.eval()
