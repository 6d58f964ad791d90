"""fastrob.functional against brute force: explicit per-sample Jacobians
(torch.autograd.functional.jacobian) and explicit double backprop, in float64.

The brute-force helpers and small networks here are also used by test_regularizers.py."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.functional import jacobian

from fastrob import functional as Fn

C = 5  # classes of the small test networks


def make_model(kind: str, bn: bool, train: bool, seed: int = 0) -> nn.Module:
    """A small float64 softplus classifier for [B, 2, 6, 6] inputs: "mlp" or "cnn", with or without BatchNorm."""
    torch.manual_seed(seed)
    if kind == "mlp":
        layers = (
            [nn.Flatten(), nn.Linear(72, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.Softplus(), nn.Linear(16, C)]
        )
    else:
        layers = (
            [nn.Conv2d(2, 4, 3, padding=1)]
            + ([nn.BatchNorm2d(4)] if bn else [])
            + [nn.Softplus(), nn.Conv2d(4, 4, 3, stride=2), nn.Softplus(), nn.Flatten(), nn.Linear(16, C)]
        )
    model = nn.Sequential(*layers).double()
    if bn:  # non-trivial running statistics and affine parameters, so eval mode differs from train mode
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.3, 0.3)
    return model.train(train)


MODELS = [(k, bn, tr) for k in ("mlp", "cnn") for bn, tr in ((False, True), (True, False), (True, True))]
MODEL_IDS = [f"{k}-{'bn' if bn else 'nobn'}-{'train' if tr else 'eval'}" for k, bn, tr in MODELS]


def make_batch(batch: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 2, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (batch,), generator=g)
    return x, y


def brute_input_gradients(model, x, y):
    """[B, ...] rows d(sum_j CE_j)/dx_i from the explicit [B, B, ...] Jacobian of the per-sample
    losses (created with a graph, so that it can be differentiated w.r.t. the parameters)."""
    losses = lambda xx: F.cross_entropy(model(xx), y, reduction="none")  # noqa: E731
    jac = jacobian(losses, x, create_graph=True)  # [B(loss), B(input), ...]
    return jac.sum(0), jac


def brute_input_gradient_penalty(model, x, y, norm="l2", weight=None):
    g, _ = brute_input_gradients(model, x, y)
    if weight is not None:
        g = g * weight
    g = g.flatten(1)
    if norm == "l2":
        return (g**2).sum(1).mean()
    return g.abs().sum(1).pow(2).mean() / g.shape[1]


def brute_jacobian_penalty(model, x):
    """1/2 ||J||_F^2 / B with J the explicit [B, C, B, ...] Jacobian of the logits."""
    jac = jacobian(lambda xx: model(xx), x, create_graph=True)
    return 0.5 * (jac**2).sum() / x.shape[0]


def param_grads(value, model):
    return torch.autograd.grad(value, list(model.parameters()), retain_graph=True, allow_unused=True)


def assert_same_grads(a, b, rtol=1e-7, atol=1e-10):
    assert len(a) == len(b)
    for ga, gb in zip(a, b):
        if gb is None:
            assert ga is None or torch.count_nonzero(ga) == 0
            continue
        torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol)


def test_brute_force_sees_coupling_only_with_train_mode_batchnorm():
    # The premise of the penalties' definition: without train-mode BatchNorm, d CE_j / d x_i = 0 for i != j.
    x, y = make_batch()
    for kind, bn, train in MODELS:
        _, jac = brute_input_gradients(make_model(kind, bn, train), x, y)
        off = jac.flatten(2).clone()
        off[torch.arange(4), torch.arange(4)] = 0
        assert (off.abs().max() > 1e-8) == (bn and train), (kind, bn, train)


@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("spec", MODELS, ids=MODEL_IDS)
def test_input_gradient_penalty_and_its_parameter_gradient_equal_brute_force(spec, norm):
    model = make_model(*spec)
    x, y = make_batch()
    xl = x.clone().requires_grad_(True)
    penalty = Fn.input_gradient_penalty(F.cross_entropy(model(xl), y, reduction="none"), xl, norm=norm)
    expected = brute_input_gradient_penalty(model, x, y, norm)
    torch.testing.assert_close(penalty, expected, rtol=1e-9, atol=1e-12)
    assert_same_grads(param_grads(penalty, model), param_grads(expected, model))


def test_input_gradient_penalty_weight():
    model = make_model("cnn", False, True)
    x, y = make_batch()
    w = torch.rand(4, 1, 6, 6, dtype=torch.float64)
    xl = x.clone().requires_grad_(True)
    penalty = Fn.input_gradient_penalty(F.cross_entropy(model(xl), y, reduction="none"), xl, weight=w)
    expected = brute_input_gradient_penalty(model, x, y, weight=w)
    torch.testing.assert_close(penalty, expected)
    assert_same_grads(param_grads(penalty, model), param_grads(expected, model))


@pytest.mark.parametrize("spec", MODELS, ids=MODEL_IDS)
def test_exact_jacobian_penalty_and_its_parameter_gradient_equal_brute_force(spec):
    model = make_model(*spec)
    x, _ = make_batch()
    xl = x.clone().requires_grad_(True)
    penalty = Fn.jacobian_penalty(model(xl), xl, exact=True, samples_interact=spec[1] and spec[2])
    expected = brute_jacobian_penalty(model, x)
    torch.testing.assert_close(penalty, expected, rtol=1e-9, atol=1e-12)
    assert_same_grads(param_grads(penalty, model), param_grads(expected, model))


def assert_unbiased(estimates, exact, n_sigma=4.0):
    est = torch.stack(estimates).detach()
    se = est.std() / len(est) ** 0.5
    assert se > 0, "the estimates do not vary: not a random projection"
    assert abs(est.mean() - exact) < n_sigma * se, (est.mean().item(), exact.item(), se.item())
    # and the standard error is small enough for the check to mean something
    assert se < 0.05 * exact


@pytest.mark.parametrize("spec", [("mlp", False, True), ("cnn", True, True)], ids=["mlp", "cnn-bn-train"])
def test_jacobian_estimator_is_unbiased(spec):
    model = make_model(*spec)
    x, _ = make_batch()
    xl = x.clone().requires_grad_(True)
    logits = model(xl)
    gen = torch.Generator().manual_seed(0)
    estimates = [Fn.jacobian_penalty(logits, xl, n_proj=2, generator=gen) for _ in range(400)]
    assert_unbiased(estimates, brute_jacobian_penalty(model, x))


def test_projections_are_unit_vectors_or_one_hot():
    like = torch.zeros((), dtype=torch.float64)
    v = Fn.projections(7, C, 3, False, like)
    assert v.shape == (3, 7, C)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3, 7, dtype=torch.float64))
    e = Fn.projections(7, C, 3, True, like)
    assert e.shape == (C, 7, C)
    torch.testing.assert_close(e[:, 0], torch.eye(C, dtype=torch.float64))


def test_penalties_leave_parameter_grads_untouched():
    model = make_model("cnn", True, True)
    x, y = make_batch()
    xl = x.clone().requires_grad_(True)
    logits = model(xl)
    Fn.input_gradient_penalty(F.cross_entropy(logits, y, reduction="none"), xl)
    Fn.jacobian_penalty(logits, xl, n_proj=3)
    assert all(p.grad is None for p in model.parameters())


def test_functional_bad_input():
    model = make_model("mlp", False, True)
    x, y = make_batch()
    xl = x.clone().requires_grad_(True)
    logits = model(xl)
    losses = F.cross_entropy(logits, y, reduction="none")
    with pytest.raises(ValueError, match="x"):
        Fn.input_gradient_penalty(losses, x)  # x does not require grad
    with pytest.raises(ValueError, match="loss_per_sample"):
        Fn.input_gradient_penalty(losses[:3], xl)
    with pytest.raises(ValueError, match="norm"):
        Fn.input_gradient_penalty(losses, xl, norm="linf")
    with pytest.raises(ValueError, match="n_proj"):
        Fn.jacobian_penalty(logits, xl, n_proj=0)
    with pytest.raises(ValueError, match="logits"):
        Fn.jacobian_penalty(logits[:2], xl)
    with pytest.raises(ValueError, match="x"):
        Fn.jacobian_penalty(logits, xl.flatten())  # no batch dimension


def test_shared_one_hot_projections_are_not_exact_when_samples_interact():
    # Why samples_interact exists: with train-mode BatchNorm, e_c shared by the batch adds
    # cross-sample products, and the result is far from the brute-force value.
    model = make_model("mlp", True, True)
    x, _ = make_batch()
    xl = x.clone().requires_grad_(True)
    shared = Fn.jacobian_penalty(model(xl), xl, exact=True)
    assert not torch.allclose(shared, brute_jacobian_penalty(model, x), rtol=1e-3)


class _BatchNormThenReLU(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern: a BatchNorm subclass whose forward also runs an activation."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def _bn_act_models():
    from fastrob.nn import BatchNormAct2d

    torch.manual_seed(0)
    fused = BatchNormAct2d.from_module(nn.BatchNorm2d(4), act="softplus")
    return {
        "torch_bn": nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Softplus()),
        "subclass_with_activation": nn.Sequential(nn.Conv2d(3, 4, 3), _BatchNormThenReLU(4)),
        "fastrob_batch_norm_act": nn.Sequential(nn.Conv2d(3, 4, 3), fused),
    }


@pytest.mark.parametrize("name", list(_bn_act_models()))
def test_per_replica_batch_norm_equals_one_forward_per_copy(name):
    """Each copy's rows equal a forward of that copy alone, the rest of the module's forward (its
    activation) included, with gradients; the running mean and variance do not move."""
    model = _bn_act_models()[name].train()
    g = torch.Generator().manual_seed(1)
    copies = [torch.randn(3, 3, 6, 6, generator=g, dtype=torch.float32) for _ in range(2)]
    buffers = [b.clone() for name, b in model.named_buffers() if "running" in name]
    stacked = torch.cat(copies).requires_grad_(True)
    with Fn.per_replica_batch_norm(model, 2):
        out = model(stacked)
    for b, before in zip([b for name, b in model.named_buffers() if "running" in name], buffers):
        assert torch.equal(b, before)
    with Fn.preserved_buffers(model):
        want = torch.cat([model(c) for c in copies])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    w = torch.randn(out.shape, generator=g)
    (got_grad,) = torch.autograd.grad((out * w).sum(), stacked)
    split = [c.clone().requires_grad_(True) for c in copies]
    with Fn.preserved_buffers(model):
        want_grad = torch.autograd.grad(sum((model(c) * wc).sum() for c, wc in zip(split, w.chunk(2))), split)
    torch.testing.assert_close(got_grad, torch.cat(want_grad), rtol=1e-5, atol=1e-6)


def test_per_replica_batch_norm_refuses_a_batch_that_is_not_whole_copies():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    with Fn.per_replica_batch_norm(model, 2), pytest.raises(ValueError, match="not 2 stacked copies"):
        model(torch.randn(3, 3, 6, 6))
