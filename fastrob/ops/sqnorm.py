"""The squared-norm reduction of gradient penalties: ``sqnorm`` (dispatch), ``sqnorm_reference``
and the ``fastrob::sqnorm_{triton,cuda}`` custom ops with twice-differentiable backward.

    s = sum_{dims} g^2,   ds/dg = 2 g,   and the backward 2 * go * g is itself an op whose
    backward (d_g = 2 go V, d_go = 2 sum g V) is one fused kernel.

This is the last step of an input-gradient penalty: the penalty's parameter gradient runs back
through it, so it sits inside the double backward (stylegan2-ada's bias_act pattern,
docs/design.md#backends-and-dispatch).
"""

from __future__ import annotations

import torch

from fastrob._checks import check_tensor
from fastrob.ops._common import accumulate_dtype, define_op, dense_like, launch, resolve_backend
from fastrob.ops._registry import FusedOp, SelfCheckCase, Tolerance, random_tensor, register


def sqnorm_reference(g: torch.Tensor, dim=None) -> torch.Tensor:
    """sum of g^2 over ``dim`` (default: every dimension but the first, i.e. per sample),
    accumulated and returned in float32 (float64 for float64 input)."""
    dims = _dims(g, dim)
    return g.to(accumulate_dtype(g.dtype)).pow(2).sum(dims)


def sqnorm(g: torch.Tensor, dim=None, *, backend: str = "auto") -> torch.Tensor:
    """Sum of squares of ``g`` over ``dim``, differentiable twice on every backend.

    Args:
        g: a floating-point tensor.
        dim: an int or a tuple of ints to reduce; None (default) reduces every dimension but the
            first, giving one squared norm per sample.
        backend: "auto" | "torch" | "triton" | "cuda" (fastrob._backend). Triton runs float64 too.

    Returns:
        The kept dimensions of ``g``, float32 (float64 for float64 input).
    """
    check_tensor("g", g)
    dims = _dims(g, dim)
    name = resolve_backend(backend, g, op="sqnorm")
    if name == "torch":
        return sqnorm_reference(g, dims)
    kept = [d for d in range(g.dim()) if d not in dims]
    kept_shape = [g.shape[d] for d in kept]
    if kept == [0]:
        # Per-sample norms do not depend on the order of a sample's elements: reduce them in memory
        # order (largest stride first), so that a channels_last g gives a view, not a copy.
        dims = tuple(sorted(dims, key=lambda d: -g.stride(d)))
    # Reduced dimensions last, one row per kept index: a view for per-sample norms of dense g.
    rows = g.permute(*kept, *dims).reshape(_numel(kept_shape), _numel([g.shape[d] for d in dims]))
    return _OPS[name](rows).view(kept_shape)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _dims(g: torch.Tensor, dim) -> tuple:
    if dim is None:
        if g.dim() < 2:
            raise ValueError(
                f"g must have at least 2 dimensions for per-sample norms (dim=None), got shape {tuple(g.shape)}"
            )
        return tuple(range(1, g.dim()))
    dims = (dim,) if isinstance(dim, int) else dim
    if (
        not isinstance(dims, (tuple, list))
        or not dims
        or any(isinstance(d, bool) or not isinstance(d, int) for d in dims)
    ):
        raise TypeError(f"dim must be None, an int or a non-empty tuple of ints, got {dim!r}")
    if any(not -g.dim() <= d < g.dim() for d in dims):
        raise ValueError(f"dim must index the {g.dim()} dimensions of g, got {dim!r}")
    norm = tuple(sorted({d % g.dim() for d in dims}))
    if len(norm) != len(dims):
        raise ValueError(f"dim must not repeat a dimension, got {dim!r}")
    return norm


def _triton_kernels():
    """fastrob/triton/sqnorm.py, imported when a Triton kernel first runs (not by ``import fastrob``)."""
    from fastrob.triton import sqnorm as kernels

    return kernels


def _build(backend: str):
    """forward, backward and double-backward ops of one fused backend, wired for autograd."""
    device_types = "cuda" if backend == "cuda" else None

    def forward(g: torch.Tensor) -> torch.Tensor:
        g = g.contiguous()
        out = g.new_empty(g.shape[0], dtype=accumulate_dtype(g.dtype))
        launch(backend, lambda: _triton_kernels().sqnorm_forward, "sqnorm_forward", (g, out), g.shape)
        return out

    def backward(g: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        g = g.contiguous()
        dg = dense_like(g)
        launch(
            backend,
            lambda: _triton_kernels().sqnorm_backward,
            "sqnorm_backward",
            (g, grad_out.contiguous(), dg),
            g.shape,
        )
        return dg

    def double_backward(
        g: torch.Tensor, grad_out: torch.Tensor, grad_grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        g = g.contiguous()
        d_g, d_go = dense_like(g), dense_like(grad_out)
        launch(
            backend,
            lambda: _triton_kernels().sqnorm_double_backward,
            "sqnorm_double_backward",
            (g, grad_out.contiguous(), grad_grad.contiguous(), d_g, d_go),
            g.shape,
        )
        return d_g, d_go

    fwd = define_op(
        f"sqnorm_{backend}",
        forward,
        lambda g: g.new_empty(g.shape[0], dtype=accumulate_dtype(g.dtype)),
        device_types=device_types,
    )
    bwd = define_op(
        f"sqnorm_backward_{backend}", backward, lambda g, grad_out: dense_like(g), device_types=device_types
    )
    dbl = define_op(
        f"sqnorm_double_backward_{backend}",
        double_backward,
        lambda g, grad_out, grad_grad: (dense_like(g), dense_like(grad_out)),
        device_types=device_types,
    )

    def save_inputs(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    fwd.register_autograd(lambda ctx, go: bwd(ctx.saved_tensors[0], go), setup_context=save_inputs)
    bwd.register_autograd(lambda ctx, v: dbl(*ctx.saved_tensors, v), setup_context=save_inputs)
    return fwd


_OPS = {backend: _build(backend) for backend in ("triton", "cuda")}


def _self_check_cases(device, dtype):
    g = random_tensor((3, 37), device, dtype, 1)
    yield SelfCheckCase(lambda b: lambda t: sqnorm(t, backend=b), sqnorm_reference, [g])


SPEC = register(
    FusedOp(
        name="sqnorm",
        tolerances={
            torch.float32: Tolerance(1e-5, 1e-5),
            torch.float64: Tolerance(1e-12, 1e-12),
            torch.float16: Tolerance(2e-3, 2e-3),
            torch.bfloat16: Tolerance(1e-2, 1e-2),
        },
        self_check_cases=_self_check_cases,
        # float32 sums of 1e5 squares: one rounding per term, in another order than torch's
        large_input_tolerances={torch.float32: Tolerance(1e-5, 1e-4)},
    )
)
