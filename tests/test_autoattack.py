"""AutoAttack: stages on still-robust points, the per-sample record, versions, custom lists, and
parity with torchattacks 3.5.1 (AutoAttack and the matched 100-iteration MultiAttack)."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_apgd import EPS, inside, robust_count  # noqa: E402

from bench.autoattack import digits_models, providers  # noqa: E402
from fastrob.attacks import APGD, PGD, AutoAttack, Square  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small models on a shared 2-core machine: one intra-op thread is many times faster."""


class _Counting(nn.Module):
    """Records the batch sizes the wrapped attack is called with."""

    def __init__(self, attack):
        super().__init__()
        self.inner, self.sizes, self.attack = attack, [], "counting"

    def forward(self, x, y):
        self.sizes.append(len(x))
        return self.inner(x, y)


def test_record_and_stages(plain, digits):
    x, y = digits.x_test[:40], digits.y_test[:40]
    first = _Counting(PGD(plain, eps=EPS, alpha=EPS / 4, steps=3))
    second = _Counting(APGD(plain, eps=EPS, steps=10))
    atk = AutoAttack(plain, eps=EPS, attacks=[("pgd3", first), ("apgd", second)], quiet=True)
    out, record = atk.run(x, y)
    assert atk.last_record is record and record.stages == ["pgd3", "apgd"]
    assert inside(out, x, EPS)
    with torch.no_grad():
        pred_clean, pred = plain(x).argmax(1), plain(out).argmax(1)
    robust = pred == y
    assert record.broken_by.count("clean") == int((pred_clean != y).sum())
    assert [b is None for b in record.broken_by] == robust.tolist()
    assert record.robust_accuracy["apgd"] == pytest.approx(robust.float().mean().item())
    # later stages only see what the earlier ones left robust
    assert first.sizes == [int((pred_clean == y).sum())]
    assert second.sizes == [first.sizes[0] - record.broken_by.count("pgd3")]
    # robust points keep the clean input
    assert torch.equal(out[robust], x[robust])


def test_outside_ball_is_not_counted(plain, digits):
    x, y = digits.x_test[:20], digits.y_test[:20]

    class TooFar:
        attack = "too-far"

        def __call__(self, xs, ys):
            return torch.clamp(xs + 0.5 * torch.randn_like(xs), 0, 1)

    _, record = AutoAttack(plain, eps=EPS, attacks=[TooFar()], quiet=True).run(x, y)
    assert "too-far" not in record.broken_by


def test_standard_version_small(plain, digits):
    x, y = digits.x_test[:24], digits.y_test[:24]
    atk = AutoAttack(plain, eps=EPS, seed=0, steps=5, n_queries=50, quiet=True)
    assert [name for name, _ in atk.stages()] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    out = atk(x, y)
    assert inside(out, x, EPS)
    assert atk.last_record.robust_accuracy["square"] == pytest.approx(robust_count(plain, out, y) / len(y))
    atk.eps, atk.norm = 0.5, "L2"
    out = atk(x, y)
    assert inside(out, x, 0.5, "L2")


def test_versions_and_bad_inputs(plain, digits):
    assert [n for n, _ in AutoAttack(plain, version="plus").stages()] == [
        "apgd-ce",
        "apgd-dlr",
        "fab",
        "square",
        "apgd-t",
        "fab-t",
    ]
    rand = AutoAttack(plain, version="rand").stages()
    assert [n for n, _ in rand] == ["apgd-ce", "apgd-dlr"] and all(a.eot_iter == 20 for _, a in rand)
    with pytest.raises(ValueError, match="version"):
        AutoAttack(plain, version="fastest")
    with pytest.raises(ValueError, match="norm"):
        AutoAttack(plain, norm="L1")
    x, y = digits.x_test[:4], digits.y_test[:4]
    atk = AutoAttack(plain, attacks=[Square(plain, n_queries=2)], quiet=True)
    with pytest.raises(ValueError, match="NaN"):
        atk(torch.full_like(x, float("nan")), y)
    with pytest.raises(ValueError, match="y must have shape"):
        atk(x, y[:1])
    atk.eps = float("nan")
    with pytest.raises(ValueError, match="eps"):
        atk(x, y)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain", "pgd", "gradpen"])
def test_parity_standard(digits, name):
    """fastrob's standard AutoAttack <= torchattacks' AutoAttack and the matched MultiAttack + 0.5 point."""
    model = digits_models(digits)[name]
    x, y = digits.x_test[:200], digits.y_test[:200]
    results = {}
    for provider, attack in providers(model, EPS).items():
        out = attack(x, y)
        if provider == "fastrob-standard":
            assert inside(out, x, EPS)
        results[provider] = robust_count(model, out, y)
    margin = int(0.005 * len(y))
    assert results["fastrob-standard"] <= results["torchattacks-matched"] + margin, results
    assert results["fastrob-standard"] <= results["torchattacks-aa"] + margin, results


def test_two_class_model_skips_the_dlr_stages():
    """Targeted DLR needs 4 classes: on a 2-class model AutoAttack still runs APGD-CE, FAB-T and Square."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    x = torch.rand(12, 1, 4, 4)
    y = model(x).argmax(1)
    atk = AutoAttack(model, norm="Linf", eps=0.3, n_classes=2, seed=0, steps=5, n_queries=20, quiet=True)
    x_adv, record = atk.run(x, y)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert "apgd-t" not in set(record.broken_by)
    # a linear 2-class model is broken by APGD-CE wherever the boundary lies within eps
    assert record.robust_accuracy["apgd-ce"] < 1.0
    assert record.robust_accuracy["square"] <= record.robust_accuracy["apgd-ce"]
