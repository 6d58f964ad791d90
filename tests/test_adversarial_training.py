"""fastrob.adversarial_training.adversarial_loss: Madry PGD-AT, TRADES, half-and-half."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from train_loop import fit

import fastrob.attacks as fa
from fastrob.adversarial_training import adversarial_loss
from fastrob.objective import Objective


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)
    ).double()


@pytest.fixture
def data(digits):
    return digits.x_train[:32].double(), digits.y_train[:32]


class Recorder(nn.Module):
    """Records (training flag, input) of every forward call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x):
        self.calls.append((self.training, x.detach().clone()))
        return self.model(x)


def test_pgd_at_is_ce_on_the_attack_output(data):
    x, y = data
    model = make_net().train()
    attack = fa.PGD(model, eps=0.1, alpha=0.03, steps=3, random_start=False)
    ref = copy.deepcopy(model).eval()  # before the loss's train-mode forward moves BN statistics
    clean = F.cross_entropy(copy.deepcopy(model)(x), y)
    obj = adversarial_loss(model, x, y, attack, kind="pgd")
    assert isinstance(obj, Objective)
    # reference: Madry's loop, written out: attack in eval mode, loss in train mode
    x_adv = x.clone()
    for _ in range(3):
        x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(ref(x_adv), y), x_adv)
        x_adv = torch.clamp(x + torch.clamp(x_adv.detach() + 0.03 * g.sign() - x, -0.1, 0.1), 0, 1)
    ref.train()
    expected = F.cross_entropy(ref(x_adv), y)
    torch.testing.assert_close(obj.loss, expected)
    torch.testing.assert_close(obj.ce, expected)
    assert obj.penalty.item() == 0.0 and obj.logits.shape == (32, 10)
    assert obj.loss > clean  # the adversarial loss is larger


def test_trades_matches_the_reference(data):
    x, y = data
    model = make_net().train()
    beta, eps, step, steps = 6.0, 0.1, 0.03, 4
    attack = fa.PGD(model, eps=eps, alpha=step, steps=steps)
    torch.manual_seed(5)
    obj = adversarial_loss(model, x, y, attack, kind="trades", beta=beta)
    # Zhang et al.'s trades_loss (yaodongyu/TRADES), in its own words
    ref = make_net().eval()  # the same initial weights and BN statistics as ``model``
    torch.manual_seed(5)
    x_adv = x.detach() + 0.001 * torch.randn(x.shape, dtype=x.dtype).detach()
    p_nat = F.softmax(ref(x), dim=1)
    for _ in range(steps):
        x_adv.requires_grad_()
        loss_kl = nn.KLDivLoss(reduction="sum")(F.log_softmax(ref(x_adv), dim=1), p_nat)
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    ref.train()
    logits = ref(x)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / len(x)) * nn.KLDivLoss(reduction="sum")(
        F.log_softmax(ref(x_adv), dim=1), F.softmax(ref(x), dim=1)
    )
    torch.testing.assert_close(obj.ce, loss_natural)
    torch.testing.assert_close(obj.penalty, loss_robust)
    torch.testing.assert_close(obj.loss, loss_natural + beta * loss_robust)
    assert obj.penalty > 1e-4


def test_half_and_half_perturbs_the_first_half_only(data):
    x, y = data
    rec = Recorder(make_net()).train()
    attack = fa.PGD(rec, eps=0.2, alpha=0.1, steps=2, random_start=False)
    obj = adversarial_loss(rec, x, y, attack, kind="half")
    training_calls = [inp for mode, inp in rec.calls if mode]
    assert len(training_calls) == 1  # one forward in train mode: the loss, on the mixed batch
    mixed = training_calls[0]
    assert torch.equal(mixed[16:], x[16:])
    assert (mixed[:16] - x[:16]).abs().amax() == pytest.approx(0.2, abs=1e-9)
    assert all(not mode for mode, inp in rec.calls[:-1])  # the attack ran in eval mode
    torch.testing.assert_close(obj.loss, F.cross_entropy(obj.logits, y))


@pytest.mark.parametrize("kind", ["pgd", "trades", "half"])
def test_batchnorm_statistics_see_only_the_loss_forwards(data, kind):
    x, y = data
    model = make_net().train()
    rec = Recorder(model)
    attack = fa.PGD(rec, eps=0.1, alpha=0.05, steps=2)
    before = copy.deepcopy(model)
    obj = adversarial_loss(rec, x, y, attack, kind=kind)
    train_inputs = [inp for mode, inp in rec.calls if mode]
    assert len(train_inputs) == (2 if kind == "trades" else 1)
    for inp in train_inputs:  # replay only the train-mode forwards on the untouched copy
        before(inp)
    torch.testing.assert_close(model[1].running_mean, before[1].running_mean)
    torch.testing.assert_close(model[1].running_var, before[1].running_var)
    assert model.training and rec.training
    obj.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_arguments(data):
    x, y = data
    model = make_net()
    attack = fa.PGD(model)
    with pytest.raises(ValueError, match="kind"):
        adversarial_loss(model, x, y, attack, kind="mart")
    with pytest.raises(ValueError, match="beta"):
        adversarial_loss(model, x, y, attack, kind="trades", beta=-1.0)
    with pytest.raises(TypeError, match="attack"):
        adversarial_loss(model, x, y, "pgd")
    with pytest.raises(ValueError, match="y"):
        adversarial_loss(model, x, y[:5], attack)


def test_pgd_training_makes_a_digits_net_more_robust(digits):
    """End to end: a few epochs of PGD-AT raise robust accuracy over standard training."""
    x, y, xt, yt = digits
    results = {}
    for kind in ("clean", "pgd"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        attack = fa.PGD(model, eps=0.1, alpha=0.04, steps=3)
        fit(
            model,
            x,
            y,
            None if kind == "clean" else lambda m, xb, yb: adversarial_loss(m, xb, yb, attack).loss,
            epochs=8,
            lr=1e-2,
        )
        model.eval()
        torch.manual_seed(1)
        x_adv = fa.pgd(model, xt, yt, eps=0.1, alpha=0.02, steps=10)
        with torch.no_grad():
            results[kind] = (model(x_adv).argmax(1) == yt).float().mean().item()
    assert results["pgd"] > results["clean"] + 0.1, results
