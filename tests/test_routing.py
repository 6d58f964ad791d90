"""Attention routing: on a ViT whose attention is F.scaled_dot_product_attention, every regularizer
that differentiates a backward equals the double backprop of torch's math attention; without the
routing it fails (torch's CPU flash attention has no double backward), and the graphs stay valid
for a backward outside any fastrob context."""

import contextlib
import sys

import pytest
import torch
import torch.nn.functional as F
from op_checks import triton_device, triton_runs_here
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastrob.functional as Fn
from fastrob import regularizers as R
from fastrob.models import ViT, _ViTBlock
from fastrob.routing import twice_differentiable

ROUTED_MODULES = ("input_gradient", "jacobian", "jsigr", "lipschitz", "interpretation")
# whole models in float64: the routed and the math attention differ by rounding, summed over the layers
MODEL_TOL = dict(atol=1e-9, rtol=1e-9)


def vit(seed=0, dtype=torch.float64, block=None):
    torch.manual_seed(seed)
    model = ViT(image_size=8, patch=4, in_channels=3, num_classes=5, dim=16, depth=2, heads=2)
    if block is not None:
        for i, b in enumerate(model.blocks):
            model.blocks[i] = block(16, 2, 4.0)
            model.blocks[i].load_state_dict(b.state_dict())
    return model.to(dtype)


def batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, 8, 8, generator=g, dtype=torch.float64).to(dtype), torch.tensor([0, 3, 4])


@pytest.fixture
def no_routing(monkeypatch):
    """The regularizers as they were before routing: the model's own attention."""
    for name in ROUTED_MODULES:
        monkeypatch.setattr(f"fastrob.regularizers.{name}.twice_differentiable", _no_route)
    monkeypatch.setattr("fastrob.interpret.twice_differentiable", _no_route)  # the differentiable maps


def _no_route(backend="auto"):
    return contextlib.nullcontext()


def grads(model, loss):
    return torch.autograd.grad(loss, list(model.parameters()))


def math_input_gradient(model, x, y):
    with sdpa_kernel(SDPBackend.MATH):
        x = x.clone().requires_grad_(True)
        ce = F.cross_entropy(model(x), y, reduction="none")
        (g,) = torch.autograd.grad(ce.sum(), x, create_graph=True)
        return ce.mean() + 0.1 * g.pow(2).sum((1, 2, 3)).mean()


def math_jacobian_exact(model, x, y):
    with sdpa_kernel(SDPBackend.MATH):
        x = x.clone().requires_grad_(True)
        logits = model(x)
        rows = [torch.autograd.grad(logits[:, c].sum(), x, create_graph=True)[0] for c in range(logits.shape[1])]
        penalty = 0.5 * sum(r.pow(2).sum() for r in rows) / x.shape[0]
        return F.cross_entropy(logits, y) + 0.01 * penalty


@pytest.mark.parametrize(
    "reg, hand_written",
    [
        (R.InputGradientRegularizer(lam=0.1), math_input_gradient),
        (R.JacobianRegularizer(lam=0.01, exact=True), math_jacobian_exact),
    ],
    ids=["input_gradient", "jacobian_exact"],
)
def test_penalty_equals_hand_written_math_double_backprop(reg, hand_written):
    model, (x, y) = vit(), batch()
    expected = hand_written(model, x, y)
    loss = reg(model, x, y).loss  # the model's default attention: flash on CPU, routed by fastrob
    torch.testing.assert_close(loss, expected, **MODEL_TOL)
    for a, b in zip(grads(model, loss), grads(model, expected)):  # backward outside any context
        torch.testing.assert_close(a, b, **MODEL_TOL)


@pytest.mark.skipif(not triton_runs_here(), reason="triton cannot run here")
def test_routed_through_the_triton_kernels():
    """backend="triton": attention (and the CE and norm) on the fused kernels inside the penalty."""
    model, (x, y) = vit(), batch()
    model, x, y = model.to(triton_device()), x.to(triton_device()), y.to(triton_device())
    loss = R.InputGradientRegularizer(lam=0.1, backend="triton")(model, x, y).loss
    expected = math_input_gradient(model, x, y)
    torch.testing.assert_close(loss, expected, **MODEL_TOL)
    for a, b in zip(grads(model, loss), grads(model, expected)):
        torch.testing.assert_close(a, b, **MODEL_TOL)


