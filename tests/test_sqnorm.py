"""fastrob.ops.sqnorm: the reference by hand, every backend's value and first and second
derivatives against it, float64 gradcheck/gradgradcheck, opcheck, layouts and errors."""

import sys

import pytest
import torch
from op_checks import assert_derivatives_close, triton_device, triton_runs_here

from fastrob.ops import sqnorm, sqnorm_reference
from fastrob.ops.sqnorm import SPEC

needs_triton = pytest.mark.skipif(not triton_runs_here(), reason="triton cannot run here")


def test_reference_by_hand():
    g = torch.tensor([[[3.0, 4.0]], [[1.0, -2.0]]])
    torch.testing.assert_close(sqnorm_reference(g), torch.tensor([25.0, 5.0]))
    torch.testing.assert_close(sqnorm_reference(g, dim=0), torch.tensor([[10.0, 20.0]]))
    assert sqnorm_reference(g.half()).dtype == torch.float32


SHAPES = [((3, 5), None), ((4, 3, 7, 5), None), ((2, 5000), None), ((3, 2, 5), (0, 2)), ((3, 6), -1), ((1, 1), None)]


@needs_triton
@pytest.mark.parametrize("shape, dim", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_triton_equals_reference(shape, dim, dtype):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device=triton_device(), dtype=dtype)
    assert_derivatives_close(
        lambda t: sqnorm(t, dim, backend="triton"), lambda t: sqnorm_reference(t, dim), [g], **SPEC.tolerance(dtype)
    )


@needs_triton
def test_triton_channels_last_and_views():
    g = torch.randn(2, 3, 4, 5, device=triton_device()).contiguous(memory_format=torch.channels_last)
    assert_derivatives_close(
        lambda t: sqnorm(t, backend="triton"), sqnorm_reference, [g], **SPEC.tolerance(torch.float32)
    )
    view = torch.randn(3, 8, device=triton_device())[:, ::2]
    torch.testing.assert_close(sqnorm(view, backend="triton"), sqnorm_reference(view))


@needs_triton
def test_per_sample_norms_of_channels_last_g_read_it_in_place(monkeypatch):
    # the rows handed to the kernel are a view of g's memory (no channels_last -> contiguous copy)
    module = sys.modules["fastrob.ops.sqnorm"]  # fastrob.ops.sqnorm the attribute is the function
    seen = []
    op = module._OPS["triton"]
    monkeypatch.setitem(module._OPS, "triton", lambda rows: seen.append(rows) or op(rows))
    g = torch.randn(2, 3, 4, 5, device=triton_device()).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(sqnorm(g, backend="triton"), sqnorm_reference(g))
    assert seen[0].is_contiguous() and seen[0].data_ptr() == g.data_ptr()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_gradcheck_and_gradgradcheck_float64(backend):
    g = torch.randn(
        3, 2, 5, dtype=torch.float64, device="cpu" if backend == "torch" else triton_device(), requires_grad=True
    )
    for dim in (None, (0, 2)):
        fn = lambda t: sqnorm(t, dim, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(fn, g)
        assert torch.autograd.gradgradcheck(fn, g)


@needs_triton
def test_opcheck():
    g = torch.randn(3, 7, device=triton_device())
    go, v = torch.randn(3, device=g.device), torch.randn(3, 7, device=g.device)
    ops = torch.ops.fastrob
    torch.library.opcheck(ops.sqnorm_triton.default, (g,))
    torch.library.opcheck(ops.sqnorm_backward_triton.default, (g, go))
    torch.library.opcheck(ops.sqnorm_double_backward_triton.default, (g, go, v))


@needs_triton
def test_empty_rows_and_columns():
    assert sqnorm(torch.empty(0, 4, device=triton_device()), backend="triton").shape == (0,)
    torch.testing.assert_close(
        sqnorm(torch.empty(3, 0, device=triton_device()), backend="triton"), torch.zeros(3, device=triton_device())
    )


def test_auto_is_the_reference_on_cpu():
    g = torch.randn(2, 3, requires_grad=True)
    assert sqnorm(g).grad_fn.name() == sqnorm_reference(g).grad_fn.name()


@pytest.mark.parametrize(
    "args, error, words",
    [
        ((torch.zeros(3, dtype=torch.int64),), TypeError, "g must be a floating-point"),
        (([1.0, 2.0],), TypeError, "g must be a torch.Tensor"),
        ((torch.zeros(3),), ValueError, "g must have at least 2 dimensions"),
        ((torch.zeros(2, 3), 2), ValueError, "dim must index"),
        ((torch.zeros(2, 3), (1, 1)), ValueError, "dim must not repeat"),
        ((torch.zeros(2, 3), "1"), TypeError, "dim must be None, an int"),
        ((torch.zeros(2, 3), ()), TypeError, "dim must be None, an int"),
    ],
)
def test_bad_input_names_the_argument(args, error, words):
    with pytest.raises(error, match=words):
        sqnorm(*args)


def test_kernel_backend_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        sqnorm(torch.zeros(2, 3), backend="fast")
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        sqnorm(torch.zeros(2, 3), backend="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(128, 3, 32, 32), (7, 100003), (4096, 10)], ids=str)
def test_gpu_backends_equal_reference(backend, dtype, shape):
    g = torch.randn(shape, device="cuda", dtype=dtype)
    assert_derivatives_close(
        lambda t: sqnorm(t, backend=backend),
        sqnorm_reference,
        [g],
        **SPEC.tolerance(dtype, large_inputs=True),
    )


@pytest.mark.cuda
def test_gpu_triton_backward_of_a_row_wider_than_65535_column_blocks():
    # the backward's grid is 1-D: column blocks on grid axis 1 stopped at 65535 x 1024 columns
    g = torch.randn(1, 65536 * 1024 + 5, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    (dg,) = torch.autograd.grad(sqnorm(g, backend="triton").sum(), g)
    torch.testing.assert_close(dg, 2 * g.detach(), rtol=0, atol=0)
