"""The Lipschitz-inspired regularizer of Woods et al. 2019: the output choice, the objective
and its parameter gradients against brute force (explicit Jacobians and per-sample loops, float64),
the adaptive psi rule against a hand computation, checkpointing its state, and the digits claim
(smaller input gradients than a plain model)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_functional import MODEL_IDS, MODELS, C, assert_same_grads, make_batch, make_model, param_grads
from torch.autograd.functional import jacobian
from train_loop import fit

from fastrob import _backend
from fastrob.models import MLP
from fastrob.regularizers.lipschitz import LipschitzRegularizer, lipschitz_outputs


def draws(batch, classes, zeta, seed):
    """The documented draw order: classes first, then the margin coin."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, classes, (batch,), generator=g)
    margin = torch.rand(batch, generator=g) < zeta
    return c, margin


def brute_s(logits, y, c, margin):
    """s_b written out one sample at a time."""
    out = []
    for b in range(logits.shape[0]):
        if margin[b]:
            others = [logits[b, j] for j in range(logits.shape[1]) if j != y[b]]
            out.append(logits[b, y[b]] - torch.stack(others).max())
        else:
            out.append(logits[b, c[b]])
    return torch.stack(out)


def brute_penalty(model, x, y, c, margin, z):
    """mean |g|^z, g = d(sum_b s_b)/dx from the explicit [B, B, ...] Jacobian of s."""
    jac = jacobian(lambda xx: brute_s(model(xx), y, c, margin), x, create_graph=True)
    return jac.sum(0).abs().pow(z).mean()


def per_sample_penalty(model, x, y, c, margin, z):
    """The same from one-sample forwards: only valid when samples do not interact."""
    total = 0
    for b in range(x.shape[0]):
        xb = x[b : b + 1].clone().requires_grad_(True)
        s = brute_s(model(xb), y[b : b + 1], c[b : b + 1], margin[b : b + 1])
        (g,) = torch.autograd.grad(s.sum(), xb, create_graph=True)
        total = total + g.abs().pow(z).sum()
    return total / x.numel()


def test_outputs_follow_the_documented_draws_and_frequencies():
    torch.manual_seed(0)
    logits = torch.randn(7, C, dtype=torch.float64)
    y = torch.randint(0, C, (7,))
    y[:3] = logits[:3].argmax(1)  # where y is the top class, the margin is positive
    for zeta in (0.0, 0.2, 1.0):
        c, margin = draws(7, C, zeta, seed=3)
        s = lipschitz_outputs(logits, y, zeta, torch.Generator().manual_seed(3))
        torch.testing.assert_close(s, brute_s(logits, y, c, margin), rtol=0, atol=0)
    # frequencies: margin with probability zeta, classes uniform
    n = 20000
    logits = torch.zeros(n, 4)
    logits[:, 1] = 1.0  # z = (0, 1, 0, 0) with label 1: margin 1; class logits 0 or 1
    y = torch.ones(n, dtype=torch.long)
    logits = logits + torch.arange(4.0) * 10  # distinct values per class: 0, 11, 20, 30; margin 11 - 30 = -19
    s = lipschitz_outputs(logits, y, 0.2, torch.Generator().manual_seed(0))
    frac_margin = (s == -19).float().mean().item()
    assert abs(frac_margin - 0.2) < 4 * math.sqrt(0.2 * 0.8 / n)
    for value in (0.0, 11.0, 20.0, 30.0):
        p = 0.8 / 4
        assert abs((s == value).float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n), value