def regularizers():
    return {
        "jacobian": lambda: R.JacobianRegularizer(n_proj=2, generator=torch.Generator().manual_seed(5)),
        "jsigr": lambda: R.JSIGRRegularizer(patch=4, generator=torch.Generator().manual_seed(5)),
        "lipschitz": lambda: R.LipschitzRegularizer(psi=2.0, zeta=0.5, generator=torch.Generator().manual_seed(5)),
        "int2_saliency": lambda: R.InterpretationRegularizer(
            "int2", map="saliency", steps=1, generator=torch.Generator().manual_seed(5)
        ),
        "int_saliency": lambda: R.InterpretationRegularizer(
            "int", map="saliency", steps=1, generator=torch.Generator().manual_seed(5)
        ),
    }


SLOW = {"jacobian", "int2_saliency"}  # paths the other cases cover too (CPU time)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in regularizers()])
def test_regularizer_equals_its_run_on_torch_math_attention(name, monkeypatch):
    model, (x, y) = vit(), batch()
    loss = regularizers()[name]()(model, x, y).loss
    got = [loss, *grads(model, loss)]
    for module in ROUTED_MODULES:
        monkeypatch.setattr(f"fastrob.regularizers.{module}.twice_differentiable", _no_route)
    monkeypatch.setattr("fastrob.interpret.twice_differentiable", _no_route)  # Int/Int2's maps
    with sdpa_kernel(SDPBackend.MATH):
        expected_loss = regularizers()[name]()(model, x, y).loss
    for a, b in zip(got, [expected_loss, *grads(model, expected_loss)]):
        torch.testing.assert_close(a, b, **MODEL_TOL)


@pytest.mark.parametrize("name", ["input_gradient", "jacobian", "jsigr", "lipschitz", "int2_saliency"])
def test_without_routing_the_penalty_fails_on_cpu(name, no_routing):
    """The tests above can fail: this model's attention has no double backward of its own."""
    model, (x, y) = vit(), batch()
    make = regularizers().get(name, lambda: R.InputGradientRegularizer())
    with pytest.raises(RuntimeError, match="fused attention|flash_attention_for_cpu_backward is not implemented"):
        loss = make()(model, x, y).loss
        grads(model, loss)


def test_hand_written_double_backprop_fails_without_math_attention():
    model, (x, y) = vit(), batch()
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), x, create_graph=True)
    with pytest.raises(RuntimeError, match="flash_attention_for_cpu_backward is not implemented"):
        g.pow(2).sum().backward()


def test_user_context_graph_is_valid_outside_it():
    model, (x, y) = vit(), batch()
    xl = x.clone().requires_grad_(True)
    with twice_differentiable():
        logits = model(xl)
        torch._C._nn.scaled_dot_product_attention  # noqa: B018  (same function, also routed)
    ce = F.cross_entropy(logits, y, reduction="none")
    loss = ce.mean() + 0.1 * Fn.input_gradient_penalty(ce, xl)
    torch.testing.assert_close(loss, math_input_gradient(model, x, y), **MODEL_TOL)
    loss.backward()  # outside the context
    expected = grads(model, math_input_gradient(model, x, y))
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, **MODEL_TOL)


def test_functional_penalty_names_the_fix_for_unrouted_logits():
    model, (x, y) = vit(), batch()
    x.requires_grad_(True)
    logits = model(x)
    with pytest.raises(RuntimeError, match="twice_differentiable"):
        Fn.input_gradient_penalty(F.cross_entropy(logits, y, reduction="none"), x)
    with pytest.raises(RuntimeError, match="twice_differentiable"):
        Fn.jacobian_penalty(logits, x)


