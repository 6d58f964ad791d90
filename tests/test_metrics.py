"""Metrics against analytic references: ARA on linear classifiers, the KL bound against random
points, the accuracy curve against per-eps robust accuracy."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from train_loop import fit

import fastrob.attacks as fa
from fastrob.metrics import accuracy_curve, ara, ara_from_radii, kl_robustness, robust_accuracy
from fastrob.models import MLP


def linear_two_class(d=16, n=200, seed=0, flip=0.1):
    """A 2-class linear model z = W x + b on [n, 1, 4, 4] inputs in [0.3, 0.7], with the analytic
    minimal L2 distance to its boundary |w·x + c| / ‖w‖ (w = W1 - W0, c = b1 - b0), and labels
    with a fraction ``flip`` of clean errors."""
    g = torch.Generator().manual_seed(seed)
    side = int(math.isqrt(d))
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(2, d, generator=g))
        model[1].bias.zero_()
    w = (model[1].weight[1] - model[1].weight[0]).detach()
    x = 0.3 + 0.4 * torch.rand(n, 1, side, side, generator=g)
    # centre the boundary on the data so that margins spread on both sides
    with torch.no_grad():
        model[1].bias[1] = -(x.flatten(1) @ w).median()
    margin = (x.flatten(1) @ w + model[1].bias[1] - model[1].bias[0]).detach()
    y = (margin > 0).long()
    flipped = torch.rand(n, generator=g) < flip
    y[flipped] = 1 - y[flipped]
    distance = margin.abs() / w.norm()
    radius = torch.where(flipped, torch.zeros(n), distance / math.sqrt(d))
    # the straight path to the boundary stays inside [0, 1], so the box does not change the answer
    step = (distance[:, None] * w.abs().max() / w.norm()).max()
    assert float(step) < 0.3
    return model.eval(), x, y, radius.detach()


def test_ara_from_radii_is_the_exact_step_integral():
    # acc = 1, .75, .5, .25 on [0,1), [1,2), [2,3), [3,4); minus 1/2: .5 + .25 = .75
    assert ara_from_radii(torch.tensor([4.0, 1.0, 3.0, 2.0]), 2) == pytest.approx(0.75)
    # 10 classes: every height above 0.1 counts
    assert ara_from_radii(torch.tensor([1.0, 1.0]), 10) == pytest.approx(0.9)
    assert ara_from_radii(torch.zeros(5), 3) == 0.0


@pytest.mark.parametrize("kind", ["attack", "btr"])
def test_ara_on_a_linear_classifier_matches_the_analytic_area(kind):
    model, x, y, radius = linear_two_class()
    result = ara(model, (x, y), n=len(y), kind=kind, max_rmse=0.25, search_steps=14, quiet=True)
    expected = ara_from_radii(radius, 2)
    assert expected > 0.002
    assert result.ara == pytest.approx(expected, rel=0.03)
    # per sample too: clean errors at 0, the rest at the analytic RMSE distance
    assert torch.allclose(result.radii, radius, atol=2e-3)
    assert result.num_classes == 2 and len(result.radii) == len(y)


def test_ara_counts_clean_errors_as_zero_and_reads_loaders():
    model, x, y, radius = linear_two_class(flip=0.5)
    loader = DataLoader(TensorDataset(x, y), batch_size=37)
    result = ara(model, loader, n=150, max_rmse=0.25, search_steps=12, quiet=True)
    assert len(result.radii) == 150
    assert torch.equal(result.radii == 0, radius[:150] == 0)
    assert result.ara == pytest.approx(ara_from_radii(radius[:150], 2), rel=0.03)


@pytest.fixture(scope="module")
def digits_mlp(digits):
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, activation_name="softplus")
    fit(model, digits.x_train, digits.y_train, epochs=15)
    return model.eval()


def test_kl_bound_is_monotone_in_eps_and_above_random_points(digits_mlp, digits):
    x, y = digits.x_test[:200], digits.y_test[:200]
    means = []
    for eps in (0.02, 0.05, 0.1, 0.2):
        result = kl_robustness(digits_mlp, (x, y), eps, norm="linf", steps=10, quiet=True)
        means.append(result.mean)
        # the KL at 16 uniform random points of the Linf ball, per sample the largest
        with torch.no_grad():
            p = F.softmax(digits_mlp(x), 1)
            g = torch.Generator().manual_seed(1)
            points = [(x + eps * (2 * torch.rand(x.shape, generator=g) - 1)).clamp(0, 1) for _ in range(16)]
            random_kl = torch.stack(
                [F.kl_div(F.log_softmax(digits_mlp(pt), 1), p, reduction="none").sum(1) for pt in points]
            ).amax(0)
        assert result.mean >= random_kl.mean()
        assert (result.values >= random_kl - 1e-6).float().mean() >= 0.97
        assert len(result.values) == 200 and result.quantiles["q10"] <= result.quantiles["q90"]
    assert means == sorted(means) and means[-1] > 10 * means[0]


def test_kl_bound_is_zero_at_eps_zero(digits_mlp, digits):
    result = kl_robustness(digits_mlp, (digits.x_test[:20], digits.y_test[:20]), 0.0, quiet=True)
    assert result.mean == 0.0


def test_accuracy_curve_equals_per_eps_robust_accuracy_where_compaction_is_exact():
    # 2-class linear model, no random start: the sign-gradient path is the same for every eps, so
    # a sample fooled at a small eps is fooled at every larger one and compaction changes nothing
    model, x, y, _ = linear_two_class(n=300)
    eps_list = [0.2, 0.01, 0.05, 0.1]
    curve = accuracy_curve(model, (x, y), eps_list, "linf", steps=10, random_start=False, batch_size=64, quiet=True)
    assert curve.eps == sorted(eps_list)
    for eps, acc in zip(curve.eps, curve.accuracy):
        attack = fa.PGD(model, eps=eps, alpha=2.5 * eps / 10, steps=10, random_start=False)
        assert acc == pytest.approx(robust_accuracy(model, (x, y), attack, quiet=True).accuracy)
    assert curve.accuracy[-1] < curve.accuracy[1] < curve.accuracy[0] < curve.clean_accuracy


def test_accuracy_curve_is_non_increasing_and_below_per_eps_attacks(digits_mlp, digits):
    data = (digits.x_test, digits.y_test)
    eps_list = [0.0, 0.03, 0.06, 0.1, 0.15, 0.3]
    curve = accuracy_curve(digits_mlp, data, eps_list, "linf", steps=10, seed=3, quiet=True)
    assert curve.accuracy[0] == pytest.approx(curve.clean_accuracy) and curve.clean_accuracy > 0.85
    assert all(a >= b for a, b in zip(curve.accuracy, curve.accuracy[1:]))
    assert curve.accuracy[-1] < 0.05 < curve.accuracy[2]
    for eps, acc in zip(curve.eps[1:4], curve.accuracy[1:4]):
        per_eps = robust_accuracy(
            digits_mlp, data, fa.PGD(digits_mlp, eps=eps, alpha=2.5 * eps / 10, steps=10), quiet=True
        ).accuracy
        assert acc <= per_eps + 0.02  # compaction only adds earlier breaks (random starts differ)
    l2 = accuracy_curve(digits_mlp, data, [0.5, 1.0, 2.0], "l2", steps=10, quiet=True)
    assert l2.accuracy == sorted(l2.accuracy, reverse=True)


def test_metrics_read_loaders_like_tensors(digits_mlp, digits):
    x, y = digits.x_test[:100], digits.y_test[:100]
    loader = DataLoader(TensorDataset(x, y), batch_size=30)
    a = accuracy_curve(digits_mlp, (x, y), [0.05], steps=5, random_start=False, quiet=True)
    b = accuracy_curve(digits_mlp, loader, [0.05], steps=5, random_start=False, quiet=True)
    assert a.accuracy == b.accuracy and b.n == 100


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda m, d: accuracy_curve(m, d, [], quiet=True), "eps_list"),
        (lambda m, d: accuracy_curve(m, d, [-0.1], quiet=True), "eps_list"),
        (lambda m, d: ara(m, d, kind="bogus", quiet=True), "kind"),
        (lambda m, d: ara(m, d, n=0, quiet=True), "n must be"),
        (lambda m, d: kl_robustness(m, d, -1.0, quiet=True), "eps"),
        (lambda m, d: robust_accuracy(m, d, "pgd", quiet=True), "attack"),
        (lambda m, d: robust_accuracy(m, d[0], fa.PGD(m), quiet=True), "data must be"),
        (lambda m, d: kl_robustness(m, (d[0], d[1][:3]), 0.1, quiet=True), "y must have shape"),
    ],
)
def test_bad_arguments_name_the_argument(digits_mlp, digits, call, words):
    with pytest.raises((ValueError, TypeError), match=words):
        call(digits_mlp, (digits.x_test[:10], digits.y_test[:10]))