@pytest.mark.parametrize("z", [2.0, 1.5])
@pytest.mark.parametrize("spec", MODELS, ids=MODEL_IDS)
def test_objective_and_parameter_gradients_equal_brute_force(spec, z):
    model = make_model(*spec)
    x, y = make_batch(5)
    reg = LipschitzRegularizer(psi=3.0, z=z, zeta=0.5, generator=torch.Generator().manual_seed(7))
    out = reg(model, x, y)
    c, margin = draws(5, C, 0.5, seed=7)
    assert 0 < margin.sum() < 5  # both kinds of output are exercised
    expected = brute_penalty(model, x, y, c, margin, z)
    if not (spec[1] and spec[2]):  # no train-mode BatchNorm: one sample at a time gives the same
        torch.testing.assert_close(per_sample_penalty(model, x, y, c, margin, z), expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(out.penalty, expected, rtol=1e-9, atol=1e-14)
    ce = F.cross_entropy(model(x), y)
    torch.testing.assert_close(out.ce, ce, rtol=1e-12, atol=1e-12)
    expected_loss = ce + 3.0 * expected
    torch.testing.assert_close(out.loss, expected_loss, rtol=1e-9, atol=1e-12)
    assert_same_grads(param_grads(out.loss, model), param_grads(expected_loss, model))


def test_adaptive_psi_rule_by_hand():
    reg = LipschitzRegularizer()  # psi0 220, k_psi 0.02, target 1.5, eps_better 1, eps_worse 0.01
    assert reg.psi == 220.0 and reg.R == 0.0
    reg.update(3.0)  # worse than target: -ln 2 clipped to -0.01, floored at 0
    assert reg.R == 0.0
    reg.update(0.5)  # -ln(1/3) = 1.0986 clipped to +1
    assert reg.R == pytest.approx(1.0, abs=1e-15)
    reg.update(1.5 * math.exp(-0.3))  # +0.3, inside the clip
    assert reg.R == pytest.approx(1.3, abs=1e-12)
    reg.update(1.5 * math.exp(0.004))  # -0.004, inside the clip
    assert reg.R == pytest.approx(1.296, abs=1e-12)
    reg.update(100.0)  # -0.01
    assert reg.R == pytest.approx(1.286, abs=1e-12)
    reg.update(0.0)  # a perfect batch: +eps_better
    assert reg.R == pytest.approx(2.286, abs=1e-12)
    reg.update(float("nan"))  # left alone
    assert reg.R == pytest.approx(2.286, abs=1e-12)
    assert reg.psi == pytest.approx(220.0 * math.exp(0.02 * 2.286), rel=1e-12)
    reg = LipschitzRegularizer(psi0=10.0, k_psi=0.5, target_loss=2.0, eps_better=0.25, eps_worse=0.125)
    reg.update(1.0)  # -ln(0.5) = 0.693 -> 0.25
    reg.update(4.0)  # -0.693 -> -0.125
    assert reg.R == pytest.approx(0.125) and reg.psi == pytest.approx(10.0 * math.exp(0.0625))


def test_eval_mode_calls_leave_psi_alone_and_an_empty_batch_is_refused():
    model = MLP((1, 4, 4), 3, hidden=(8,), activation_name="softplus").double()
    x, y = torch.rand(8, 1, 4, 4, dtype=torch.float64), torch.arange(8) % 3
    reg = LipschitzRegularizer(target_loss=5.0)  # CE < target: a training call raises R
    reg(model.eval(), x, y)
    assert reg.R == 0.0  # a validation loss
    reg(model.train(), x, y)
    assert reg.R > 0.0
    with pytest.raises(ValueError, match="x holds no samples"):  # its mean loss would be NaN
        reg(model, x[:0], y[:0])


def test_calls_use_the_psi_before_their_update_and_resume_from_state_dict():
    torch.manual_seed(0)
    model = MLP((1, 4, 4), 3, hidden=(8,), activation_name="softplus").double()
    with torch.no_grad():
        model[-1].weight.mul_(20)  # confident logits: CE below the target for some batches
    x = torch.rand(16, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:5] = (y[:5] + 1) % 3
    reg = LipschitzRegularizer(generator=torch.Generator().manual_seed(0))
    R = 0.0
    for t in range(6):
        xb, yb = x[t % 2 * 8 : (t % 2 + 1) * 8], y[t % 2 * 8 : (t % 2 + 1) * 8]
        psi = 220 * math.exp(0.02 * R)
        assert reg.psi == pytest.approx(psi, rel=1e-12)
        out = reg(model, xb, yb)
        torch.testing.assert_close(out.loss, out.ce + psi * out.penalty)
        ce = float(F.cross_entropy(model(xb), yb).detach())
        R = max(0.0, R + min(1.0, max(-0.01, -math.log(ce / 1.5))))
        assert reg.R == pytest.approx(R, rel=1e-12)
        if t == 2:
            state = copy.deepcopy(reg.state_dict())
    assert reg.R > 0.5  # the rule did move R
    resumed = LipschitzRegularizer()
    resumed.load_state_dict(state)
    for t in range(3, 6):
        xb, yb = x[t % 2 * 8 : (t % 2 + 1) * 8], y[t % 2 * 8 : (t % 2 + 1) * 8]
        resumed(model, xb, yb)
    assert resumed.R == pytest.approx(reg.R, rel=1e-12) and resumed.psi == pytest.approx(reg.psi, rel=1e-12)
    fixed = LipschitzRegularizer(psi=5.0)
    fixed(model, x, y)
    assert fixed.psi == 5.0 and fixed.R == 0.0


def test_model_state_x_and_grads_are_left_alone():
    model = make_model("cnn", True, True)
    reference = copy.deepcopy(model)
    x, y = make_batch(6)
    x_before = x.clone()
    out = LipschitzRegularizer()(model, x, y)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(x, x_before) and not x.requires_grad and model.training
    reference(x)  # one forward's worth of running-statistics update
    for a, b in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_fused_backend_equals_torch():
    if not (torch.cuda.is_available() or _backend.triton_interpreter()):
        pytest.skip("triton cannot run here")
    model = make_model("cnn", False, True)
    x, y = make_batch()
    fused = LipschitzRegularizer(backend="triton", generator=torch.Generator().manual_seed(0))(model, x, y)
    ref = LipschitzRegularizer(backend="torch", generator=torch.Generator().manual_seed(0))(model, x, y)
    torch.testing.assert_close(fused.loss, ref.loss, rtol=1e-9, atol=1e-12)
    assert_same_grads(param_grads(fused.loss, model), param_grads(ref.loss, model))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(psi=-1.0), "psi"),
        (dict(psi0=0.0), "psi0"),
        (dict(k_psi=-0.1), "k_psi"),
        (dict(z=0), "z"),
        (dict(zeta=1.5), "zeta"),
        (dict(zeta=-0.1), "zeta"),
        (dict(target_loss=0), "target_loss"),
        (dict(eps_better=-1), "eps_better"),
        (dict(eps_worse=-1), "eps_worse"),
        (dict(backend="gpu"), "backend"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LipschitzRegularizer(**kwargs)
    with pytest.raises(ValueError, match="R"):
        LipschitzRegularizer().load_state_dict({"psi": 1.0})


# ---- digits: smaller input gradients -------------------------------------------------------------


def train_digits(digits, reg, epochs=8, batch=64):
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, hidden=(64,), activation_name="half_huber")
    fit(
        model,
        digits.x_train,
        digits.y_train,
        None if reg is None else lambda m, x, y: reg(m, x, y).loss,
        epochs=epochs,
        batch=batch,
        check_finite=True,
    )
    return model.eval()


