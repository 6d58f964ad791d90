"""fastrob.ops.layer_norm and fastrob.nn.LayerNorm / LayerNorm2d: the reference against a by-hand
formula and torch, the Triton backend's value and first and second derivatives against the
reference (last dimension and channels first, NCHW and channels_last, with and without affine
parameters, rows wider than one block), float64 gradcheck/gradgradcheck, opcheck, errors, the
missing CUDA kernels, the modules against torch's and timm's formulation, and a gradient
penalty's parameter gradient through a LayerNorm net."""

import pytest
import torch
import torch.nn.functional as F
from op_checks import assert_derivatives_close, triton_device, triton_runs_here
from torch import nn

from fastrob.nn import LayerNorm, LayerNorm2d, swap_layer_norm
from fastrob.ops import layer_norm, layer_norm_reference
from fastrob.ops.layer_norm import SPEC

needs_triton = pytest.mark.skipif(not triton_runs_here(), reason="triton cannot run here")


def make(shape, dtype=torch.float32, device="cpu", seed=0, channels_first=False, channels_last=False, offset=3.0):
    """x (mean ``offset``, std 2), weight, bias; seeded apart from op_checks' cotangents."""
    g = torch.Generator().manual_seed(2000 + seed)
    c = shape[1] if channels_first else shape[-1]
    x = (2 * torch.randn(shape, generator=g, dtype=torch.float64) + offset).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = (torch.randn(c, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for _ in range(2))
    return x, w, b


def timm_layer_norm_2d(x, w, b, eps=1e-5):
    """timm's LayerNorm2d: permute to channels-last, F.layer_norm over C, permute back."""
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, eps).permute(0, 3, 1, 2)


def test_reference_by_hand_and_against_torch():
    x, w, b = make((3, 4, 6), torch.float64)
    rows = x.reshape(-1, 6)
    mean = rows.sum(1, keepdim=True) / 6
    var = ((rows - mean) ** 2).sum(1, keepdim=True) / 6
    by_hand = ((rows - mean) / (var + 1e-5).sqrt() * w + b).view_as(x)
    torch.testing.assert_close(layer_norm_reference(x, w, b), by_hand)
    assert_derivatives_close(
        lambda x, w, b: layer_norm_reference(x, w, b),
        lambda x, w, b: F.layer_norm(x, (6,), w, b),
        [x, w, b],
        **SPEC.tolerance(torch.float64),
    )
    x, w, b = make((2, 5, 3, 4), torch.float64, channels_first=True)
    assert_derivatives_close(
        lambda x, w, b: layer_norm_reference(x, w, b, channels_first=True),
        timm_layer_norm_2d,
        [x, w, b],
        **SPEC.tolerance(torch.float64),
    )


# (shape, channels_first, channels_last): C = 37 and 21 span several 16-column blocks in the
# interpreter (a partial last block); (4, 1) a single column; 3-d channels first [B, C, L]
CASES = [
    ((5, 37), False, False),
    ((2, 3, 19), False, False),
    ((4, 1), False, False),
    ((2, 21, 3, 5), True, False),
    ((2, 21, 3, 5), True, True),
    ((3, 6, 7), True, False),
]


@needs_triton
@pytest.mark.parametrize("shape, channels_first, channels_last", CASES, ids=str)
@pytest.mark.parametrize(
    "dtype, affine",
    [(torch.float32, True), (torch.float64, True), (torch.float32, False)],
    ids=str,
)
def test_triton_equals_reference(shape, channels_first, channels_last, dtype, affine):
    x, w, b = make(shape, dtype, triton_device(), channels_first=channels_first, channels_last=channels_last)
    if affine:

        def fused(x, w, b):
            return layer_norm(x, w, b, channels_first=channels_first, backend="triton")

        def reference(x, w, b):
            return layer_norm_reference(x, w, b, channels_first=channels_first)

        inputs = [x, w, b]
    else:

        def fused(x):
            return layer_norm(x, None, None, channels_first=channels_first, backend="triton")

        def reference(x):
            return layer_norm_reference(x, None, None, channels_first=channels_first)

        inputs = [x]
    assert_derivatives_close(fused, reference, inputs, **SPEC.tolerance(dtype))
    if channels_last:
        assert fused(*inputs).is_contiguous(memory_format=torch.channels_last)


