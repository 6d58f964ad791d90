"""Square Attack: the p schedule, parity with torchattacks 3.5.1, ball and box, modes, attributes,
input checks."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_apgd import EPS, allowed, inside, robust_count  # noqa: E402

from bench.autoattack import digits_models  # noqa: E402
from fastrob.attacks import Square  # noqa: E402
from fastrob.attacks.square import p_selection  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small models on a shared 2-core machine: one intra-op thread is many times faster."""


def test_p_schedule():
    # unscaled (10 000 queries): p_init up to iteration 10, halved after each mark
    assert [p_selection(0.8, i, 10000) for i in (0, 10, 11, 50, 51, 200, 201, 8000, 8001, 9999)] == [
        0.8,
        0.8,
        0.4,
        0.4,
        0.2,
        0.2,
        0.1,
        0.8 / 256,
        0.8 / 512,
        0.8 / 512,
    ]
    # 5000 queries: the marks come twice as early
    assert [p_selection(0.8, i, 5000) for i in (5, 6, 25, 26)] == [0.8, 0.4, 0.4, 0.2]
    assert p_selection(0.8, 11, 5000, rescale=False) == 0.4


@pytest.mark.parametrize("norm,eps", [("Linf", EPS), ("L2", 0.5)])
def test_parity_small(plain, digits, norm, eps):
    import torchattacks

    x, y = digits.x_test[:48], digits.y_test[:48]
    ours = Square(plain, norm=norm, eps=eps, n_queries=150)
    a = ours(x, y)
    b = torchattacks.Square(plain, norm=norm, eps=eps, n_queries=150)(x, y)
    assert inside(a, x, eps, norm)
    assert robust_count(plain, a, y) <= robust_count(plain, b, y) + allowed(len(y))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain", "pgd", "gradpen"])
def test_parity_full(digits, name):
    import torchattacks

    model = digits_models(digits)[name]
    x, y = digits.x_test[:200], digits.y_test[:200]
    a = Square(model, eps=EPS, n_queries=5000)(x, y)
    b = torchattacks.Square(model, eps=EPS, n_queries=5000)(x, y)
    assert inside(a, x, EPS)
    assert robust_count(model, a, y) <= robust_count(model, b, y) + int(0.005 * len(y))


def test_targeted_and_attributes(plain, digits):
    x, y = digits.x_test[:16], digits.y_test[:16]
    atk = Square(plain, eps=0.0, n_queries=20)
    assert torch.equal(atk(x, y), x)
    atk.eps, atk.n_queries = 0.3, 200
    atk.set_mode_targeted_by_label()
    target = (y + 1) % 10
    out = atk(x, target)
    assert inside(out, x, 0.3)
    with torch.no_grad():
        pred = plain(out).argmax(1)
    assert (pred == target).float().mean() > 0.3  # a large eps: most targets are reached


def test_state_and_bad_inputs(plain, digits):
    x, y = digits.x_test[:4], digits.y_test[:4]
    model = nn.Sequential(nn.Dropout(0.5), plain)
    model.train()
    out = Square(model, eps=EPS, n_queries=5)(x, y)
    assert model.training and model[0].training and inside(out, x, EPS)
    with pytest.raises(ValueError, match="NaN"):
        Square(plain)(torch.full_like(x, float("nan")), y)
    with pytest.raises(ValueError, match="NCHW"):
        Square(plain)(x.flatten(1), y)
    with pytest.raises(ValueError, match="p_init"):
        Square(plain, p_init=1.5)(x, y)
    with pytest.raises(ValueError, match="n_queries"):
        Square(plain, n_queries=-1)(x, y)
    with pytest.raises(ValueError, match="norm"):
        Square(plain, norm="L0")
    with pytest.raises(ValueError, match="y must have shape"):
        Square(plain)(x, y[:3])

    class InfModel(nn.Module):
        def forward(self, inp):
            return torch.full((len(inp), 10), float("inf"))

    with pytest.raises(ValueError, match="non-finite"):
        Square(InfModel(), n_queries=2)(x, y)
