"""fastrob.grouped_conv: values and derivatives of first, second and third order equal torch's
convolution (an independent reference: torch's own formulas, and finite differences through
gradcheck/gradgradcheck in float64), and fastrob.routing runs it exactly where it should."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastrob.grouped_conv import grouped_conv
from fastrob.routing import twice_differentiable

CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

# (spatial dims, channels in, channels out, groups, kernel, settings, spatial size)
CASES = {
    "depthwise_2d_same_7x7": (2, 4, 4, 4, 7, dict(padding="same"), 9),
    "depthwise_2d_stride2_dilated": (2, 3, 6, 3, 3, dict(stride=2, padding=2, dilation=2), 9),
    "grouped_2d_asymmetric": (2, 4, 6, 2, (3, 1), dict(stride=(1, 2), padding=(1, 0)), 7),
    "grouped_1d_valid": (1, 4, 8, 2, 3, dict(padding="valid"), 10),
    "grouped_3d": (3, 2, 4, 2, 2, dict(stride=1, padding=1), 4),
}


def case(name, dtype=torch.float64, bias=True, seed=0, size=None):
    n, cin, cout, groups, kernel, settings, default_size = CASES[name]
    size = size or default_size
    g = torch.Generator().manual_seed(seed)
    kernel = kernel if isinstance(kernel, tuple) else (kernel,) * n
    x = torch.randn(2, cin, *(size,) * n, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(cout, cin // groups, *kernel, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(cout, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    return n, x, w, b, dict(settings, groups=groups)


def third_order(conv, x, w, b, seed=1):
    """A scalar built from first and second derivatives, and its gradients: the derivative orders a
    penalty on an input gradient needs, one more than the regularizers use."""
    inputs = [t for t in (x, w, b) if t is not None]
    y = conv(x, w, b)
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    gx, gw, *gb = torch.autograd.grad((y * r).sum(), inputs, create_graph=True)
    second = gx.square().sum() + gw.pow(3).sum()
    hx, hw = torch.autograd.grad(second, (x, w), create_graph=True)
    third = (hx * x).sum() + hw.square().sum() + second
    return [y, gx, gw, *gb, second, hx, hw, *torch.autograd.grad(third, (x, w))]


@pytest.mark.parametrize("name", CASES)
def test_values_and_derivatives_equal_torch(name):
    n, x, w, b, settings = case(name)
    want = third_order(lambda x, w, b: CONVS[n](x, w, b, **settings), x, w, b)
    got = third_order(lambda x, w, b: grouped_conv(x, w, b, **settings), x, w, b)
    for i, (a, e) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=f"{name}: term {i}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", CASES)
def test_gpu_values_and_derivatives_equal_torch(name, dtype):
    n, x, w, b, settings = case(name, dtype=dtype)
    x, w, b = (t.detach().cuda().requires_grad_() for t in (x, w, b))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # full float32 products on both sides
        want = third_order(lambda x, w, b: CONVS[n](x, w, b, **settings), x, w, b)
        got = third_order(lambda x, w, b: grouped_conv(x, w, b, **settings), x, w, b)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-3)
    for i, (a, e) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, e, **tol, msg=f"{name}: term {i}")


@pytest.mark.parametrize("name", ["depthwise_2d_stride2_dilated", "grouped_1d_valid"])
def test_gradcheck_and_gradgradcheck(name):
    _, x, w, b, settings = case(name, size=5)  # finite differences cost one forward per element
    fn = lambda x, w, b: grouped_conv(x, w, b, **settings)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_float32_channels_last_keeps_the_layout_and_the_values():
    _, x, w, b, settings = case("depthwise_2d_same_7x7", dtype=torch.float32)
    xc = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    want = third_order(lambda x, w, b: F.conv2d(x, w, b, **settings), xc, w, b)
    got = third_order(lambda x, w, b: grouped_conv(x, w, b, **settings), xc, w, b)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for i, (a, e) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=f"term {i}")


def test_without_bias_and_with_frozen_weight():
    _, x, w, _, settings = case("depthwise_2d_same_7x7", bias=False)
    w = w.detach()  # a frozen layer: no weight gradient anywhere
    (want,) = torch.autograd.grad(
        torch.autograd.grad(F.conv2d(x, w, **settings).sin().sum(), x, create_graph=True)[0].square().sum(), x
    )
    (got,) = torch.autograd.grad(
        torch.autograd.grad(grouped_conv(x, w, **settings).sin().sum(), x, create_graph=True)[0].square().sum(), x
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "x_shape, settings",
    [
        ((4, 9, 9), dict(padding=1)),  # unbatched input
        ((2, 4, 9, 9), dict(padding="same")),  # even kernel: torch pads one side more
    ],
)
def test_leaves_to_torch_what_it_does_not_handle(x_shape, settings):
    kernel = 2 if settings.get("padding") == "same" else 3
    x, w = torch.randn(x_shape), torch.randn(4, 1, kernel, kernel)
    assert grouped_conv(x, w, groups=4, **settings) is None


@pytest.mark.parametrize("padding, stride", [("full", 1), ("same", 2)])
def test_torch_error_for_bad_padding_inside_the_routing(padding, stride):
    x, w = torch.randn(2, 4, 9, 9, requires_grad=True), torch.randn(4, 1, 3, 3)
    with pytest.raises((ValueError, RuntimeError)) as outside:
        F.conv2d(x, w, padding=padding, stride=stride, groups=4)
    with twice_differentiable(), pytest.raises(type(outside.value)) as inside:
        F.conv2d(x, w, padding=padding, stride=stride, groups=4)
    assert str(inside.value) == str(outside.value)


def _node_names(t):
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions)
    return {type(n).__name__ for n in seen}


def test_routing_takes_grouped_convolutions_only():
    torch.manual_seed(0)
    depthwise, dense = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    with twice_differentiable():
        routed, plain = depthwise(x), dense(x)
        with torch.no_grad():
            no_grad = depthwise(x)
    assert "_ConvBackward" in _node_names(routed)
    assert "_ConvBackward" not in _node_names(plain)
    assert no_grad.grad_fn is None
    torch.testing.assert_close(routed, depthwise(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(no_grad, depthwise(x).detach(), rtol=0, atol=0)


def test_routed_graph_backward_after_the_block():
    """The penalty's graph is built inside the block and differentiated after it, as a training
    loop does with ``loss.backward()``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, groups=3), nn.GELU(), nn.Flatten(), nn.Linear(6 * 25, 2))
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    model = model.double()

    def penalty():
        (g,) = torch.autograd.grad(model(x).logsumexp(1).sum(), x, create_graph=True)
        return g.square().sum()

    want = torch.autograd.grad(penalty(), list(model.parameters()))
    with twice_differentiable():
        loss = penalty()
    assert "_InputGradBackward" in _node_names(loss)
    loss.backward()
    for p, e in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


