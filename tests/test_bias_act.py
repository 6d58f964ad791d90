"""fastrob.ops.bias_act and fastrob.nn: the reference (half-Huber by hand), every backend's value
and first and second derivatives against it (each activation, with and without bias, channels
first and last), float64 gradcheck/gradgradcheck, opcheck, errors, and the module swap."""

import pytest
import torch
from op_checks import assert_derivatives_close, triton_device, triton_runs_here
from torch import nn

from fastrob.nn import BiasAct, swap_activations
from fastrob.ops import bias_act, bias_act_reference
from fastrob.ops.bias_act import ACTIVATIONS, SPEC, half_huber

needs_triton = pytest.mark.skipif(not triton_runs_here(), reason="triton cannot run here")
ACTS = list(ACTIVATIONS)


def make(shape, dtype=torch.float32, device="cpu", seed=0, bias=True, dim=1):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(shape, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)
    b = torch.randn(shape[dim], generator=g, dtype=torch.float64).to(device=device, dtype=dtype) if bias else None
    return x, b


def test_half_huber_by_hand():
    u = torch.tensor([-1.0, 0.0, 0.25, 0.5, 2.0])
    torch.testing.assert_close(half_huber(u, 0.5), torch.tensor([0.0, 0.0, 0.0625, 0.25, 1.75]))


@needs_triton
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_triton_equals_reference(act, dtype, bias):
    x, b = make((3, 5, 4, 3), dtype, triton_device(), bias=bias)
    kw = dict(beta=2.0) if act == "softplus" else dict(d=0.75) if act == "half_huber" else {}
    inputs = [x, b] if bias else [x]
    assert_derivatives_close(
        lambda x, b=None: bias_act(x, b, act, backend="triton", **kw),
        lambda x, b=None: bias_act_reference(x, b, act, **kw),
        inputs,
        **SPEC.tolerance(dtype),
    )


@needs_triton
@pytest.mark.parametrize("act", ["softplus", "half_huber"])
def test_triton_channels_last_and_other_dims(act):
    x, b = make((2, 3, 5, 7), device=triton_device())
    x = x.contiguous(memory_format=torch.channels_last)
    out = bias_act(x, b, act, backend="triton")
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_derivatives_close(
        lambda x, b: bias_act(x, b, act, backend="triton"),
        lambda x, b: bias_act_reference(x, b, act),
        [x, b],
        **SPEC.tolerance(torch.float32),
    )
    for dim in (-1, 0):
        x, b = make((4, 3, 5), device=triton_device(), dim=dim)
        assert_derivatives_close(
            lambda x, b: bias_act(x, b, act, dim, backend="triton"),
            lambda x, b: bias_act_reference(x, b, act, dim),
            [x, b],
            **SPEC.tolerance(torch.float32),
        )


@needs_triton
def test_softplus_threshold_and_large_inputs():
    x = torch.tensor([[-100.0, -5.0, 0.0, 9.9, 10.1, 100.0]], device=triton_device())
    for threshold in (20.0, 10.0):
        torch.testing.assert_close(
            bias_act(x, act="softplus", threshold=threshold, backend="triton"),
            bias_act_reference(x, act="softplus", threshold=threshold),
        )


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("act", ["softplus", "gelu", "silu", "half_huber", "gelu_tanh", "sigmoid", "hardswish"])
def test_gradcheck_and_gradgradcheck_float64(backend, act):
    x, b = make((2, 3, 2, 2), torch.float64, "cpu" if backend == "torch" else triton_device())
    if act == "half_huber":  # keep clear of the kinks at 0 and d, where finite differences straddle them
        x = torch.where((x + b.view(1, -1, 1, 1) - 0.25).abs() < 0.2, x + 0.5, x)
        x = torch.where(
            ((x + b.view(1, -1, 1, 1)).abs() < 0.05) | ((x + b.view(1, -1, 1, 1) - 0.5).abs() < 0.05), x + 0.13, x
        )
    if act == "hardswish":  # spread u = x + b over all three pieces, clear of the kinks at -3 and 3
        u = torch.linspace(-4.6, 4.4, x.numel(), dtype=x.dtype, device=x.device).view(x.shape)
        x = u - b.view(1, -1, 1, 1)
    x.requires_grad_(True)
    b.requires_grad_(True)
    fn = lambda x, b: bias_act(x, b, act, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_new_activations_by_hand(backend):
    """f, f', f'' of gelu_tanh, sigmoid and hardswish against their closed forms (written here, not
    taken from torch), through the op's first and second derivatives."""
    device = "cpu" if backend == "torch" else triton_device()
    u = torch.tensor([-5.0, -2.0, -0.5, 0.0, 0.7, 2.5, 4.0], dtype=torch.float64, device=device)
    k, a = (2 / torch.pi) ** 0.5, 0.044715
    th = torch.tanh(k * (u + a * u**3))
    dt = k * (1 + 3 * a * u**2)
    s = 1 / (1 + torch.exp(-u))
    inside = (u > -3) & (u < 3)
    expected = {
        "gelu_tanh": (
            0.5 * u * (1 + th),
            0.5 * (1 + th) + 0.5 * u * (1 - th**2) * dt,
            (1 - th**2) * (dt + 6 * k * a * u**2 / 2 - u * th * dt**2),
        ),
        "sigmoid": (s, s * (1 - s), s * (1 - s) * (1 - 2 * s)),
        "hardswish": (
            torch.where(u < -3, 0 * u, torch.where(u > 3, u, u * (u + 3) / 6)),
            torch.where(u < -3, 0 * u, torch.where(u > 3, 1 + 0 * u, (2 * u + 3) / 6)),
            torch.where(inside, 1 / 3 + 0 * u, 0 * u),
        ),
    }
    for act, (f, f1, f2) in expected.items():
        x = u.clone().requires_grad_(True)
        y = bias_act(x, act=act, backend=backend)
        (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), x)
        for name, got, want in (("f", y, f), ("f'", g, f1), ("f''", h, f2)):
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12, msg=lambda m: f"{act} {name}: {m}")


