"""fastrob.attacks.fab: the exact hyperplane-box projection, minimal norm on linear models, ball and box,
parity with torchattacks.FAB, attributes, targets, model state, bad inputs."""

import copy

import pytest
import torch
import torch.nn as nn

torchattacks = pytest.importorskip("torchattacks")

from train_loop import fit  # noqa: E402

from fastrob.attacks import FAB  # noqa: E402
from fastrob.attacks.fab import project_hyperplane_box  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # small nets run faster on one thread of a loaded machine


def make_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


@pytest.fixture(scope="module")
def net(digits):
    torch.manual_seed(0)
    model = make_cnn()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    fit(model, digits.x_train, digits.y_train, epochs=12, batch=128)
    torch.set_num_threads(threads)
    model.eval()
    assert (model(digits.x_test).argmax(1) == digits.y_test).float().mean() > 0.9
    return model


def distance(a, b, norm):
    v = (a - b).flatten(1)
    return v.abs().amax(1) if norm == "Linf" else v.norm(dim=1)


def robust(model, x_adv, y):
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


# --- the projection against a generic solver ----------------------------------------------------


def test_projection_is_the_exact_minimum():
    """On tiny problems: the projection is on the hyperplane, in the box, and its norm is the optimum of
    an LP (Linf) / the minimiser of a QP (L2) solved by scipy; infeasible rows get the closest corner."""
    scipy_opt = pytest.importorskip("scipy.optimize")
    gen = torch.Generator().manual_seed(0)
    feasible_seen = infeasible_seen = 0
    for trial in range(120):
        dim = int(torch.randint(1, 6, (1,), generator=gen))
        t = torch.rand(1, dim, generator=gen, dtype=torch.float64)
        w = torch.randn(1, dim, generator=gen, dtype=torch.float64)
        if trial % 3 == 0:
            t[0, 0] = float(trial % 2)  # on the box's edge
        if trial % 5 == 0:
            w[0, -1] = 0.0  # a coordinate that cannot help
        b = (w * torch.rand(1, dim, generator=gen, dtype=torch.float64)).sum(1)
        if trial % 4 == 0:
            b = b + 2 * torch.randn(1, generator=gen, dtype=torch.float64)  # often outside the box
        tn, wn, bn = t[0].numpy(), w[0].numpy(), float(b[0])
        bounds = [(-v, 1 - v) for v in tn]
        feasible = scipy_opt.linprog([0.0] * dim, A_eq=wn[None], b_eq=[bn - wn @ tn], bounds=bounds).success
        for norm in ("Linf", "L2"):
            d = project_hyperplane_box(t, w, b, norm)[0]
            z = (t[0] + d).numpy()
            assert (z >= -1e-12).all() and (z <= 1 + 1e-12).all()
            if not feasible:
                # the box corner with the largest progress towards the hyperplane, untouched w = 0 coordinates
                corner = torch.where(w[0] == 0, t[0], (w[0] * (bn - wn @ tn) > 0).double())
                assert torch.allclose(t[0] + d, corner, atol=1e-12)
                infeasible_seen += 1
                continue
            feasible_seen += 1
            assert abs(wn @ z - bn) < 1e-9
            if norm == "Linf":
                import numpy as np

                eye = np.eye(dim)
                lp = scipy_opt.linprog(
                    np.r_[np.zeros(dim), 1.0],
                    A_ub=np.vstack([np.c_[eye, -np.ones(dim)], np.c_[-eye, -np.ones(dim)]]),
                    b_ub=np.zeros(2 * dim),
                    A_eq=np.r_[wn, 0.0][None],
                    b_eq=[bn - wn @ tn],
                    bounds=bounds + [(0, None)],
                )
                assert lp.success
                assert abs(float(d.abs().max()) - lp.fun) < 1e-7
            else:
                qp = scipy_opt.minimize(
                    lambda v: v @ v,
                    tn * 0,
                    jac=lambda v: 2 * v,
                    method="SLSQP",
                    bounds=bounds,
                    constraints=[{"type": "eq", "fun": lambda v: wn @ (tn + v) - bn, "jac": lambda v: wn}],
                    options={"ftol": 1e-14},
                )
                assert torch.allclose(d, torch.from_numpy(qp.x), atol=1e-6)  # the L2 minimiser is unique
    assert feasible_seen > 100 and infeasible_seen > 5


