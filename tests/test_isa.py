"""ISA, the interpretability sneaking attack: one descent step against a hand-written step on the
hinge + gamma·D loss, the norms and targets it promises, the bisection grid, the hiding effect on a
digits model, the model's state and bad input."""

import copy

import pytest
import torch
from test_interpret import C, CamNet, brute_cam, make_batch
from test_interpretation import brute_discrepancy, train_digits

from fastrob.attacks.isa import _descend, isa
from fastrob.interpret import map_function


@pytest.fixture(scope="module")
def digits_model(digits):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, _ = train_digits(digits, None, epochs=3)
    finally:
        torch.set_num_threads(n)
    model.zero_grad(set_to_none=True)
    return model


def test_one_step_is_a_descent_step_on_hinge_plus_gamma_d():
    model = CamNet().eval()
    x, y = make_batch(6)
    target = (y + 1 + torch.arange(6) % (C - 1)) % C
    eps = torch.full((6,), 0.1, dtype=torch.float64)
    gamma = torch.tensor([0.0, 0.5, 1.0, 2.0, 0.3, 0.1], dtype=torch.float64)
    kappa, alpha_factor = 0.1, 0.5
    maps_clean = brute_cam(model, x).detach()
    for p in model.parameters():  # as isa's attack_context leaves them
        p.requires_grad_(False)
    out, found = _descend(
        model,
        map_function("cam"),
        x,
        y,
        target,
        maps_clean,
        None,
        eps,
        gamma,
        kappa=kappa,
        norm="linf",
        steps=1,
        alpha_factor=alpha_factor,
        kind="2class",
        random_start=False,
        generator=None,
    )
    # by hand
    xa = x.clone().requires_grad_(True)
    z = model(xa)
    loss = 0
    for b in range(6):
        t = int(target[b])
        other = max(z[b, j] for j in range(C) if j != t)
        loss = loss + torch.clamp(other - z[b, t], min=-kappa)
    loss = loss + (gamma * brute_discrepancy(maps_clean, brute_cam(model, xa), y, z, "2class")).sum()
    (g,) = torch.autograd.grad(loss, xa)
    x1 = torch.clamp(x - alpha_factor * 0.1 * g.sign(), 0, 1)  # alpha = alpha_factor * eps / steps < eps
    with torch.no_grad():
        hit0 = model(x).argmax(1) == target
        hit1 = model(x1).argmax(1) == target
    # the returned input: the start where it already hits, else the step
    expected = torch.where(hit0[:, None, None, None], x, x1)
    torch.testing.assert_close(out, expected)
    assert torch.equal(found, hit0 | hit1)


@pytest.mark.parametrize("norm, eps_max", [("linf", 0.3), ("l2", 3.0)])
def test_isa_respects_norms_and_targets(digits_model, digits, norm, eps_max, one_thread):
    model = digits_model.train()  # the attack must run in eval mode and restore this
    x, y = digits.x_test[:40], digits.y_test[:40]
    r = isa(
        model,
        x,
        y,
        eps_max=eps_max,
        norm=norm,
        gamma_max=0.5,
        steps=15,
        search_steps=4,
        generator=torch.Generator().manual_seed(0),
    )
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    assert bool((r.target != y).all()) and bool((r.target >= 0).all()) and bool((r.target < 10).all())
    assert r.x_adv.shape == x.shape and bool((r.x_adv >= 0).all()) and bool((r.x_adv <= 1).all())
    delta = (r.x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert bool((size <= eps_max * (1 + 1e-5)).all())
    ok = r.success
    assert ok.float().mean() > 0.8, ok.float().mean()
    assert bool((size[ok] <= r.eps[ok] * (1 + 1e-5) + 1e-6).all())
    with torch.no_grad():
        assert torch.equal(ok, model(r.x_adv).argmax(1) == r.target)
    # eps on the bisection grid eps_max * k / 2^4, gamma in [0, gamma_max]; NaN where failed
    k = r.eps[ok] / eps_max * 16
    torch.testing.assert_close(k, k.round(), atol=1e-4, rtol=0)
    assert bool((r.gamma[ok] >= 0).all()) and bool((r.gamma[ok] <= 0.5).all())
    assert bool(r.eps[~ok].isnan().all()) and bool(r.gamma[~ok].isnan().all())
    assert bool((r.discrepancy >= 0).all()) and r.discrepancy.shape == (40,)
    d = r.as_dict()
    assert d["n"] == 40 and d["success_rate"] == pytest.approx(float(ok.float().mean()))


def test_isa_given_targets_and_hiding(digits_model, digits, one_thread):
    model = digits_model.eval()
    x, y = digits.x_test[40:100], digits.y_test[40:100]
    target = (y + 3) % 10
    r = isa(model, x, y, target=target, eps_max=0.3, gamma_max=1.0, steps=20, search_steps=5)
    assert torch.equal(r.target, target)
    hidden = r.success & (r.gamma > 0)
    assert hidden.sum() >= 10, hidden.sum()
    # the D term hides part of the interpretation change at the same radius
    assert r.discrepancy[hidden].mean() < r.discrepancy_plain[hidden].mean()
    # and the returned D is the discrepancy of the returned input (brute force, 2-class)
    with torch.no_grad():
        expected = brute_discrepancy(model.cam(x), model.cam(r.x_adv), y, model(r.x_adv), "2class")
    torch.testing.assert_close(r.discrepancy, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(eps_max=0.0), ValueError, "eps_max"),
        (dict(eps_max=-1.0), ValueError, "eps_max"),
        (dict(norm="l1"), ValueError, "norm"),
        (dict(kappa=-0.1), ValueError, "kappa"),
        (dict(gamma_max=-1.0), ValueError, "gamma_max"),
        (dict(steps=0), ValueError, "steps"),
        (dict(kind="l2"), ValueError, "kind"),
        (dict(map="lime"), ValueError, "map"),
        (dict(random_start="unifrom"), ValueError, "random_start"),
        (dict(generator=123), TypeError, "generator"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    x, y = make_batch()
    with pytest.raises(error, match=match):
        isa(CamNet(), x, y, **kwargs)


def test_bad_targets_and_inputs():
    model = CamNet()
    x, y = make_batch()
    with pytest.raises(ValueError, match="target must differ from y"):
        isa(model, x, y, target=y.clone())
    with pytest.raises(ValueError, match=r"target must hold labels in \[0, 5\)"):
        isa(model, x, y, target=torch.full_like(y, C + 1))
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        isa(model, x + 2, y)
    headless = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(72, C)).double()
    state = copy.deepcopy(headless.state_dict())
    with pytest.raises(ValueError, match="features=.*head="):
        isa(headless, x, y)
    assert headless.training and all(p.requires_grad for p in headless.parameters())  # restored on the error
    assert all(torch.equal(a, b) for a, b in zip(state.values(), headless.state_dict().values()))
