"""Fused cross-entropy with a twice-differentiable backward: ``cross_entropy`` (dispatch),
``cross_entropy_reference`` and the ``fastrob::cross_entropy_{triton,cuda}`` custom ops.

Per row, q = (1 - e) onehot(y) + e / C (e = label_smoothing), p = softmax(z):
    loss = logsumexp(z) - q.z
    dloss/dz = p - q                                   (one elementwise pass given logsumexp)
    d/dz [gl (p - q)] . V = gl p (V - p.V)             (softmax Hessian-vector product)
The forward saves only the logits and the row's logsumexp; the backward is an op whose own
backward (the product above plus the gradient for the incoming gl) is one fused kernel. This is
what an input-gradient penalty differentiates: the penalty's parameter gradient runs through the
CE backward (the stylegan2-ada pattern, docs/design.md#backends-and-dispatch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastrob._checks import check_float, dtype_name
from fastrob.ops._common import accumulate_dtype, define_op, dense_like, launch, resolve_backend
from fastrob.ops._registry import FusedOp, SelfCheckCase, Tolerance, random_tensor, register

REDUCTIONS = ("mean", "sum", "none")


def cross_entropy_reference(
    logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean", label_smoothing: float = 0.0
) -> torch.Tensor:
    """torch's cross-entropy, computed in float32 at least (float64 stays float64) as the kernels do."""
    return F.cross_entropy(
        logits.to(accumulate_dtype(logits.dtype)), target, reduction=reduction, label_smoothing=label_smoothing
    )


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of [B, C] logits against class indices, differentiable twice on every backend.

    Args:
        logits: [B, C] floating point; any C (the kernels loop over column blocks).
        target: [B] integer class indices in [0, C).
        reduction: "mean" | "sum" | "none" (per-sample losses, [B]).
        label_smoothing: e in [0, 1]: the target distribution is (1 - e) onehot + e / C
            (as torch.nn.functional.cross_entropy). The kernels round e to float32.
        backend: "auto" | "torch" | "triton" | "cuda". Triton also runs float64.

    Returns:
        The loss in float32 (float64 for float64 logits), also for half-precision logits.
    """
    check_ce_args(logits, target, reduction, label_smoothing)
    name = resolve_backend(backend, logits, op="cross_entropy")
    if name == "torch":
        return cross_entropy_reference(logits, target, reduction, float(label_smoothing))
    loss = cross_entropy_unchecked(logits, target, float(label_smoothing), backend=name)
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


def cross_entropy_unchecked(
    logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0, *, backend: str
) -> torch.Tensor:
    """Per-sample losses on a resolved fused backend ("triton" or "cuda"), without argument checks
    (the label range check costs a device synchronisation): for callers that checked already."""
    loss, _ = _OPS[backend](logits, target.long().contiguous(), float(label_smoothing))
    return loss


def check_ce_args(logits, target, reduction, label_smoothing) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got dtype {dtype_name(logits.dtype)}")
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must have shape [batch, classes] with classes >= 1, got {tuple(logits.shape)}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must hold integer class indices, got dtype {dtype_name(target.dtype)}")
    if target.shape != (logits.shape[0],):
        raise ValueError(f"target must have shape [batch] = ({logits.shape[0]},), got {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target must be on the device of logits ({logits.device}), got {target.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    e = check_float("label_smoothing", label_smoothing, min_value=0.0)
    if e > 1:
        raise ValueError(f"label_smoothing must be in [0, 1], got {e}")
    if target.numel():  # one device synchronisation: a kernel would read out of bounds
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= logits.shape[1]:
            raise ValueError(f"target must hold class indices in [0, {logits.shape[1]}), got values in [{low}, {high}]")


def _triton_kernels():
    """fastrob/triton/cross_entropy.py, imported when a Triton kernel first runs (not by ``import fastrob``)."""
    from fastrob.triton import cross_entropy as kernels

    return kernels


def _build(backend: str):
    """forward, backward and double-backward ops of one fused backend, wired for autograd."""
    device_types = "cuda" if backend == "cuda" else None

    def row_values(z):
        return z.new_empty(z.shape[0], dtype=accumulate_dtype(z.dtype))

    def forward(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
        z = logits.contiguous()
        loss, lse = row_values(z), row_values(z)
        launch(
            backend,
            lambda: _triton_kernels().cross_entropy_forward,
            "cross_entropy_forward",
            (z, target, loss, lse),
            z.shape,
            (smoothing,),
        )
        return loss, lse

    def backward(
        logits: torch.Tensor,
        target: torch.Tensor,
        lse: torch.Tensor,
        grad_loss: torch.Tensor,
        grad_lse: torch.Tensor | None,
        smoothing: float,
    ) -> torch.Tensor:
        z = logits.contiguous()
        dz = dense_like(z)
        gs = grad_lse.contiguous() if grad_lse is not None else None
        launch(
            backend,
            lambda: _triton_kernels().cross_entropy_backward,
            "cross_entropy_backward",
            (z, target, lse, grad_loss.contiguous(), gs, dz),
            z.shape,
            (smoothing,),
        )
        return dz

    def double_backward(
        logits: torch.Tensor,
        target: torch.Tensor,
        lse: torch.Tensor,
        grad_loss: torch.Tensor,
        grad_lse: torch.Tensor | None,
        grad_grad: torch.Tensor,
        smoothing: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = logits.contiguous()
        d_z, d_gl, d_gs = dense_like(z), row_values(z), row_values(z)
        gs = grad_lse.contiguous() if grad_lse is not None else None
        launch(
            backend,
            lambda: _triton_kernels().cross_entropy_double_backward,
            "cross_entropy_double_backward",
            (z, target, lse, grad_loss.contiguous(), gs, grad_grad.contiguous(), d_z, d_gl, d_gs),
            z.shape,
            (smoothing,),
        )
        return d_z, d_gl, d_gs

    fwd = define_op(
        f"cross_entropy_{backend}", forward, lambda z, t, e: (row_values(z), row_values(z)), device_types=device_types
    )
    bwd = define_op(
        f"cross_entropy_backward_{backend}",
        backward,
        lambda z, t, lse, gl, gs, e: dense_like(z),
        device_types=device_types,
    )
    dbl = define_op(
        f"cross_entropy_double_backward_{backend}",
        double_backward,
        lambda z, t, lse, gl, gs, v, e: (dense_like(z), row_values(z), row_values(z)),
        device_types=device_types,
    )

    def setup_forward(ctx, inputs, output):
        ctx.smoothing = inputs[2]
        ctx.save_for_backward(inputs[0], inputs[1], output[1])

    def backward_of_forward(ctx, grad_loss, grad_lse):
        z, target, lse = ctx.saved_tensors
        return bwd(z, target, lse, grad_loss, grad_lse, ctx.smoothing), None, None

    def setup_backward(ctx, inputs, output):
        ctx.smoothing = inputs[5]
        ctx.has_gs = inputs[4] is not None
        ctx.save_for_backward(*(t for t in inputs[:5] if t is not None))

    def backward_of_backward(ctx, grad_grad):
        z, target, lse, gl, *gs = ctx.saved_tensors
        d_z, d_gl, d_gs = dbl(z, target, lse, gl, gs[0] if gs else None, grad_grad, ctx.smoothing)
        # lse is a function of z whose derivative d_z already includes: it gets none of its own.
        return d_z, None, None, d_gl, d_gs if ctx.has_gs else None, None

    fwd.register_autograd(backward_of_forward, setup_context=setup_forward)
    bwd.register_autograd(backward_of_backward, setup_context=setup_backward)
    return fwd


_OPS = {backend: _build(backend) for backend in ("triton", "cuda")}


def _self_check_cases(device, dtype):
    z = random_tensor((4, 37), device, dtype, 2, scale=3.0)
    y = torch.tensor([0, 5, 36, 17], device=device)
    yield SelfCheckCase(
        lambda b: lambda t, y: cross_entropy(t, y, "mean", 0.1, backend=b),
        lambda t, y: cross_entropy_reference(t, y, "mean", 0.1),
        [z, y],
    )


SPEC = register(
    FusedOp(
        name="cross_entropy",
        tolerances={
            torch.float32: Tolerance(1e-5, 1e-5),
            # the kernels take label_smoothing as a float32 scalar (Triton's float arguments), so
            # smoothed float64 losses agree to about 1e-9 relative rather than to rounding
            torch.float64: Tolerance(1e-7, 1e-7),
            torch.float16: Tolerance(2e-3, 2e-3),
            torch.bfloat16: Tolerance(1e-2, 1e-2),
        },
        self_check_cases=_self_check_cases,
        # float32 rows of thousands of classes and means over thousands of rows, summed in other orders
        large_input_tolerances={torch.float32: Tolerance(1e-4, 1e-4)},
    )
)