def test_projection_batched_rows_are_independent():
    gen = torch.Generator().manual_seed(1)
    t = torch.rand(7, 30, generator=gen, dtype=torch.float64)
    w = torch.randn(7, 30, generator=gen, dtype=torch.float64)
    b = torch.randn(7, generator=gen, dtype=torch.float64)
    for norm in ("Linf", "L2"):
        whole = project_hyperplane_box(t, w, b, norm)
        for i in range(7):
            assert torch.allclose(whole[i], project_hyperplane_box(t[i : i + 1], w[i : i + 1], b[i : i + 1], norm)[0])


# --- minimal norm on a linear model -------------------------------------------------------------


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("multi_targeted", [False, True])
def test_finds_the_exact_boundary_distance_of_a_linear_model(norm, multi_targeted):
    """For a linear classifier the distance to the nearest boundary f_j = f_y is min_j |f_j - f_y| /
    ‖w_j - w_y‖_* (dual norm) when the projection stays inside the box. FAB's linearisation is then
    exact: with an overshoot eta = 1 + 1e-4 its adversarials lie at that distance times at most
    1 + 2e-4, so every point is broken within 1.001 times the distance (and, necessarily, none
    within 0.999 times); with the default eta = 1.05 within 1.06 times."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).double()
    x = 0.4 + 0.2 * torch.rand(6, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
        y = logits.argmax(1)
        weight = model[1].weight
        gaps = logits.gather(1, y[:, None]) - logits  # f_y - f_j >= 0
        dw = weight[None] - weight[y][:, None]  # w_j - w_y  [B, C, D]
        dual = dw.abs().sum(-1) if norm == "Linf" else dw.norm(dim=-1)
        exact = (gaps / dual).scatter(1, y[:, None], float("inf")).amin(1)
    assert float(exact.max()) < 0.2  # far from the box's faces (x is in [0.4, 0.6]): the formula holds
    for eta, factor, broken in ((1 + 1e-4, 1.001, True), (1 + 1e-4, 0.999, False), (1.05, 1.06, True)):
        x_adv = torch.cat(
            [
                FAB(
                    model,
                    norm=norm,
                    eps=factor * float(exact[i]),
                    steps=3,
                    eta=eta,
                    n_classes=4,
                    multi_targeted=multi_targeted,
                )(x[i : i + 1], y[i : i + 1])
                for i in range(len(y))
            ]
        )
        fooled = ~robust(model, x_adv, y)
        assert bool(fooled.all()) if broken else not bool(fooled.any()), (eta, factor, fooled)
        if broken:
            found = distance(x_adv, x, norm)
            assert (found >= exact * (1 - 1e-9)).all() and (found <= exact * factor).all()


# --- on a trained CNN ---------------------------------------------------------------------------


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.8)])
@pytest.mark.parametrize("multi_targeted", [False, True])
def test_inside_ball_and_box_and_unchanged_when_not_broken(net, digits, norm, eps, multi_targeted):
    x, y = digits.x_test[:60], digits.y_test[:60]
    x_adv = FAB(net, norm=norm, eps=eps, steps=10, multi_targeted=multi_targeted)(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert (distance(x_adv, x, norm) <= eps * (1 + 1e-6)).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    still = robust(net, x_adv, y)
    assert 0 < int(still.sum()) < len(y)
    assert torch.equal(x_adv[still], x[still])  # robust and clean-wrong points come back unchanged
    clean_wrong = ~robust(net, x, y)
    assert torch.equal(x_adv[clean_wrong], x[clean_wrong])


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 1.0)])
@pytest.mark.parametrize("multi_targeted", [False, True])
def test_not_weaker_than_torchattacks(net, digits, norm, eps, multi_targeted):
    x, y = digits.x_test[:100], digits.y_test[:100]
    kwargs = dict(norm=norm, eps=eps, steps=10, multi_targeted=multi_targeted)
    ours = robust(net, FAB(net, **kwargs)(x, y), y).float().mean()
    theirs = robust(net, torchattacks.FAB(net, **kwargs)(x, y), y).float().mean()
    assert ours <= theirs + 0.005, (ours, theirs)


@pytest.mark.slow
@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 1.0)])
def test_not_weaker_than_torchattacks_fab_t_full(net, digits, norm, eps):
    """AutoAttack's FAB-T settings (100 steps, 9 targets) on the whole digits test set."""
    x, y = digits.x_test, digits.y_test
    kwargs = dict(norm=norm, eps=eps, steps=100, multi_targeted=True)
    ours = robust(net, FAB(net, **kwargs)(x, y), y).float().mean()
    theirs = robust(net, torchattacks.FAB(net, **kwargs)(x, y), y).float().mean()
    assert ours <= theirs + 0.005, (ours, theirs)


