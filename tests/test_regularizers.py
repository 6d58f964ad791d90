"""The regularizer classes: objective and parameter gradients against brute force (float64, small
softplus networks with and without BatchNorm, train and eval mode), the Jacobian estimator's
unbiasedness, FD convergence, the promises about the model's state, bad input, and an end-to-end
robustness test on the digits set."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_functional import (
    MODEL_IDS,
    MODELS,
    C,
    assert_same_grads,
    assert_unbiased,
    brute_input_gradient_penalty,
    brute_jacobian_penalty,
    make_batch,
    make_model,
    param_grads,
)
from test_jsigr_saliency import square_map
from train_loop import fit

import fastrob
from fastrob import _backend
from fastrob import functional as Fn
from fastrob.regularizers import InputGradientRegularizer, JacobianRegularizer, JSIGRRegularizer


def brute_objective(model, x, y, lam, penalty):
    return F.cross_entropy(model(x), y) + lam * penalty


def flat_grads(value, model):
    """The gradient of value w.r.t. all parameters as one vector (0 for those it does not use)."""
    return torch.cat(
        [
            torch.zeros_like(p).flatten() if g is None else g.flatten()
            for g, p in zip(param_grads(value, model), model.parameters())
        ]
    )


def check_objective(out, model, x, y, lam, expected_penalty):
    """out's penalty, ce, loss and the loss's gradient w.r.t. every parameter equal brute force."""
    torch.testing.assert_close(out.penalty, expected_penalty, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.ce, F.cross_entropy(model(x), y), rtol=1e-12, atol=1e-12)
    expected_loss = brute_objective(model, x, y, lam, expected_penalty)
    torch.testing.assert_close(out.loss, expected_loss, rtol=1e-9, atol=1e-12)
    assert_same_grads(param_grads(out.loss, model), param_grads(expected_loss, model))


# ---- input gradient -------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("spec", MODELS, ids=MODEL_IDS)
def test_input_gradient_exact_equals_brute_force(spec, norm):
    model = make_model(*spec)
    x, y = make_batch()
    out = InputGradientRegularizer(lam=0.3, norm=norm)(model, x, y)
    check_objective(out, model, x, y, 0.3, brute_input_gradient_penalty(model, x, y, norm))
    assert out.logits.shape == (4, C)


@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("spec", [("cnn", False, True), ("mlp", True, False)], ids=["cnn", "mlp-bn-eval"])
def test_fd_converges_to_exact(spec, norm):
    # penalty_fd = penalty + O(h), and with v held fixed its parameter gradient tends to the exact
    # one too (envelope argument, see the docstring): the errors must shrink about linearly in h.
    model = make_model(*spec)
    x, y = make_batch()
    exact = InputGradientRegularizer(lam=1.0, norm=norm)(model, x, y)
    exact_grads = flat_grads(exact.loss, model)
    errors, grad_errors = [], []
    for h in (1e-1, 1e-2, 1e-3, 1e-4):
        fd = InputGradientRegularizer(lam=1.0, norm=norm, mode="fd", h=h)(model, x, y)
        fd_grads = flat_grads(fd.loss, model)
        errors.append(abs(fd.penalty - exact.penalty).item() / exact.penalty.item())
        grad_errors.append(((fd_grads - exact_grads).norm() / exact_grads.norm()).item())
    for errs in (errors, grad_errors):
        assert all(b < a / 4 for a, b in zip(errs, errs[1:])), errs
    assert errors[-1] < 1e-3 and grad_errors[-1] < 1e-3, (errors, grad_errors)


# ---- Jacobian ---------------------------------------------------------------------------------


@pytest.mark.parametrize("batching", ["auto", "graph", "replicate"])
@pytest.mark.parametrize("spec", MODELS, ids=MODEL_IDS)
def test_jacobian_exact_equals_brute_force(spec, batching):
    model = make_model(*spec)
    x, y = make_batch()
    reg = JacobianRegularizer(lam=0.2, exact=True, batching=batching)
    if batching == "replicate" and spec[1] and spec[2]:
        with pytest.raises(ValueError, match="batching"):
            reg(model, x, y)
        return
    check_objective(reg(model, x, y), model, x, y, 0.2, brute_jacobian_penalty(model, x))


@pytest.mark.parametrize("spec", [("cnn", False, True), ("cnn", True, True)], ids=["cnn", "cnn-bn-train"])
def test_jacobian_replicated_estimator_is_unbiased(spec):
    # (the "graph" batching is the functional form, tested in test_functional.py)
    model = make_model(*spec)
    x, y = make_batch()
    reg = JacobianRegularizer(n_proj=3, batching="replicate", generator=torch.Generator().manual_seed(0))
    assert_unbiased([reg(model, x, y).penalty for _ in range(150)], brute_jacobian_penalty(model, x))


def test_jacobian_estimator_gradient_is_unbiased():
    # The estimate is linear in v v^T, so its parameter gradient is unbiased too.
    model = make_model("cnn", False, True)
    x, y = make_batch()
    exact = flat_grads(brute_jacobian_penalty(model, x), model)
    reg = JacobianRegularizer(n_proj=4, generator=torch.Generator().manual_seed(1))
    grads = torch.stack([flat_grads(reg(model, x, y).penalty, model) for _ in range(150)])
    se = grads.std(0) / grads.shape[0] ** 0.5
    used = se > 0  # the last layer's bias does not enter the Jacobian: its gradient is exactly 0
    torch.testing.assert_close(exact[~used], torch.zeros_like(exact[~used]))
    z = (grads.mean(0) - exact)[used] / se[used]
    assert used.sum() > 100 and z.abs().max() < 5.0, z.abs().max()


@pytest.mark.parametrize("spec", MODELS, ids=MODEL_IDS)
def test_jacobian_replicate_equals_graph_with_the_same_projections(spec):
    # Same projections, so the two batchings must agree to rounding, parameter gradients included:
    # with train-mode BatchNorm this checks that the copies do not leak into each other.
    model = make_model(*spec)
    x, y = make_batch()
    a = JacobianRegularizer(n_proj=3, batching="replicate", generator=torch.Generator().manual_seed(5))(model, x, y)
    b = JacobianRegularizer(n_proj=3, batching="graph", generator=torch.Generator().manual_seed(5))(model, x, y)
    torch.testing.assert_close(a.penalty, b.penalty, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-10, atol=1e-13)
    assert_same_grads(param_grads(a.loss, model), param_grads(b.loss, model))


# ---- J-SIGR -----------------------------------------------------------------------------------


def brute_saliency(model, x, y, patch, perturbation):
    """Square by square, one image at a time."""
    b, c, h, w = x.shape
    drops = {}
    with torch.no_grad():
        p0 = model(x).softmax(1)
        for r in range(0, h, patch):
            for q in range(0, w, patch):
                drops[r, q] = torch.zeros(b, dtype=x.dtype)
                for i in range(b):
                    xp = x.clone()
                    if perturbation == "mean":
                        xp[i, :, r : r + patch, q : q + patch] = x[i].mean(dim=(1, 2))[:, None, None]
                    else:
                        blurred = F.avg_pool2d(x[i : i + 1], 3, 1, 1, count_include_pad=False)[0]
                        xp[i, :, r : r + patch, q : q + patch] = blurred[:, r : r + patch, q : q + patch]
                    drops[r, q][i] = max(0.0, (p0[i, y[i]] - model(xp).softmax(1)[i, y[i]]).item())
    return square_map(drops, x, patch)


@pytest.mark.parametrize("perturbation", ["mean", "blur"])
@pytest.mark.parametrize("spec", [("cnn", False, True), ("cnn", True, False)], ids=["cnn", "cnn-bn-eval"])
def test_jsigr_saliency_term_equals_brute_force(spec, perturbation):
    # Eval mode or no BatchNorm: the brute force perturbs one image at a time, so the saliency
    # forwards must not mix samples for the two to agree.
    model = make_model(*spec)
    x, y = make_batch()
    reg = JSIGRRegularizer(lam_jacobian=0.0, lam_saliency=0.7, patch=4, perturbation=perturbation, chunk=8)
    s = brute_saliency(model, x, y, 4, perturbation)  # patch 4 on 6x6: partial squares at the border
    torch.testing.assert_close(reg.saliency(model, x, y), s)
    assert 0 < s.mean() < 1
    # J-SIGR's penalty is the weighted sum of its terms (loss = ce + penalty)
    check_objective(reg(model, x, y), model, x, y, 1.0, 0.7 * brute_input_gradient_penalty(model, x, y, weight=1 - s))


def brute_linear_saliency(model, x, y, patch, perturbation):
    """The first-order drop of p_y when square k moves toward its replacement: minus the
    directional derivative of p_y along m_k * (replacement - x), by forward-mode AD, one image and
    one square at a time."""
    b, c, h, w = x.shape
    drops = {(r, q): torch.zeros(b, dtype=x.dtype) for r in range(0, h, patch) for q in range(0, w, patch)}
    for i in range(b):
        xi = x[i : i + 1]
        if perturbation == "mean":
            replacement = xi.mean(dim=(2, 3), keepdim=True).expand_as(xi)
        else:
            replacement = F.avg_pool2d(xi, 3, 1, 1, count_include_pad=False)
        p_y = lambda z: model(z).softmax(1)[0, y[i]]  # noqa: E731
        for r, q in drops:
            direction = torch.zeros_like(xi)
            direction[..., r : r + patch, q : q + patch] = (replacement - xi)[..., r : r + patch, q : q + patch]
            _, derivative = torch.autograd.functional.jvp(p_y, xi, direction)
            drops[r, q][i] = max(0.0, -derivative.item())
    return square_map(drops, x, patch)


@pytest.mark.parametrize("perturbation", ["mean", "blur"])
@pytest.mark.parametrize("spec", [("cnn", False, True), ("cnn", True, False)], ids=["cnn", "cnn-bn-eval"])
def test_jsigr_linear_saliency_equals_forward_mode_reference(spec, perturbation):
    model = make_model(*spec)
    x, y = make_batch()
    reg = JSIGRRegularizer(
        lam_jacobian=0.0, lam_saliency=0.7, patch=4, perturbation=perturbation, saliency_estimate="linear"
    )
    s = brute_linear_saliency(model, x, y, 4, perturbation)  # patch 4 on 6x6: partial squares at the border
    assert 0 < s.mean() < 1
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    torch.testing.assert_close(reg.linear_saliency(x, g), s)
    check_objective(reg(model, x, y), model, x, y, 1.0, 0.7 * brute_input_gradient_penalty(model, x, y, weight=1 - s))


def test_jsigr_linear_saliency_refuses_a_gradient_of_another_shape():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="g its input gradient of the same shape"):
        JSIGRRegularizer(saliency_estimate="linear").linear_saliency(x, torch.rand(2, 3, 8, 7))
    with pytest.raises(ValueError, match=r"x must be images \[B, C, H, W\]"):
        JSIGRRegularizer().linear_saliency(x.flatten(1), x.flatten(1))


def test_jsigr_saliency_in_train_mode_does_not_depend_on_chunk():
    # train-mode BatchNorm: each square's forward normalises its B perturbed images with their own
    # statistics, whether the squares run one per forward (chunk = B) or all in one (chunk large)
    model = make_model("cnn", True, True)
    x, y = make_batch()
    one_square_per_forward = JSIGRRegularizer(patch=2, chunk=x.shape[0]).saliency(model, x, y)
    all_squares_in_one = JSIGRRegularizer(patch=2, chunk=4096).saliency(model, x, y)
    torch.testing.assert_close(all_squares_in_one, one_square_per_forward)
    assert model.training and 0 < one_square_per_forward.mean() < 1


def test_jsigr_jacobian_term_is_the_jacobian_penalty():
    model = make_model("cnn", True, True)
    x, y = make_batch()
    out = JSIGRRegularizer(lam_jacobian=0.5, lam_saliency=0.0, generator=torch.Generator().manual_seed(3))(model, x, y)
    xl = x.clone().requires_grad_(True)
    expected = 0.5 * Fn.jacobian_penalty(model(xl), xl, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out.penalty, expected)
    torch.testing.assert_close(out.loss, out.ce + expected)
    assert_same_grads(param_grads(out.loss, model), param_grads(F.cross_entropy(model(x), y) + expected, model))


# ---- the model's state, dtypes, shapes ----------------------------------------------------

REGULARIZERS = [
    InputGradientRegularizer(),
    InputGradientRegularizer(norm="l1", mode="fd"),
    JacobianRegularizer(),
    JacobianRegularizer(n_proj=3),
    JacobianRegularizer(n_proj=2, batching="replicate"),
    JacobianRegularizer(exact=True),
    JSIGRRegularizer(patch=2),
]
REG_IDS = ["ig-exact", "ig-fd-l1", "jac", "jac-3", "jac-2-replicate", "jac-exact", "jsigr"]


@pytest.mark.parametrize("reg", REGULARIZERS, ids=REG_IDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_model_state_x_and_grads_are_left_alone(reg, train):
    model = make_model("cnn", True, train)
    reference = copy.deepcopy(model)
    x, y = make_batch(6)
    x_before = x.clone()
    out = reg(model, x, y)
    assert all(p.grad is None for p in model.parameters()), "a parameter's .grad changed before backward"
    assert torch.equal(x, x_before) and not x.requires_grad
    reference(x)  # BatchNorm's running statistics move exactly as after one plain forward
    for a, b in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert model.training == train
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("reg", REGULARIZERS, ids=REG_IDS)
def test_x_that_requires_grad_and_odd_batch_sizes(reg):
    model = make_model("cnn", False, True)
    for batch in (1, 7):
        x, y = make_batch(batch)
        x.requires_grad_(True)
        out = reg(model, x, y)
        assert x.grad is None and out.logits.shape == (batch, C)
        out.loss.backward()
        assert x.grad is None  # the regularizer differentiates a copy of x


@pytest.mark.parametrize("reg", REGULARIZERS, ids=REG_IDS)
def test_bf16_autocast(reg):
    model = make_model("cnn", True, True).float()
    x, y = make_batch(8)
    x = x.float()
    reference = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = reg(model, x, y)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    if not isinstance(reg, JacobianRegularizer) or reg.exact:  # deterministic: compare with float32
        ref = reg(reference, x, y)
        # fd divides a difference of bf16 losses by h = 0.01, which amplifies bf16's rounding
        # (docs/regularizers.md): only the order of magnitude is expected there.
        rtol = 0.5 if getattr(reg, "mode", "") == "fd" else 0.15
        torch.testing.assert_close(out.penalty, ref.penalty, rtol=rtol, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("reg", REGULARIZERS, ids=REG_IDS)
def test_cuda_matches_cpu(reg):
    model = make_model("cnn", True, True)
    x, y = make_batch(6)
    if isinstance(reg, JacobianRegularizer) and not reg.exact:  # random: compare exact values only
        reg = JacobianRegularizer(exact=True, batching=reg.batching)
    cpu = reg(copy.deepcopy(model), x, y)
    gpu_model = copy.deepcopy(model).cuda()
    gpu = reg(gpu_model, x.cuda(), y.cuda())
    torch.testing.assert_close(gpu.loss.cpu(), cpu.loss)
    gpu.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in gpu_model.parameters())


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: InputGradientRegularizer(lam=-1.0), "lam"),
        (lambda: InputGradientRegularizer(h=0.0), "h"),
        (lambda: InputGradientRegularizer(h=-0.1), "h"),
        (lambda: InputGradientRegularizer(norm="linf"), "norm"),
        (lambda: InputGradientRegularizer(mode="exactly"), "mode"),
        (lambda: InputGradientRegularizer(backend="gpu"), "backend"),
        (lambda: JacobianRegularizer(lam=-0.01), "lam"),
        (lambda: JacobianRegularizer(n_proj=0), "n_proj"),
        (lambda: JacobianRegularizer(batching="loop"), "batching"),
        (lambda: JSIGRRegularizer(lam_jacobian=-1.0), "lam_jacobian"),
        (lambda: JSIGRRegularizer(lam_saliency=-1.0), "lam_saliency"),
        (lambda: JSIGRRegularizer(patch=0), "patch"),
        (lambda: JSIGRRegularizer(n_proj=0), "n_proj"),
        (lambda: JSIGRRegularizer(perturbation="noise"), "perturbation"),
        (lambda: JSIGRRegularizer(saliency_estimate="exact"), "saliency_estimate"),
    ],
)
def test_bad_construction_arguments(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize("reg_class", [InputGradientRegularizer, JacobianRegularizer, JSIGRRegularizer])
def test_fused_backend_equals_torch(reg_class):
    """The fused cross-entropy and squared-norm ops (Triton, through the interpreter on CPU) give
    the torch path's objective and parameter gradients, the double backward included."""
    if not (torch.cuda.is_available() or _backend.triton_interpreter()):
        pytest.skip("triton cannot run here")
    model = make_model("cnn", True, True)
    x, y = make_batch()
    kwargs = {} if reg_class is InputGradientRegularizer else dict(generator=torch.Generator().manual_seed(0))
    fused = reg_class(backend="triton", **kwargs)(model, x, y)
    if kwargs:
        kwargs["generator"].manual_seed(0)
    ref = reg_class(backend="torch", **kwargs)(model, x, y)
    torch.testing.assert_close(fused.loss, ref.loss, rtol=1e-9, atol=1e-12)
    assert_same_grads(param_grads(fused.loss, model), param_grads(ref.loss, model))