@needs_triton
def test_triton_bfloat16_weight_only_and_float32_parameters():
    x, w, _ = make((3, 4, 40), torch.bfloat16, triton_device())
    assert_derivatives_close(
        lambda x, w: layer_norm(x, w, None, backend="triton"),
        lambda x, w: layer_norm_reference(x, w, None),
        [x, w],
        **SPEC.tolerance(torch.bfloat16),
    )
    x, w, b = make((2, 8, 3, 3), torch.float16, triton_device(), channels_first=True)
    w, b = w.float(), b.float()  # parameters in float32 beside half-precision activations (autocast)
    out = layer_norm(x, w, b, channels_first=True, backend="triton")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, layer_norm_reference(x, w, b, channels_first=True), **SPEC.tolerance(torch.float16))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("channels_first", [False, True])
def test_gradcheck_and_gradgradcheck_float64(backend, channels_first):
    shape = (2, 3, 2, 1) if channels_first else (3, 4)  # small: each check is many interpreted launches
    device = "cpu" if backend == "torch" else triton_device()
    x, w, b = make(shape, torch.float64, device, channels_first=channels_first)
    inputs = tuple(t.requires_grad_(True) for t in (x, w, b))

    def fn(x, w, b):
        return layer_norm(x, w, b, channels_first=channels_first, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@needs_triton
def test_far_from_zero_data_keeps_float32_accuracy():
    """Rows with mean 1000 and std 1: a one-pass E[x^2] - E[x]^2 would lose every digit."""
    x, w, b = make((4, 64), torch.float32, triton_device(), offset=1000.0)
    x = (x - 1000.0) / 2 + 1000.0
    expected = layer_norm_reference(x.double(), w.double(), b.double())
    torch.testing.assert_close(layer_norm(x, w, b, backend="triton").double(), expected, atol=2e-3, rtol=2e-3)


@needs_triton
def test_opcheck():
    x, w, b = make((2, 3, 2, 3), device=triton_device(), channels_first=True)
    ops = torch.ops.fastrob
    for channels_first in (False, True):
        c = x.shape[1] if channels_first else x.shape[-1]
        wc, bc = torch.randn(c, device=x.device), torch.randn(c, device=x.device)
        y, mean, invstd = ops.layer_norm_triton(x, wc, bc, 1e-5, channels_first)
        dy, v = torch.randn_like(x), torch.randn_like(x)
        torch.library.opcheck(ops.layer_norm_triton.default, (x, wc, bc, 1e-5, channels_first))
        torch.library.opcheck(ops.layer_norm_triton.default, (x, None, None, 1e-5, channels_first))
        torch.library.opcheck(ops.layer_norm_backward_triton.default, (dy, x, wc, mean, invstd, channels_first))
        torch.library.opcheck(
            ops.layer_norm_double_backward_triton.default,
            (dy, x, wc, mean, invstd, v, torch.randn_like(wc), torch.randn_like(bc), channels_first),
        )


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(weight=torch.ones(5)), ValueError, "weight must have shape"),
        (dict(bias=torch.ones(3, 4)), ValueError, "bias must have shape"),
        (dict(eps=-1.0), ValueError, "eps must be >= 0"),
        (dict(channels_first=1), TypeError, "channels_first must be a bool"),
        (dict(x=torch.zeros(2, 4, dtype=torch.int64)), TypeError, "x must be a floating-point"),
        (dict(x=torch.zeros(4), channels_first=True), ValueError, "x must have at least 2"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
        (dict(backend="cuda"), RuntimeError, "backend='cuda' is not available for this op"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, words):
    x = kwargs.pop("x", torch.zeros(2, 4))
    with pytest.raises(error, match=words):
        layer_norm(x, kwargs.pop("weight", None), kwargs.pop("bias", None), **kwargs)


def test_auto_never_picks_a_backend_without_kernels(monkeypatch):
    """auto on a target whose only fused backend is cuda (which has no layer norm kernels) runs
    the torch reference, without trying a kernel that does not exist."""
    from fastrob import _backend

    monkeypatch.setattr(_backend, "AUTO_KERNELS_ON_CPU", True)
    monkeypatch.setattr(_backend, "fused_backends_for", lambda device: ["cuda"])
    _backend.clear_auto_cache()
    with pytest.warns(RuntimeWarning, match="layer_norm has no kernels for the fused backends that run here"):
        assert (
            _backend.resolve("auto", torch.device("cpu"), torch.float32, op="layer_norm", fused=("triton",)) == "torch"
        )
    x, w, b = make((3, 8))
    torch.testing.assert_close(layer_norm(x, w, b), F.layer_norm(x, (8,), w, b))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_empty_batch(backend):
    device = "cpu" if backend == "torch" else triton_device()
    x = torch.zeros(0, 6, device=device, requires_grad=True)
    out = layer_norm(x, torch.ones(6, device=device), None, backend=backend)
    assert out.shape == (0, 6)
    out.sum().backward()
    assert x.grad.shape == (0, 6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_modules_equal_torch_and_timm(backend):
    device = "cpu" if backend == "torch" else triton_device()
    torch.manual_seed(0)
    ref = nn.LayerNorm(12, eps=1e-6).to(device)
    nn.init.normal_(ref.weight)
    nn.init.normal_(ref.bias)
    x = torch.randn(2, 5, 12, device=device)
    fused = LayerNorm.from_module(ref, backend=backend)
    assert isinstance(fused, nn.LayerNorm) and fused.weight is ref.weight and fused.eps == 1e-6
    torch.testing.assert_close(fused(x), ref(x))
    ln2d = LayerNorm2d(7, backend=backend).to(device)
    nn.init.normal_(ln2d.weight)
    x = torch.randn(2, 7, 3, 4, device=device)
    torch.testing.assert_close(ln2d(x), timm_layer_norm_2d(x, ln2d.weight, ln2d.bias, ln2d.eps))
    assert LayerNorm2d(7, elementwise_affine=False).weight is None


def test_swap_layer_norm_shares_parameters_and_keeps_the_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Sequential(nn.LayerNorm([2, 4])))
    weight = model[1].weight
    x = torch.randn(3, 4)
    before = model[:3](x)
    swap_layer_norm(model, backend="torch")
    assert type(model[1]) is LayerNorm and model[1].weight is weight
    assert type(model[3][0]) is nn.LayerNorm  # a multi-dimensional normalized_shape stays torch's
    torch.testing.assert_close(model[:3](x), before)
    assert type(swap_layer_norm(nn.LayerNorm(3))) is LayerNorm
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        swap_layer_norm(lambda x: x)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_input_gradient_penalty_parameter_gradients_through_layer_norm(backend):
    """The exact input-gradient penalty's parameter gradients through a LayerNorm MLP equal those
    through torch's nn.LayerNorm (double backprop through the fused double backward)."""
    device = "cpu" if backend == "torch" else triton_device()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3)).double().to(device)
    nn.init.normal_(net[1].weight)
    x = torch.randn(5, 6, dtype=torch.float64, device=device)
    y = torch.tensor([0, 1, 2, 0, 1], device=device)

    def penalty_grads(model):
        xi = x.clone().requires_grad_(True)
        loss = F.cross_entropy(model(xi), y)
        (g,) = torch.autograd.grad(loss, xi, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), list(model.parameters()))

    expected = penalty_grads(net)
    swap_layer_norm(net, backend=backend)
    for got, want in zip(penalty_grads(net), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape, channels_first, channels_last",
    [((128, 197, 768), False, False), ((4096, 3), False, False), ((64, 96, 56, 56), True, False)]
    + [((64, 96, 56, 56), True, True), ((8, 1500, 5), False, False)],
    ids=str,
)
def test_gpu_triton_equals_reference(dtype, shape, channels_first, channels_last):
    x, w, b = make(shape, dtype, "cuda", channels_first=channels_first, channels_last=channels_last)
    tol = SPEC.tolerance(dtype, large_inputs=True)
    assert_derivatives_close(
        lambda x, w, b: layer_norm(x, w, b, channels_first=channels_first, backend="triton"),
        lambda x, w, b: layer_norm_reference(x, w, b, channels_first=channels_first),
        [x, w, b],
        **tol,
    )


def test_fastrob_check_skips_the_backend_without_kernels():
    from fastrob import verify

    assert verify.check_devices(devices=["cpu"], backends=["cuda"], ops=["layer_norm"], dtypes=[torch.float32]) == []


def test_a_weight_of_another_dtype_is_refused_by_name():
    x = torch.rand(2, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="weight must have x's dtype float64, got float32"):
        layer_norm(x, torch.ones(4), None, 1e-5, backend="torch")
    # half-precision input takes float32 parameters (as the kernels accumulate in float32)
    out = layer_norm(x.to(torch.bfloat16), torch.ones(4), None, 1e-5, backend="torch")
    assert out.dtype == torch.bfloat16
