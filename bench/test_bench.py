"""pytest-benchmark entry points: fastrob and its reference timed in the same process, same inputs.

    pytest bench/ --benchmark-only                   # CPU-sized inputs
    pytest bench/ --benchmark-only --benchmark-group-by=group

Not collected by the default `pytest` (testpaths is tests/). The full-sized runs that write
bench/results/<device>.csv are `fastrob bench` (python -m bench.<module>).
"""

import pytest
import torch

import fastrob.attacks as fa
from bench.attacks import small_cnn
from bench.pgd_step import eager_step
from bench.regularizers import setup as regularized_step
from fastrob.ops.pgd_step import pgd_step_unchecked

pytest.importorskip("pytest_benchmark")


@pytest.mark.parametrize("norm,eps,alpha", [("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.1)], ids=["linf", "l2"])
@pytest.mark.parametrize("provider", ["eager", "torch"])
def test_pgd_step(benchmark, provider, norm, eps, alpha):
    gen = torch.Generator().manual_seed(0)
    shape = (64, 3, 32, 32)
    x_orig = torch.rand(shape, generator=gen)
    x_adv = (x_orig + 0.01 * torch.randn(shape, generator=gen)).clamp(0, 1)
    grad = torch.randn(shape, generator=gen)
    if provider == "eager":

        def fn():
            return eager_step(x_adv, grad, x_orig, alpha, eps, norm)
    else:

        def fn():
            return pgd_step_unchecked(
                x_adv, grad, x_orig, alpha=alpha, eps=eps, norm=norm, lower=0.0, upper=1.0, backend=provider
            )

    benchmark.group = f"pgd_step_{norm} 64x3x32x32"
    out = benchmark(fn)
    torch.testing.assert_close(out, eager_step(x_adv, grad, x_orig, alpha, eps, norm))


@pytest.mark.parametrize("provider", ["input_grad_reference_eager", "input_grad_exact"])
def test_input_gradient_step(benchmark, provider):
    benchmark.group = "input_gradient training step 16x3x16x16"
    benchmark(regularized_step(provider, (16, 3, 16, 16)))


@pytest.mark.parametrize("provider", ["torchattacks", "fastrob"])
def test_pgd10(benchmark, provider):
    torch.manual_seed(0)
    model = small_cnn(3, 16).eval()
    x, y = torch.rand(32, 3, 16, 16), torch.randint(0, 10, (32,))
    if provider == "torchattacks":
        torchattacks = pytest.importorskip("torchattacks")
        attack = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=10)
    else:
        attack = fa.PGD(model, eps=8 / 255, alpha=2 / 255, steps=10)
    benchmark.group = "PGD-10 32x3x16x16"
    x_adv = benchmark(attack, x, y)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