@needs_triton
def test_opcheck():
    x, b = make((2, 3, 4, 5), device=triton_device())
    dy, v = torch.randn_like(x), torch.randn_like(x)
    ops = torch.ops.fastrob
    for act in (1, 4):
        for bias in (b, None):
            params = (act, 1, 1.0, 20.0, 0.5)
            torch.library.opcheck(ops.bias_act_triton.default, (x, bias, *params))
            torch.library.opcheck(ops.bias_act_backward_triton.default, (dy, x, bias, *params))
            torch.library.opcheck(ops.bias_act_double_backward_triton.default, (dy, x, bias, v, *params))


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(act="tanh"), ValueError, "act must be one of"),
        (dict(bias=torch.zeros(4)), ValueError, "bias must have shape"),
        (dict(bias=torch.zeros(3, dtype=torch.float64)), TypeError, "bias must have the dtype of x"),
        (dict(dim=4, bias=torch.zeros(3)), ValueError, "dim must be an int indexing"),
        (dict(dim="channels"), ValueError, "dim must be an int indexing"),
        (dict(beta=0.0), ValueError, "beta must be > 0"),
        (dict(d=-1.0), ValueError, "d must be > 0"),
        (dict(x=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "x must be a floating-point"),
        (dict(backend="cuda"), RuntimeError, "backend='cuda'"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, words):
    x = kwargs.pop("x", torch.zeros(2, 3, 4))
    with pytest.raises(error, match=words):
        bias_act(x, **kwargs)


@pytest.mark.parametrize("shape", [(), (5,), (2, 3)], ids=str)
def test_without_bias_any_rank(shape):
    """Without a bias the dimension plays no part: a BiasAct module may follow any layer."""
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(bias_act(x, act="softplus", dim=1), torch.nn.functional.softplus(x))


def test_swap_activations_keeps_the_function():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(inplace=True),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.GELU()),
        nn.Softplus(beta=3.0),
        nn.SiLU(),
        nn.GELU(approximate="tanh"),
        nn.Tanh(),
    )
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    swap_activations(model, backend="torch")
    kinds = [m.act for m in model.modules() if isinstance(m, BiasAct)]
    assert kinds == ["relu", "gelu", "softplus", "silu", "gelu_tanh"]  # tanh-GELU has its fused op
    assert isinstance(model[6], nn.Tanh)  # Tanh has none: it stays
    assert model[3].beta == 3.0
    torch.testing.assert_close(model(x), expected)


def test_swap_activations_to_half_huber_and_module_bias():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU())
    swap_activations(model, act="half_huber")
    assert model[1].act == "half_huber"
    layer = BiasAct("softplus", channels=5)
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    x = torch.randn(3, 5)
    torch.testing.assert_close(layer(x), torch.nn.functional.softplus(x))
    with pytest.raises(ValueError, match="act must be None or one of"):
        swap_activations(model, act="tanh")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        swap_activations(lambda x: x)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(128, 64, 32, 32), (128, 256, 8, 8), (3, 5, 7)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_backends_equal_reference(backend, act, dtype, shape, channels_last):
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last needs 4-d inputs")
    x, b = make(shape, dtype, "cuda")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    tol = SPEC.tolerance(dtype, large_inputs=True)
    assert_derivatives_close(
        lambda x, b: bias_act(x, b, act, backend=backend), lambda x, b: bias_act_reference(x, b, act), [x, b], **tol
    )