def test_batched_targets_equal_sequential_targets(net, digits):
    model = copy.deepcopy(net).double()
    x, y = digits.x_test[:50].double(), digits.y_test[:50]
    seq = FAB(model, eps=0.08, steps=8, multi_targeted=True, batch_targets=False)(x, y)
    bat = FAB(model, eps=0.08, steps=8, multi_targeted=True, batch_targets=True)(x, y)
    assert torch.equal(robust(model, seq, y), robust(model, bat, y))


def test_jacobian_loop_fallback_equals_the_vectorised_backward(net, digits, monkeypatch):
    """Untargeted FAB needs all C logit gradients: one vmapped backward, or C backwards where vmap fails."""
    model = copy.deepcopy(net).double()
    x, y = digits.x_test[:20].double(), digits.y_test[:20]
    vectorised = FAB(model, eps=0.1, steps=5)(x, y)
    grad = torch.autograd.grad

    def no_vmap(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("vmap: not supported by this model")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    looped = FAB(model, eps=0.1, steps=5)(x, y)
    assert torch.allclose(vectorised, looped, atol=1e-10)
    assert not torch.equal(looped, x)


def test_restarts_never_weaker_and_seeded(net, digits):
    x, y = digits.x_test[:60], digits.y_test[:60]
    one = robust(net, FAB(net, eps=0.08, steps=5)(x, y), y)
    three = FAB(net, eps=0.08, steps=5, n_restarts=3, seed=3)(x, y)
    assert (robust(net, three, y) <= one).all()
    assert torch.equal(three, FAB(net, eps=0.08, steps=5, n_restarts=3, seed=3)(x, y))


def test_attributes_take_effect(net, digits):
    x, y = digits.x_test[:40], digits.y_test[:40]
    atk = FAB(net, eps=0.1, steps=10)
    base = robust(net, atk(x, y), y).sum()
    atk.eps = 0.0
    assert torch.equal(atk(x, y), x)  # nothing is adversarial at distance 0 from correct points
    atk.eps, atk.steps = 0.3, 0
    assert torch.equal(atk(x, y), x)  # no step taken
    atk.steps = 10
    assert robust(net, atk(x, y), y).sum() < base
    atk.norm = "L2"
    assert (distance(atk(x, y), x, "L2") <= 0.3 + 1e-6).all()


def test_targeted_by_label_and_default_labels(net, digits):
    x = digits.x_test[:30]
    atk = FAB(net, eps=0.2, steps=10)
    pred = net(x).argmax(1)
    assert torch.equal(atk(x), atk(x, pred))  # labels=None: the model's predictions
    atk.set_mode_targeted_by_label()
    target = (pred + 1) % 10
    x_adv = atk(x, target)  # torchattacks' convention: labels are the targets
    assert (distance(x_adv, x, "Linf") <= 0.2 + 1e-6).all()
    assert (robust(net, x_adv, pred) < 1).any()


def test_model_state_restored(digits):
    torch.manual_seed(0)
    model = make_cnn()
    model.train()
    model[1].eval()
    FAB(model, eps=0.1, steps=3)(digits.x_test[:8], digits.y_test[:8])
    assert model.training and not model[1].training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "attr,value,error,match",
    [
        ("norm", "L1", ValueError, "norm"),
        ("eps", -1.0, ValueError, "eps"),
        ("steps", -1, ValueError, "steps"),
        ("steps", 2.5, TypeError, "steps"),
        ("n_restarts", 0, ValueError, "n_restarts"),
        ("alpha_max", 1.5, ValueError, "alpha_max"),
        ("beta", -0.1, ValueError, "beta"),
        ("eta", 0.0, ValueError, "eta"),
        ("n_classes", 1, ValueError, "n_classes must be >= 2"),  # the argument passed, not the derived one
        ("batch_targets", "yes", TypeError, "batch_targets"),
    ],
)
def test_bad_settings(net, attr, value, error, match):
    with pytest.raises(error, match=match):
        FAB(net, **{attr: value})


def test_bad_inputs(net, digits):
    x, y = digits.x_test[:4], digits.y_test[:4]
    atk = FAB(net, steps=2)
    with pytest.raises(TypeError, match="images"):
        atk(x.numpy(), y)
    with pytest.raises(TypeError, match="images"):
        atk((x * 255).long(), y)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        atk(x * 2, y)
    with pytest.raises(ValueError, match="y must have shape"):
        atk(x, y[:3])
    with pytest.raises(ValueError, match="labels in"):
        atk(x, y + 10)
    atk.eps = float("nan")
    with pytest.raises(ValueError, match="eps"):
        atk(x, y)