def test_explicit_cuda_backend_raises_on_cpu_tensors():
    model = make_model("cnn", False, True)
    x, y = make_batch()
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        InputGradientRegularizer(backend="cuda")(model, x, y)


@pytest.mark.parametrize("reg", REGULARIZERS, ids=REG_IDS)
def test_bad_call_arguments(reg):
    model = make_model("cnn", False, True)
    x, y = make_batch()
    with pytest.raises(ValueError, match="x must have at least 2 dimensions"):
        reg(model, x.flatten(), y)  # no batch dimension
    with pytest.raises(ValueError, match=r"y must have shape \[batch\]"):
        reg(model, x, y[:3])
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, "):
        reg(model, x, torch.tensor([0, 1, 2, C]))
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, "):
        reg(model, x, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match=r"model must return logits of shape \[batch, classes\]"):
        reg(nn.Sequential(model, nn.Unflatten(1, (1, C))), x, y)  # [B, 1, C] output


# ---- end to end: robustness on the digits set ------------------------------------------------


def digits_net():
    # softplus, not ReLU: the penalties' parameter gradients need a non-zero second derivative
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.Softplus(beta=2),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.BatchNorm2d(16),
        nn.Softplus(beta=2),
        nn.Flatten(),
        nn.Linear(144, 10),
    )