def test_under_autocast_the_convolution_runs_in_its_lower_precision():
    """As torch's convolution does under autocast; the double backward then sees one dtype."""
    _, x, w, b, settings = case("depthwise_2d_same_7x7", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.conv2d(x, w, b, **settings)
        got = grouped_conv(x, w, b, **settings)
        (g,) = torch.autograd.grad(got.float().square().sum(), x, create_graph=True)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    (gw,) = torch.autograd.grad(g.square().sum(), w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (g_ref,) = torch.autograd.grad(want.float().square().sum(), x, create_graph=True)
    (gw_ref,) = torch.autograd.grad(g_ref.square().sum(), w)
    assert g.dtype == x.dtype and gw.dtype == w.dtype
    torch.testing.assert_close(gw, gw_ref, rtol=5e-2, atol=5e-2 * gw_ref.abs().max().item())


def test_routing_follows_the_function_called():
    """conv1d and conv3d route as conv2d does; torch's errors stay torch's (a 4-D input to conv1d,
    a stride of the wrong length), and one-element sequences are repeated as torch does."""
    torch.manual_seed(0)
    x1, w1 = torch.randn(2, 4, 9, requires_grad=True), torch.randn(4, 2, 3, requires_grad=True)
    x3, w3 = torch.randn(2, 4, 5, 5, 5, requires_grad=True), torch.randn(4, 1, 3, 3, 3, requires_grad=True)
    x2, w2 = torch.randn(2, 4, 9, 9, requires_grad=True), torch.randn(4, 1, 3, 3, requires_grad=True)
    calls = [
        (F.conv1d, (x1, w1), dict(groups=2, padding=(1,))),
        (F.conv3d, (x3, w3), dict(groups=4, stride=[2], dilation=(1,))),
        (F.conv2d, (x2, w2), dict(groups=4, stride=(2,), padding=[1])),
        (F.conv2d, (x2, w2), dict(groups=4, padding="valid", stride=2)),
    ]
    for conv, args, kwargs in calls:
        want = conv(*args, **kwargs)
        with twice_differentiable():
            got = conv(*args, **kwargs)
        assert "_ConvBackward" in _node_names(got), (conv, kwargs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for conv, args, kwargs in [
        (F.conv1d, (x2, w2), dict(groups=4)),
        (F.conv2d, (x2, w2), dict(groups=4, stride=(1, 1, 1))),
    ]:
        with pytest.raises(RuntimeError) as outside:
            conv(*args, **kwargs)
        with twice_differentiable(), pytest.raises(RuntimeError) as inside:
            conv(*args, **kwargs)
        assert str(inside.value) == str(outside.value)


def test_under_autocast_float64_stays_float64():
    _, x, w, b, settings = case("depthwise_2d_same_7x7")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = F.conv2d(x, w, b, **settings), grouped_conv(x, w, b, **settings)
    assert want.dtype == got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _forward_mode(conv, x, w, b, tangents):
    """The jvp of ``conv`` and a Hessian-vector product (forward over reverse) of a loss through it."""
    out = torch.func.jvp(conv, (x, w, b), tangents)
    loss = lambda x, w: conv(x, w, b).sin().sum()  # noqa: E731
    hvp = torch.func.jvp(torch.func.grad(loss, argnums=(0, 1)), (x, w), tangents[:2])[1]
    return [*out, *hvp]


def test_forward_mode_equals_torch():
    _, x, w, b, settings = case("depthwise_2d_stride2_dilated")
    x, w, b = x.detach(), w.detach(), b.detach()
    g = torch.Generator().manual_seed(3)
    tangents = tuple(torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (x, w, b))
    want = _forward_mode(lambda x, w, b: F.conv2d(x, w, b, **settings), x, w, b, tangents)
    got = _forward_mode(lambda x, w, b: grouped_conv(x, w, b, **settings), x, w, b, tangents)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
