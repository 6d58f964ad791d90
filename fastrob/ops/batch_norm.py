"""Fused batch norm whose double backward is fused too: ``batch_norm`` (dispatch, the semantics of
``torch.nn.functional.batch_norm``), ``batch_norm_reference`` and the
``fastrob::batch_norm_*_{triton,cuda}`` custom ops.

Per channel, over its M = N * H * W (...) elements, with r = 1 / sqrt(var + eps) (var biased),
xhat = (x - mean) r:
    training:  y = w xhat + b;  the forward saves mean and r
    backward:  gx = w r (gy - mean(gy) - xhat mean(gy xhat)),  gw = sum(gy xhat),  gb = sum(gy)
    double backward (an op of its own, so that the penalty's parameter gradient is fused): for
    V = dL/d(gx), gw' = dL/d(gw), gb' = dL/d(gb), with A = mean(gy), B = mean(gy xhat),
    Abar = mean(V), Cv = mean(V xhat), D = mean(V gy):
        d_gy = w r (V - Abar - xhat Cv) + gw' xhat + gb'
        d_x  = r (gw' - w r Cv) gy - w r^2 B V + [w r^2 (3 B Cv + A Abar - D) - r gw' B] xhat
               + r (w r (B Abar + Cv A) - gw' A)
        d_w  = r M (D - A Abar - B Cv)
    (the total derivative in x: mean and r are functions of x and get no gradient of their own).
    eval:      y = w (x - running_mean) / sqrt(running_var + eps) + b, a per-channel affine map.
Each fused pass is one split reduction, one per-channel finalize and one element-wise pass
(fastrob/triton/batch_norm.py). torch's own double backward of batch norm is a composite of many
kernels, the known bottleneck of gradient penalties through BN (pytorch issue 3076).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.overrides import handle_torch_function, has_torch_function_variadic

from fastrob._checks import check_float, check_tensor
from fastrob.ops._common import accumulate_dtype, batch_outermost_dense, define_op, launch, resolve_backend, same_layout
from fastrob.ops._registry import NORMALISATION_TOLERANCES, FusedOp, SelfCheckCase, random_tensor, register


def batch_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """The plain torch composite: batch statistics (training) or the running ones (eval), with
    the running statistics updated in place in training mode (unbiased variance, as torch).
    Half-precision inputs are computed in float32 (as the kernels) and returned in x's dtype."""
    compute = accumulate_dtype(x.dtype)
    xc = x.to(compute)
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    if training:
        mean = xc.mean(dims)
        var = (xc - mean.view(shape)).pow(2).mean(dims)
        if running_mean is not None or running_var is not None:
            m = x.numel() // x.shape[1]
            with torch.no_grad():
                if running_mean is not None:
                    running_mean.mul_(1 - momentum).add_(momentum * mean.detach().to(running_mean.dtype))
                if running_var is not None:
                    running_var.mul_(1 - momentum).add_(momentum * (var.detach() * (m / (m - 1))).to(running_var.dtype))
    else:
        mean, var = running_mean.to(compute), running_var.to(compute)
    y = (xc - mean.view(shape)) * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        y = y * weight.to(compute).view(shape)
    if bias is not None:
        y = y + bias.to(compute).view(shape)
    return y.to(x.dtype)


def _check_channel_vector(name: str, t, x: torch.Tensor) -> None:
    if t is None:
        return
    check_tensor(name, t)
    if t.shape != (x.shape[1],):
        raise ValueError(f"{name} must have shape [channels] = ({x.shape[1]},), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on the device of x ({x.device}), got {t.device}")


def batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Batch normalisation with ``torch.nn.functional.batch_norm``'s semantics, differentiable
    twice on every backend (the fused backends fuse the double backward).

    Args:
        x: [N, C, ...] floating point (NCHW contiguous or channels_last; other layouts are copied).
        weight, bias: None or [C] (x's dtype or float32).
        running_mean, running_var: None or [C] buffers. Training mode updates them in place:
            r = (1 - momentum) r + momentum * batch statistic (the variance unbiased, as torch).
            Eval mode normalises with them (both required).
        training: batch statistics (True) or running statistics (False).
        momentum: the running statistics' update factor (any finite float, as torch; [0, 1] in
            practice).
        eps: added to the variance, >= 0.
        backend: "auto" | "torch" | "triton" | "cuda". "torch" is F.batch_norm (equal to
            batch_norm_reference); Triton also runs float64.

    Returns:
        A tensor of x's shape, dtype and memory format.
    """
    tensors = (x, weight, bias, running_mean, running_var)
    if has_torch_function_variadic(*tensors):  # as F.batch_norm: a TorchFunctionMode sees this op
        return handle_torch_function(
            batch_norm, tensors, x, weight, bias, running_mean, running_var, training, momentum, eps, backend=backend
        )
    check_tensor("x", x, min_dim=2)
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _check_channel_vector(name, t, x)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    momentum = check_float("momentum", momentum)
    eps = check_float("eps", eps, min_value=0.0)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be None or both be given")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var must be given in eval mode (training=False)")
    if training and x.numel() and x.numel() // x.shape[1] == 1:
        raise ValueError(f"training mode needs more than one value per channel, got x of shape {tuple(x.shape)}")
    name = resolve_backend(backend, x, op="batch_norm")
    if name == "torch" or x.numel() == 0:  # an empty batch: torch's result, statistics untouched
        # torch's own batch norm: what batch_norm_reference spells out, in one native kernel (so a
        # swapped module computes on CPU exactly what nn.BatchNorm2d computes)
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    acc = accumulate_dtype(x.dtype)
    # per-channel vectors enter the kernels in the accumulation dtype (a differentiable cast)
    # (contiguous: the kernels index them as dense [C] vectors)
    w = weight.to(acc).contiguous() if weight is not None else None
    b = bias.to(acc).contiguous() if bias is not None else None
    if not batch_outermost_dense(x):
        x = x.contiguous()
    if not training:
        return _EVAL[name](x, w, b, running_mean.detach().to(acc), running_var.detach().to(acc), eps)
    y, mean, invstd = _OPS[name](x, w, b, eps)
    if running_mean is not None or running_var is not None:
        m = x.numel() // x.shape[1]
        with torch.no_grad():
            if running_mean is not None:
                running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            if running_var is not None:
                # var + eps = invstd^-2 to float32 precision, so var is exact up to ~1e-7 (var + eps):
                # what eval mode's sqrt(var + eps) needs; clamped, as it can round below 0
                var = (invstd.double().pow(-2) - eps).clamp_min(0) * (m / (m - 1))
                running_var.lerp_(var.to(running_var.dtype), momentum)
    return y


# The scratch buffer of a pass (both backends): [splits, 5, C] partial sums of the split
# reduction, then [8, C] coefficients of the element-wise pass.
N_SUMS, N_COEF = 5, 8
# channels per reduction program (NCHW, channels_last), as the kernels tile them
_CHANNEL_BLOCK = {"triton": (2, 64), "cuda": (1, 32)}
_MIN_ROWS_PER_SPLIT = 1024


def work_size(channels: int, splits: int) -> int:
    return (splits * N_SUMS + N_COEF) * channels


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def reduction_splits(backend: str, x: torch.Tensor) -> int:
    """Row splits of the per-channel reductions: about four programs per multiprocessor over all
    channel blocks, each split at least _MIN_ROWS_PER_SPLIT rows. Off a GPU (the Triton
    interpreter) up to three, so that small test shapes exercise the combination of partial sums."""
    n, c, s, channels_last = _geometry(x)
    rows = n * s
    if x.device.type != "cuda":
        return max(1, min(3, rows // 16))
    width = _CHANNEL_BLOCK[backend][int(channels_last)]
    channel_blocks = -(-c // width)
    target = -(
        -4 * _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device()) // channel_blocks
    )
    return max(1, min(target, -(-rows // _MIN_ROWS_PER_SPLIT)))


def _geometry(x: torch.Tensor):
    """(N, C, S, channels_last) of a dense x: the layout the kernels index."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(n * c, 1)
    return n, c, s, not x.is_contiguous()