def train_digits(digits, reg, epochs=6, batch=64):
    torch.manual_seed(0)
    model = digits_net()
    fit(
        model,
        digits.x_train,
        digits.y_train,
        None if reg is None else lambda m, x, y: reg(m, x, y).loss,
        epochs=epochs,
        batch=batch,
    )
    return model.eval()


def pgd_accuracy(model, x, y, eps, steps=10):
    """Linf PGD with a random start (Madry et al.), step 2.5 eps / steps."""
    gen = torch.Generator().manual_seed(1)
    x_adv = (x + (torch.rand(x.shape, generator=gen) * 2 - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = fastrob.ops.pgd_step(x_adv.detach(), g, x, alpha=2.5 * eps / steps, eps=eps)
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


def test_regularizers_raise_pgd_robust_accuracy_on_digits(digits):
    eps = 0.15
    results = {}
    for name, reg in [
        ("plain", None),
        ("input-gradient", InputGradientRegularizer(lam=1.0)),
        ("input-gradient-fd", InputGradientRegularizer(lam=1.0, mode="fd")),
        ("jacobian", JacobianRegularizer(lam=0.03)),
        ("jsigr", JSIGRRegularizer(lam_jacobian=0.03, lam_saliency=0.5, patch=2)),
    ]:
        model = train_digits(digits, reg)
        with torch.no_grad():
            clean = (model(digits.x_test).argmax(1) == digits.y_test).float().mean().item()
        results[name] = clean, pgd_accuracy(model, digits.x_test, digits.y_test, eps)
    clean0, robust0 = results.pop("plain")
    assert clean0 > 0.9 and robust0 < 0.5, (clean0, robust0)  # a working model that PGD can hurt
    for name, (clean, robust) in results.items():
        assert clean > clean0 - 0.05, (name, clean, clean0)
        assert robust > robust0 + 0.1, (name, robust, robust0)