def test_routing_covers_direct_c_calls_gqa_and_nesting():
    q = torch.randn(2, 4, 6, 8, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(2, 2, 6, 8, dtype=torch.float64)
    with twice_differentiable(), twice_differentiable("torch"):
        out = torch._C._nn.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    torch.testing.assert_close(out, expected, **MODEL_TOL)
    assert "Flash" not in type(out.grad_fn).__name__
    (g,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    g.sum().backward()


class _HandWrittenBlock(_ViTBlock):
    def attend(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, -1) @ v


def test_hand_written_attention_model_keeps_working():
    model, (x, y) = vit(block=_HandWrittenBlock), batch()
    loss = R.InputGradientRegularizer(lam=0.1)(model, x, y).loss
    torch.testing.assert_close(loss, math_input_gradient(model, x, y), **MODEL_TOL)
    for a, b in zip(grads(model, loss), grads(model, math_input_gradient(model, x, y))):
        torch.testing.assert_close(a, b, **MODEL_TOL)


def test_float32_vit_takes_a_step_with_the_exact_penalty():
    model, (x, y) = vit(dtype=torch.float32), batch(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg = R.InputGradientRegularizer(lam=0.1)
    opt.zero_grad()
    reg(model, x, y).loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sns_needs_no_routing_first_order_only():
    model, (x, y) = vit(), batch()
    loss = R.SNSRegularizer(steps=1, generator=torch.Generator().manual_seed(0))(model, x, y).loss
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads(model, loss))


def test_isa_differentiates_gradient_maps_of_a_vit(monkeypatch):
    """The interpretation sneaking attack's objective holds gradient maps: on a ViT it runs routed and
    equals its run on torch's math attention (unrouted), and fails unrouted on the fused attention."""
    from fastrob.attacks import isa

    model, (x, y) = vit(), batch()
    # a radius where the plain attack succeeds, so that the gamma search (the maps' term) runs
    settings = dict(eps_max=3.0, norm="l2", steps=3, search_steps=1, map="saliency")
    routed = isa(model, x, y, generator=torch.Generator().manual_seed(0), **settings)
    assert routed.success.any()
    # fastrob.attacks.isa is the function; its module is reached through sys.modules. The maps
    # route by themselves too (fastrob.interpret), so both are switched off
    monkeypatch.setattr(sys.modules["fastrob.attacks.isa"], "twice_differentiable", _no_route)
    monkeypatch.setattr("fastrob.interpret.twice_differentiable", _no_route)
    with sdpa_kernel(SDPBackend.MATH):
        math = isa(model, x, y, generator=torch.Generator().manual_seed(0), **settings)
    torch.testing.assert_close(routed.x_adv, math.x_adv, **MODEL_TOL)
    with pytest.raises(RuntimeError, match="fused attention"):
        isa(model, x, y, generator=torch.Generator().manual_seed(0), **settings)


def vit_maps(map_name):
    from fastrob.interpret import grad_cam, integrated_gradients, saliency

    model, (x, y) = vit(), batch()
    maps = {
        "saliency": lambda: saliency(model, x, y),
        "grad_cam": lambda: grad_cam(model, x, y, layer=model.blocks[0].norm1),
        "ig": lambda: integrated_gradients(model, x, y, steps=3),
    }[map_name]
    # the final LayerNorm's and the head's biases do not change a gradient map: unused
    params = [p for name, p in model.named_parameters() if name not in ("norm.bias", "head.bias")]
    return maps, params


@pytest.mark.parametrize("map_name", ["saliency", "grad_cam", "ig"])
def test_differentiable_maps_of_a_vit(map_name, monkeypatch):
    """fastrob.interpret's maps with create_graph=True can be differentiated on a ViT, and equal
    the same maps computed unrouted under torch's math attention."""
    maps, params = vit_maps(map_name)
    got = torch.autograd.grad(maps().square().sum(), params)
    monkeypatch.setattr("fastrob.interpret.twice_differentiable", _no_route)
    with sdpa_kernel(SDPBackend.MATH):
        want = torch.autograd.grad(maps().square().sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **MODEL_TOL)


@pytest.mark.parametrize("map_name", ["saliency", "grad_cam", "ig"])
def test_unrouted_maps_of_a_vit_cannot_be_differentiated(map_name, no_routing):
    """The test above can fail: unrouted, the maps hold torch's fused attention."""
    maps, params = vit_maps(map_name)
    with pytest.raises(RuntimeError, match="fused attention|flash_attention_for_cpu_backward is not implemented"):
        torch.autograd.grad(maps().square().sum(), params)


@pytest.mark.parametrize("backend", ["bogus", 3, None])
def test_a_bad_backend_is_refused_when_the_block_opens(backend):
    with pytest.raises(ValueError, match="backend must be one of"):
        with twice_differentiable(backend):
            pass