def _dense_vector(t: torch.Tensor | None) -> torch.Tensor | None:
    # the kernels index per-channel vectors as dense [C] arrays (the ops are public: torch.ops.fastrob)
    return t.contiguous() if t is not None else None


def _triton_kernels():
    """fastrob/triton/batch_norm.py, imported when a Triton kernel first runs (not by ``import fastrob``)."""
    from fastrob.triton import batch_norm as kernels

    return kernels


def _build(backend: str):
    """training forward, backward, double-backward and eval ops of one fused backend, wired for autograd."""
    device_types = "cuda" if backend == "cuda" else None

    def dense(x):
        return x if batch_outermost_dense(x) else x.contiguous()

    def channel_values(x):
        return x.new_empty(x.shape[1], dtype=accumulate_dtype(x.dtype))

    def workspace(x, splits):
        return x.new_empty(work_size(x.shape[1], splits), dtype=accumulate_dtype(x.dtype))

    def splits_for(x):
        return reduction_splits(backend, x)

    def forward(
        x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, weight, bias = dense(x), _dense_vector(weight), _dense_vector(bias)
        y, mean, invstd = torch.empty_like(x), channel_values(x), channel_values(x)
        splits = splits_for(x)
        launch(
            backend,
            lambda: _triton_kernels().batch_norm_forward,
            "batch_norm_forward",
            (x, weight, bias, y, mean, invstd, workspace(x, splits)),
            (),
            (*_geometry(x), splits, eps),
        )
        return y, mean, invstd

    def backward(
        grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor, invstd: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, weight = dense(x), _dense_vector(weight)
        (gy,) = same_layout(x, grad_y)[1:]
        gx, gw, gb = torch.empty_like(x), channel_values(x), channel_values(x)
        splits = splits_for(x)
        launch(
            backend,
            lambda: _triton_kernels().batch_norm_backward,
            "batch_norm_backward",
            (gy, x, weight, mean, invstd, gx, gw, gb, workspace(x, splits)),
            (),
            (*_geometry(x), splits),
        )
        return gx, gw, gb

    def double_backward(
        grad_y: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        mean: torch.Tensor,
        invstd: torch.Tensor,
        ggx: torch.Tensor,
        ggw: torch.Tensor,
        ggb: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, weight = dense(x), _dense_vector(weight)
        gy, v = same_layout(x, grad_y, ggx)[1:]
        d_gy, d_x, d_w = torch.empty_like(x), torch.empty_like(x), channel_values(x)
        splits = splits_for(x)
        launch(
            backend,
            lambda: _triton_kernels().batch_norm_double_backward,
            "batch_norm_double_backward",
            (
                gy,
                x,
                weight,
                mean,
                invstd,
                v,
                ggw.contiguous(),
                ggb.contiguous(),
                d_gy,
                d_x,
                d_w if weight is not None else None,
                workspace(x, splits),
            ),
            (),
            (*_geometry(x), splits),
        )
        if weight is None:
            d_w.zero_()
        return d_gy, d_x, d_w

    def eval_forward(
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:
        x = dense(x)
        y = torch.empty_like(x)
        invstd = torch.rsqrt(running_var + eps)
        coef = x.new_zeros(4, x.shape[1], dtype=accumulate_dtype(x.dtype))
        coef[2] = weight if weight is not None else 1.0
        if bias is not None:
            coef[3] = bias
        n, c, s, channels_last = _geometry(x)
        launch(
            backend,
            lambda: _triton_kernels().batch_norm_eval,
            "batch_norm_eval",
            (x, running_mean.contiguous(), invstd, coef, y),
            (),
            (n, c, s, channels_last),
        )
        return y

    def fake3(x, *args):
        x = dense(x)
        return torch.empty_like(x), channel_values(x), channel_values(x)

    fwd = define_op(f"batch_norm_{backend}", forward, fake3, device_types=device_types)
    bwd = define_op(
        f"batch_norm_backward_{backend}",
        backward,
        lambda gy, x, *args: (torch.empty_like(dense(x)), channel_values(x), channel_values(x)),
        device_types=device_types,
    )
    dbl = define_op(
        f"batch_norm_double_backward_{backend}",
        double_backward,
        lambda gy, x, *args: (torch.empty_like(dense(x)), torch.empty_like(dense(x)), channel_values(x)),
        device_types=device_types,
    )
    evl = define_op(
        f"batch_norm_eval_{backend}",
        eval_forward,
        lambda x, *args: torch.empty_like(dense(x)),
        device_types=device_types,
    )

    def setup_forward(ctx, inputs, output):
        x, weight, bias, _ = inputs
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.save_for_backward(x, weight, output[1], output[2])

    def backward_of_forward(ctx, grad_y, grad_mean, grad_invstd):
        # mean and invstd are internal (saved for the backward), never differentiated by users
        x, weight, mean, invstd = ctx.saved_tensors
        if grad_y is None:
            grad_y = torch.zeros_like(x)
        gx, gw, gb = bwd(grad_y, x, weight, mean, invstd)
        return gx, gw if ctx.has_weight else None, gb if ctx.has_bias else None, None

    def setup_backward(ctx, inputs, output):
        grad_y, x, weight, mean, invstd = inputs
        ctx.has_weight = weight is not None
        ctx.save_for_backward(grad_y, x, weight, mean, invstd)

    def backward_of_backward(ctx, ggx, ggw, ggb):
        grad_y, x, weight, mean, invstd = ctx.saved_tensors
        ggx = ggx if ggx is not None else torch.zeros_like(x)
        ggw = ggw if ggw is not None else mean.new_zeros(mean.shape)
        ggb = ggb if ggb is not None else mean.new_zeros(mean.shape)
        d_gy, d_x, d_w = dbl(grad_y, x, weight, mean, invstd, ggx, ggw, ggb)
        # d_x is the total derivative: mean and invstd, functions of x, get none of their own
        return d_gy, d_x, d_w if ctx.has_weight else None, None, None

    fwd.register_autograd(backward_of_forward, setup_context=setup_forward)
    bwd.register_autograd(backward_of_backward, setup_context=setup_backward)

    def setup_eval(ctx, inputs, output):
        x, weight, bias, running_mean, running_var, eps = inputs
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.save_for_backward(x, weight, running_mean, running_var)
        ctx.eps = eps

    def backward_of_eval(ctx, grad_y):
        # a per-channel affine map: its backward in torch ops is itself differentiable any number of times
        x, weight, running_mean, running_var = ctx.saved_tensors
        shape = [1, -1] + [1] * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        invstd = torch.rsqrt(running_var + ctx.eps)
        scale = invstd * weight if weight is not None else invstd
        # in the scale's (float32) precision, one rounding to grad_y's dtype, as the fused passes
        gx = (grad_y.to(scale.dtype) * scale.view(shape)).to(grad_y.dtype) if ctx.needs_input_grad[0] else None
        gy = grad_y.to(invstd.dtype)
        gw = (
            (gy * (x.to(invstd.dtype) - running_mean.view(shape)) * invstd.view(shape)).sum(dims)
            if ctx.has_weight and ctx.needs_input_grad[1]
            else None
        )
        gb = gy.sum(dims) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None, None

    evl.register_autograd(backward_of_eval, setup_context=setup_eval)
    return fwd, evl


_BUILT = {backend: _build(backend) for backend in ("triton", "cuda")}
_OPS = {backend: ops[0] for backend, ops in _BUILT.items()}
_EVAL = {backend: ops[1] for backend, ops in _BUILT.items()}


def _self_check_cases(device, dtype):
    w, bias = 1.0 + 0.1 * random_tensor((3,), device, dtype, 6), random_tensor((3,), device, dtype, 7)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = random_tensor((4, 3, 5, 5), device, dtype, 5, scale=2.0).contiguous(memory_format=memory_format)
        yield SelfCheckCase(
            lambda b: lambda t, w, c: batch_norm(t, w, c, None, None, True, backend=b),
            lambda t, w, c: batch_norm_reference(t, w, c, None, None, True),
            [x, w, bias],
        )


SPEC = register(
    FusedOp(
        name="batch_norm",
        tolerances=NORMALISATION_TOLERANCES,
        self_check_cases=_self_check_cases,
    )
)
