"""fastrob.ops.cross_entropy: the reference against torch, every backend's value and first and
second derivatives against it (rows of 1 to 5000 classes, label smoothing, reductions), float64
gradcheck/gradgradcheck, opcheck and errors."""

import pytest
import torch
import torch.nn.functional as F
from op_checks import assert_derivatives_close, triton_device, triton_runs_here

from fastrob.ops import cross_entropy, cross_entropy_reference
from fastrob.ops.cross_entropy import SPEC

needs_triton = pytest.mark.skipif(not triton_runs_here(), reason="triton cannot run here")


def make(rows, cols, dtype=torch.float32, device="cpu", seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = (scale * torch.randn(rows, cols, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)
    y = torch.randint(0, cols, (rows,), generator=g).to(device)
    return z, y


def test_reference_is_torch_in_float32():
    z, y = make(4, 6, torch.bfloat16)
    out = cross_entropy_reference(z, y, "none", 0.2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.cross_entropy(z.float(), y, reduction="none", label_smoothing=0.2))


CASES = [
    (5, 10, 0.0, "none"),
    (3, 1, 0.0, "none"),
    (4, 37, 0.1, "mean"),
    (2, 5000, 0.05, "sum"),
    (1, 4097, 0.0, "mean"),
]


@needs_triton
@pytest.mark.parametrize("rows, cols, smoothing, reduction", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_triton_equals_reference(rows, cols, smoothing, reduction, dtype):
    z, y = make(rows, cols, dtype, triton_device())
    assert_derivatives_close(
        lambda t, y: cross_entropy(t, y, reduction, smoothing, backend="triton"),
        lambda t, y: cross_entropy_reference(t, y, reduction, smoothing),
        [z, y],
        **SPEC.tolerance(dtype),
    )


@needs_triton
def test_triton_extreme_logits_stay_finite():
    # a max-subtracting logsumexp: logits of 1e4 would overflow exp in float32 otherwise
    z, y = make(3, 300, device=triton_device(), scale=1e4)
    out = cross_entropy(z, y, "none", backend="triton")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, cross_entropy_reference(z, y, "none"), rtol=1e-5, atol=1e-2)


def masked(rows, cols, dtype, device):
    """Logits with -inf in every other column and whole leading runs (masked classes): a lane or
    thread that sees only -inf columns must add exp(-inf) = 0, not exp(-inf - -inf) = nan."""
    z, _ = make(rows, cols, torch.float32)
    z[:, 1::2] = float("-inf")
    z[:, : cols // 2 - 1] = float("-inf")
    y = torch.full((rows,), (cols - 1) // 2 * 2, dtype=torch.int64)  # the last finite (even) column
    return z.to(device=device, dtype=dtype), y.to(device)


@pytest.mark.parametrize(
    "backend", ["torch", pytest.param("triton", marks=needs_triton), pytest.param("cuda", marks=pytest.mark.cuda)]
)
@pytest.mark.parametrize("cols", [7, 300, 5000])
def test_minus_inf_logits_give_the_finite_loss(backend, cols):
    device = "cpu" if backend == "torch" else triton_device() if backend == "triton" else "cuda"
    z, y = masked(3, cols, torch.float32, device)
    out = cross_entropy(z, y, "none", backend=backend)
    assert torch.isfinite(out).all(), out
    torch.testing.assert_close(
        out.cpu(), F.cross_entropy(z.cpu(), y.cpu(), reduction="none"), **SPEC.tolerance(torch.float32)
    )
    assert_derivatives_close(
        lambda t, y: cross_entropy(t, y, "mean", backend=backend),
        lambda t, y: cross_entropy_reference(t, y, "mean"),
        [z, y],
        **SPEC.tolerance(torch.float32),
    )


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_gradcheck_and_gradgradcheck_float64(backend, smoothing):
    z, y = make(3, 7, torch.float64, "cpu" if backend == "torch" else triton_device())
    z.requires_grad_(True)
    fn = lambda t: cross_entropy(t, y, "none", smoothing, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, z)
    assert torch.autograd.gradgradcheck(fn, z)


@needs_triton
def test_input_gradient_penalty_through_the_ops():
    """What the regularizers differentiate: the parameter gradient of ||d CE / dx||^2 for a
    linear model, fused CE against torch."""
    dev = triton_device()
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64).to(dev)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64).to(dev)
    y = torch.randint(0, 4, (6,), generator=g).to(dev)

    def penalty_grad(ce):
        w_ = w.clone().requires_grad_(True)
        x_ = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(ce(x_ @ w_, y).sum(), x_, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), w_)[0]

    torch.testing.assert_close(
        penalty_grad(lambda z, y: cross_entropy(z, y, "none", 0.1, backend="triton")),
        penalty_grad(lambda z, y: cross_entropy_reference(z, y, "none", 0.1)),
        rtol=1e-6,
        atol=1e-8,
    )  # float32 label_smoothing, see SPEC's float64 tolerance


@needs_triton
def test_opcheck():
    z, y = make(3, 7, device=triton_device())
    lse = torch.logsumexp(z, 1)
    gl, gs, v = torch.randn(3, device=z.device), torch.randn(3, device=z.device), torch.randn_like(z)
    ops = torch.ops.fastrob
    torch.library.opcheck(ops.cross_entropy_triton.default, (z, y, 0.1))
    for grad_lse in (None, gs):
        torch.library.opcheck(ops.cross_entropy_backward_triton.default, (z, y, lse, gl, grad_lse, 0.1))
        torch.library.opcheck(ops.cross_entropy_double_backward_triton.default, (z, y, lse, gl, grad_lse, v, 0.1))


@needs_triton
def test_empty_batch():
    z = torch.empty(0, 5, device=triton_device())
    y = torch.empty(0, dtype=torch.long, device=z.device)
    assert cross_entropy(z, y, "none", backend="triton").shape == (0,)
    assert cross_entropy(z, y, "sum", backend="triton").item() == 0.0


def call(**overrides):
    z, y = make(2, 3)
    kwargs = dict(logits=z, target=y)
    kwargs.update(overrides)
    return cross_entropy(kwargs.pop("logits"), kwargs.pop("target"), **kwargs)


@pytest.mark.parametrize(
    "overrides, error, words",
    [
        (dict(logits=torch.zeros(2, 3, 1)), ValueError, "logits must have shape"),
        (dict(logits=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "logits must be a floating-point"),
        (dict(logits=[[0.0]]), TypeError, "logits must be a torch.Tensor"),
        (dict(target=torch.zeros(2)), TypeError, "target must hold integer"),
        (dict(target=torch.zeros(3, dtype=torch.long)), ValueError, "target must have shape"),
        (dict(target=torch.tensor([0, 3])), ValueError, "target must hold class indices in"),
        (dict(target=torch.tensor([-1, 0])), ValueError, "target must hold class indices in"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing must be >= 0"),
        (dict(backend="cuda"), RuntimeError, "backend='cuda'"),
    ],
)
def test_bad_input_names_the_argument(overrides, error, words):
    with pytest.raises(error, match=words):
        call(**overrides)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows, cols", [(4096, 1000), (512, 10), (8, 50257), (3, 1)], ids=str)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_gpu_backends_equal_reference(backend, dtype, rows, cols, smoothing):
    z, y = make(rows, cols, dtype, "cuda")
    tol = SPEC.tolerance(dtype, large_inputs=True)
    assert_derivatives_close(
        lambda t, y: cross_entropy(t, y, "mean", smoothing, backend=backend),
        lambda t, y: cross_entropy_reference(t, y, "mean", smoothing),
        [z, y],
        **tol,
    )


@pytest.mark.cuda
def test_gpu_triton_backward_of_a_row_wider_than_65535_column_blocks():
    # the backward's grid is 1-D: column blocks on grid axis 1 stopped at 65535 x 1024 columns
    z = torch.randn(1, 65536 * 1024 + 5, device="cuda", dtype=torch.bfloat16)
    y = torch.tensor([3], device="cuda")
    z.requires_grad_(True)
    (dz,) = torch.autograd.grad(cross_entropy(z, y, "sum", backend="triton"), z)
    (expected,) = torch.autograd.grad(cross_entropy_reference(z, y, "sum"), z)
    torch.testing.assert_close(dz.float(), expected.float(), **SPEC.tolerance(torch.bfloat16))


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_launch_on_the_tensors_device_not_the_current_one(backend):
    z, y = make(4, 37, torch.float32, "cuda:1")
    with torch.cuda.device(0):
        out = cross_entropy(z, y, "none", backend=backend)
    torch.testing.assert_close(out, cross_entropy_reference(z, y, "none"), **SPEC.tolerance(torch.float32))
