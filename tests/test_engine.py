"""fastrob.attacks.engine: a custom objective against closed forms, ISA's and TRADES' attacks through
the engine against hand-written loops of the reference step, restarts as a batch or a loop, and
the guards (non-finite logits, inference mode, no-grad forwards, dtypes, the meta device,
compaction when every sample is fooled)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_interpret import CamNet, make_batch
from test_interpretation import brute_discrepancy, brute_maps

import fastrob.attacks as fa
from fastrob.attacks.engine import Evaluation, ascend
from fastrob.attacks.isa import _descend
from fastrob.interpret import map_function
from fastrob.ops.pgd_step import pgd_step_reference


def mlp(classes=5, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return (
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, classes))
        .to(dtype)
        .eval()
    )


def inputs(n=8, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, generator=g, dtype=dtype), torch.randint(0, 5, (n,), generator=g)


# ---- a custom objective ------------------------------------------------------------------------


class ToPoint:
    """J = -||x' - c||² per sample: the engine must walk x' to the point of the ball nearest c."""

    def __init__(self, c):
        self.c = c

    def __call__(self, model, x_adv, rows):
        value = -(x_adv - self.c[rows]).flatten(1).pow(2).sum(1)
        return Evaluation(value, fooled=value > -0.5)


def test_custom_objective_reaches_the_projection_of_its_target():
    x, _ = inputs()
    c = torch.rand_like(x)
    eps = 0.1
    result = ascend(None, x, ToPoint(c), eps=eps, alpha=0.01, steps=40, norm="linf")
    expected = torch.minimum(torch.maximum(c, x - eps), x + eps).clamp(0, 1)  # the Linf projection of c
    torch.testing.assert_close(result.x_adv, expected, atol=0.011, rtol=0)
    assert (result.x_adv - x).abs().max() <= eps + 1e-12


def test_custom_objective_early_stop_keeps_the_first_success():
    x, _ = inputs()
    c = (x + 0.3).clamp(0, 1)
    seen = []

    class Recording(ToPoint):
        def __call__(self, model, x_adv, rows):
            ev = super().__call__(model, x_adv, rows)
            seen.append((x_adv.detach().clone(), ev.fooled.clone()))
            return ev

    result = ascend(None, x, Recording(c), eps=0.3, alpha=0.05, steps=8, norm="linf", early_stop=True)
    for b in range(len(x)):
        first = next((xa[b] for xa, f in seen if f[b]), None)
        assert bool(result.found[b]) == (first is not None)
        if first is not None:
            assert torch.equal(result.x_adv[b], first)


def test_objective_must_return_an_evaluation():
    x, _ = inputs()
    with pytest.raises(TypeError, match="Evaluation"):
        ascend(None, x, lambda m, xa, rows: xa.sum((1, 2, 3)), eps=0.1, alpha=0.1, steps=1, norm="linf")


# ---- ISA and TRADES through the engine against hand-written loops -------------------------------


def hand_isa_try(model, fn, x, y, target, maps_clean, eps, gamma, kappa, norm, steps, alpha_factor):
    """One ISA try as the paper states it: descent steps on hinge + gamma·D with the reference step,
    keeping the successful iterate of least D (gamma > 0) or the first success."""
    alpha = alpha_factor * eps / steps
    x_adv, best = x.clone(), x.clone()
    best_d = torch.full((len(x),), float("inf"), dtype=torch.float64)
    found = torch.zeros(len(x), dtype=torch.bool)
    use_maps = bool((gamma > 0).any())
    for k in range(steps + 1):
        xa = x_adv.clone().requires_grad_(True)
        if use_maps:
            ma, z = fn(model, xa, None, create_graph=True)
            d = brute_discrepancy(maps_clean, ma, y, z, "2class")
        else:
            z = model(xa)
            d = torch.zeros(len(x), dtype=torch.float64)
        others = z.masked_fill(F.one_hot(target, z.shape[1]).bool(), float("-inf")).amax(1)
        loss = torch.clamp(others - z.gather(1, target[:, None]).squeeze(1), min=-kappa) + gamma * d
        hit = z.argmax(1) == target
        better = hit & ((d.detach() < best_d) if use_maps else ~found)
        best[better], best_d[better] = x_adv[better], d.detach()[better]
        found |= hit
        if k == steps:
            break
        (g,) = torch.autograd.grad(loss.sum(), xa)
        x_adv = pgd_step_reference(x_adv, -g, x, alpha=alpha, eps=eps, norm=norm)
    return torch.where(found.view(-1, 1, 1, 1), best, x_adv), found


@pytest.mark.parametrize("norm,eps", [("linf", 0.4), ("l2", 1.2)])
@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_isa_try_equals_hand_written_loop(norm, eps, gamma):
    torch.manual_seed(0)  # a smooth MLP with saliency maps: the D term has a useful gradient
    model = (
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.Softplus(), torch.nn.Linear(32, 5))
        .double()
        .eval()
    )
    x, y = inputs(6)
    with torch.no_grad():
        target = (model(x).argmax(1) + 1) % 5
    fn = map_function("saliency")
    maps_clean = fn(model, x, None, create_graph=False)[0].detach()
    eps_t = torch.full((6,), eps, dtype=torch.float64)
    gamma_t = torch.full((6,), gamma, dtype=torch.float64)
    got, ok = _descend(
        model,
        fn,
        x,
        y,
        target,
        maps_clean,
        None,
        eps_t,
        gamma_t,
        kappa=0.1,
        norm=norm,
        steps=6,
        alpha_factor=2.5,
        kind="2class",
        random_start=False,
        generator=None,
    )
    expected, ok_ref = hand_isa_try(model, fn, x, y, target, maps_clean, eps_t, gamma_t, 0.1, norm, 6, 2.5)
    assert torch.equal(ok, ok_ref) and bool(ok.any())
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


def test_trades_perturb_equals_hand_written_loop():
    model = mlp()
    x, _ = inputs()
    eps, alpha, steps = 0.1, 0.03, 5
    got = fa.trades_perturb(model, x, eps=eps, alpha=alpha, steps=steps, generator=torch.Generator().manual_seed(4))
    p = F.softmax(model(x), 1).detach()
    g = torch.Generator().manual_seed(4)
    x_adv = x + torch.clamp(0.001 * torch.empty_like(x).normal_(generator=g), -eps, eps)  # the TRADES start
    for _ in range(steps):
        xa = x_adv.clone().requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(xa), 1), p, reduction="sum")
        (grad,) = torch.autograd.grad(kl, xa)
        x_adv = pgd_step_reference(x_adv, grad, x, alpha=alpha, eps=eps)
    torch.testing.assert_close(got, x_adv, atol=1e-12, rtol=0)


def test_int_adv_perturb_equals_brute_force():
    from test_interpretation import brute_attack

    from fastrob.regularizers.interpretation import InterpretationRegularizer

    model = CamNet().double().eval()
    x, y = make_batch(4)
    x = x.double()
    reg = InterpretationRegularizer("int_adv", lam=0.5, eps=0.1, steps=3, generator=torch.Generator().manual_seed(3))
    got = reg.perturb(model, x, y, eps=0.1, alpha=0.04)
    expected = brute_attack(model, x, y, "int_adv", 0.5, 0.1, 0.04, 3, 3, "cam", "2class")
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    assert brute_maps  # the brute-force maps are the ones of test_interpretation


# ---- restarts: one batch or a loop --------------------------------------------------------------


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_restarts_batch_and_loop_agree(norm, eps):
    model = mlp()
    x, y = inputs(32)
    kw = dict(eps=eps, alpha=eps / 3, steps=4, norm=norm, restarts=3, return_fooled=True)
    a, fa_ = fa.pgd(model, x, y, restart_mode="batch", generator=torch.Generator().manual_seed(0), **kw)
    b, fb = fa.pgd(model, x, y, restart_mode="loop", generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)  # no early stop: the same pick of the restarts
    assert torch.equal(fa_, fb)
    a, fa_ = fa.pgd(
        model, x, y, restart_mode="batch", robust_only=True, generator=torch.Generator().manual_seed(0), **kw
    )
    b, fb = fa.pgd(model, x, y, restart_mode="loop", robust_only=True, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(fa_, fb)  # early stop: possibly other iterates, the same samples fooled


def test_bad_restart_mode():
    model = mlp()
    x, y = inputs()
    with pytest.raises(ValueError, match="restart_mode"):
        fa.pgd(model, x, y, restarts=2, restart_mode="parallel")


# ---- guards -------------------------------------------------------------------------------------


class NaNModel(torch.nn.Module):
    def __init__(self, when_above=None):
        super().__init__()
        self.lin = torch.nn.Linear(16, 5).double()
        self.when_above = when_above

    def forward(self, x):
        z = self.lin(x.flatten(1))
        if self.when_above is None:
            return z * float("nan")
        return torch.where((x.flatten(1).amax(1) > self.when_above)[:, None], z * float("nan"), z)


@pytest.mark.parametrize("cls", [fa.PGD, fa.PGDL2])
def test_nan_logits_raise_instead_of_nan_images(cls):
    x, y = inputs()
    with pytest.raises(ValueError, match=r"non-finite logits \(NaN or inf\)"):
        cls(NaNModel(), eps=0.5, alpha=0.1, steps=3)(x, y)


def test_nan_gradients_raise():
    x, y = inputs()
    x = torch.full_like(x, 0.5)
    model = NaNModel(when_above=0.55)  # finite logits, NaN gradient (0·NaN through the where)
    with pytest.raises(ValueError, match="non-finite .*input gradient"):
        fa.pgd(model, x, y, eps=0.2, alpha=0.1, steps=3, random_start=False, return_fooled=True)


def test_inference_mode_is_a_clear_error():
    model = mlp()
    x, y = inputs()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        fa.pgd(model, x, y)


def test_no_grad_forward_is_a_clear_error():
    class NoGrad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            with torch.no_grad():
                return self.net(x)

    x, y = inputs()
    with pytest.raises(RuntimeError, match="no_grad"):
        fa.pgd(NoGrad(), x, y, steps=2)


def test_dtype_mismatch_and_meta_device():
    x, y = inputs(dtype=torch.float32)
    with pytest.raises(TypeError, match="x has dtype float32 but the model's parameters are float64"):
        fa.pgd(mlp(), x, y)
    with pytest.raises(ValueError, match="meta"):
        fa.pgd(mlp(), torch.empty(4, 1, 4, 4, device="meta", dtype=torch.float64), None)
    with pytest.raises(ValueError, match="meta"):
        fa.pgd(mlp().to("meta"), x.double(), y)


def test_robust_only_stops_when_every_sample_is_fooled():
    model = mlp()
    x, _ = inputs()
    with torch.no_grad():
        wrong = (model(x).argmax(1) + 1) % 5  # every sample is already misclassified
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    x_adv, fooled = fa.pgd(model, x, wrong, eps=0.1, alpha=0.01, steps=10**6, robust_only=True, return_fooled=True)
    assert len(calls) <= 3  # the start and the result are evaluated; no step of the 10**6 runs
    assert bool(fooled.all()) and (x_adv - x).abs().max() <= 0.1


def test_robust_only_with_train_mode_batch_norm_and_one_survivor():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 5)
    ).double()
    x, _ = inputs(6)
    with torch.no_grad():  # train-mode predictions, as the attack will see them (BN on the batch)
        pred = copy.deepcopy(model).train()(x).argmax(1)
    labels = (pred + 1) % 5
    labels[0] = pred[0]  # one sample correct, the others already fooled: one survivor after step 0
    attack = fa.PGD(model, eps=0.05, alpha=0.01, steps=3, robust_only=True)
    attack.set_model_training_mode(model_training=True, batchnorm_training=True)
    x_adv = attack(x, labels)
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= 0.05 + 1e-12


def test_the_logits_check_names_the_samples():
    from fastrob._checks import check_logits

    logits = torch.zeros(12, 3)
    logits[1, 0], logits[3, 2] = float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"2 of 12 samples \(clean inputs\).*samples \[1, 3\]\)"):
        check_logits(logits, 12, where="clean inputs")
    logits[:, 1] = float("nan")
    with pytest.raises(ValueError, match=r"12 of 12 samples.*samples \[0, 1, 2, 3, 4, 5, 6, 7\] \.\.\.\)"):
        check_logits(logits, 12)