def input_gradient_norms(model, x, y):
    """(mean ||d CE/dx||_2, mean ||d z/dx||_F) per sample, by one sample at a time."""
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    jac = torch.stack([torch.autograd.grad(model(xg)[:, c].sum(), xg)[0] for c in range(10)], 1)
    return g.flatten(1).norm(dim=1).mean().item(), jac.flatten(1).norm(dim=1).mean().item()


def test_lipschitz_regularized_model_has_smaller_input_gradients_on_digits(digits, one_thread):
    # With the defaults (psi0 = 220) the penalty holds the training CE above L_target = 1.5 on
    # digits, so R stays 0 and psi at psi0; with psi0 = 22 the CE falls below it and psi rises.
    default, weak = LipschitzRegularizer(), LipschitzRegularizer(psi0=22.0)
    models = {
        "plain": train_digits(digits, None),
        "default": train_digits(digits, default),
        "psi0=22": train_digits(digits, weak),
    }
    x, y = digits.x_test, digits.y_test
    norms = {}
    for name, m in models.items():
        with torch.no_grad():
            acc = (m(x).argmax(1) == y).float().mean().item()
        assert acc > (0.9 if name == "plain" else 0.8), (name, acc)  # every model works
        norms[name] = input_gradient_norms(m, x, y)
    ce0, jac0 = norms.pop("plain")
    for name, (ce, jac) in norms.items():
        assert jac < 0.5 * jac0 and ce < ce0, (name, jac0, jac, ce0, ce)
    assert default.R == 0.0 and default.psi == 220.0
    assert weak.R > 1.0 and weak.psi > 22.0 * math.exp(0.02)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    # zeta = 1: every output is the margin, so the random draws (device-dependent) do not matter
    model = make_model("cnn", True, True)
    x, y = make_batch(6)
    cpu = LipschitzRegularizer(psi=2.0, zeta=1.0)(copy.deepcopy(model), x, y)
    gpu_model = copy.deepcopy(model).cuda()
    gpu = LipschitzRegularizer(psi=2.0, zeta=1.0)(gpu_model, x.cuda(), y.cuda())
    torch.testing.assert_close(gpu.loss.cpu(), cpu.loss)
    gpu.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in gpu_model.parameters())


def test_bf16_autocast():
    model = make_model("cnn", True, True).float()
    x, y = make_batch(8)
    x = x.float()
    ref = LipschitzRegularizer(psi=2.0, zeta=1.0)(copy.deepcopy(model), x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = LipschitzRegularizer(psi=2.0, zeta=1.0)(model, x, y)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    torch.testing.assert_close(out.penalty, ref.penalty, rtol=0.15, atol=1e-4)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
