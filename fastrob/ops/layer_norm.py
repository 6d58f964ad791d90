"""Fused layer norm whose double backward is fused too: ``layer_norm`` (dispatch: ``nn.LayerNorm``'s
semantics over the last dimension, or over the channels of [B, C, ...] as timm's ``LayerNorm2d``),
``layer_norm_reference`` and the ``fastrob::layer_norm_*_triton`` custom ops.

Per row of C elements (the last dimension, or the channels at one position), with
r = 1 / sqrt(var + eps) (var biased), xhat = (x - mean) r and per-column w, b:
    y = w xhat + b
    backward:  g = gy w, A = mean(g), B = mean(g xhat):  gx = r (g - A - B xhat),
               gw = sum over rows of gy xhat,  gb = sum over rows of gy
    double backward (an op of its own): for V = dL/d(gx), gw' = dL/d(gw), gb' = dL/d(gb), q = gw' gy,
    Vbar = mean(V), Cv = mean(V xhat), D = mean(V g), qbar = mean(q), Qx = mean(q xhat):
        d_gy = w r (V - Vbar - Cv xhat) + gw' xhat + gb'
        d_x  = r^2 (-Cv g - B V + A Cv + B Vbar + (3 B Cv + A Vbar - D) xhat) + r (q - qbar - Qx xhat)
        d_w  = sum over rows of gy r (V - Vbar - Cv xhat)
    Derivation: sum V gx = r C (D - Vbar A - B Cv) and sum gw' gw = sum q xhat per row; a function
    F(xhat) of a row has dF/dx = r (h - mean(h) - xhat mean(h xhat)) (h = dF/dxhat), and
    dr/dx = -r^2 xhat / C. d_x is the total derivative: mean and r are functions of x.
Each pass is one row kernel (the row's sums, then its element-wise outputs) and, for the weight's
and bias's gradients, one split column reduction (fastrob/triton/layer_norm.py).

There are Triton kernels only: ``backend="cuda"`` raises, and ``auto`` picks Triton on a GPU.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fastrob._checks import check_float, check_tensor, dtype_name
from fastrob.ops._common import accumulate_dtype, define_op, launch, resolve_backend, same_layout
from fastrob.ops._registry import NORMALISATION_TOLERANCES, FusedOp, SelfCheckCase, Tolerance, random_tensor, register

# the fused backends that have layer norm kernels (fastrob._C has none)
FUSED_BACKENDS = ("triton",)


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    channels_first: bool = False,
) -> torch.Tensor:
    """The plain torch composite: mean and biased variance over the last dimension (or dim 1 with
    ``channels_first``), computed in float32 for half-precision input (as the kernels) and
    returned in x's dtype."""
    compute = accumulate_dtype(x.dtype)
    xc = x.to(compute)
    dim = 1 if channels_first else -1
    mean = xc.mean(dim, keepdim=True)
    var = (xc - mean).pow(2).mean(dim, keepdim=True)
    y = (xc - mean) * torch.rsqrt(var + eps)
    shape = [-1] + [1] * (x.dim() - 2) if channels_first else [-1]
    if weight is not None:
        y = y * weight.to(compute).view(shape)
    if bias is not None:
        y = y + bias.to(compute).view(shape)
    return y.to(x.dtype)


def _check_vector(name: str, t, x: torch.Tensor, c: int) -> None:
    if t is None:
        return
    check_tensor(name, t)
    if t.shape != (c,):
        raise ValueError(f"{name} must have shape [normalised size] = ({c},), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on the device of x ({x.device}), got {t.device}")
    half = x.dtype in (torch.float16, torch.bfloat16)
    if t.dtype != x.dtype and not (half and t.dtype == torch.float32):
        also = " or float32" if half else ""
        raise TypeError(f"{name} must have x's dtype {dtype_name(x.dtype)}{also}, got {dtype_name(t.dtype)}")


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    channels_first: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Layer normalisation, differentiable twice on every backend (the Triton backend fuses the
    double backward).

    Args:
        x: floating point. channels_first=False: [..., C], normalised over the last dimension
            (``F.layer_norm(x, (C,), ...)``); channels_first=True: [B, C, ...] normalised over C at
            each position (timm's LayerNorm2d, ConvNeXt), NCHW or channels_last.
        weight, bias: None or [C] (x's dtype or float32).
        eps: added to the variance, >= 0.
        backend: "auto" | "torch" | "triton". "torch" is torch's own layer norm (equal to
            layer_norm_reference); Triton also runs float64. "cuda" raises: fastrob._C has no
            layer norm kernels.

    Returns:
        A tensor of x's shape and dtype (and memory format, for channels_last input).
    """
    check_tensor("x", x, min_dim=2 if channels_first else 1)
    if not isinstance(channels_first, bool):
        raise TypeError(f"channels_first must be a bool, got {type(channels_first).__name__}")
    c = x.shape[1] if channels_first else x.shape[-1]
    _check_vector("weight", weight, x, c)
    _check_vector("bias", bias, x, c)
    eps = check_float("eps", eps, min_value=0.0)
    name = resolve_backend(backend, x, op=SPEC.name, fused=SPEC.fused_backends)
    if name == "torch" or x.numel() == 0:
        if channels_first:
            # torch's layer norm over the last dimension of the channels-last view (timm's LayerNorm2d)
            y = F.layer_norm(x.movedim(1, -1), (c,), weight, bias, eps).movedim(-1, 1)
            return y.contiguous(memory_format=_memory_format(x))
        return F.layer_norm(x, (c,), weight, bias, eps)
    acc = accumulate_dtype(x.dtype)
    # per-column vectors enter the kernels in the accumulation dtype (a differentiable cast)
    w = weight.to(acc).contiguous() if weight is not None else None
    b = bias.to(acc).contiguous() if bias is not None else None
    y, _, _ = _OPS[name](_dense(x, channels_first), w, b, eps, channels_first)
    return y


def _memory_format(x: torch.Tensor):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _dense(x: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """x in a layout the kernels index: contiguous, or channels_last for channels_first input."""
    if x.is_contiguous() or (channels_first and _memory_format(x) == torch.channels_last):
        return x
    return x.contiguous()


def geometry(x: torch.Tensor, channels_first: bool) -> tuple[int, int, int]:
    """(rows, C, inner) of a dense x (fastrob/triton/layer_norm.py): channels_last storage of a
    channels-first layer norm has its channels adjacent, as a last-dimension one."""
    if channels_first:
        c = x.shape[1]
        inner = 1 if not x.is_contiguous() else x.numel() // max(x.shape[0] * c, 1)
    else:
        c, inner = x.shape[-1], 1
    return x.numel() // max(c, 1), c, inner


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def column_splits(x: torch.Tensor, rows: int, c: int, inner: int) -> int:
    """Row splits of the column reductions: about four programs per multiprocessor over the column
    blocks, each split at least 512 rows; off a GPU (the interpreter) up to three, so that small
    test shapes exercise the sum of partial sums."""
    if x.device.type != "cuda":
        return max(1, min(3, rows // 8))
    from fastrob.triton.layer_norm import column_tile

    blocks = -(-c // column_tile(inner)[1])
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return max(1, min(-(-4 * _sm_count(index) // blocks), -(-rows // 512)))


def _triton_kernels():
    """fastrob/triton/layer_norm.py, imported when a Triton kernel first runs (not by ``import fastrob``)."""
    from fastrob.triton import layer_norm as kernels

    return kernels


def _build(backend: str):
    """forward, backward and double-backward ops of one fused backend, wired for autograd."""

    def row_values(x, rows):
        return x.new_empty(rows, dtype=accumulate_dtype(x.dtype))

    def forward(
        x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, channels_first: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = _dense(x, channels_first)
        rows, c, inner = geometry(x, channels_first)
        y, mean, invstd = torch.empty_like(x), row_values(x, rows), row_values(x, rows)
        weight = weight.contiguous() if weight is not None else None
        bias = bias.contiguous() if bias is not None else None
        launch(
            backend,
            lambda: _triton_kernels().layer_norm_forward,
            "layer_norm_forward",
            (x, weight, bias, y, mean, invstd),
            (),
            (rows, c, inner, eps),
        )
        return y, mean, invstd

    def backward(
        grad_y: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        mean: torch.Tensor,
        invstd: torch.Tensor,
        channels_first: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = _dense(x, channels_first)
        weight = weight.contiguous() if weight is not None else None
        (gy,) = same_layout(x, grad_y)[1:]
        rows, c, inner = geometry(x, channels_first)
        splits = column_splits(x, rows, c, inner)
        gx = torch.empty_like(x)
        part = x.new_zeros(splits, 2, c, dtype=accumulate_dtype(x.dtype))
        launch(
            backend,
            lambda: _triton_kernels().layer_norm_backward,
            "layer_norm_backward",
            (gy, x, weight, mean, invstd, gx, part),
            (),
            (rows, c, inner, splits),
        )
        # two separate sums: outputs of a custom op may not alias each other
        return gx, part[:, 0].sum(0), part[:, 1].sum(0)

    def double_backward(
        grad_y: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        mean: torch.Tensor,
        invstd: torch.Tensor,
        ggx: torch.Tensor,
        ggw: torch.Tensor,
        ggb: torch.Tensor,
        channels_first: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = _dense(x, channels_first)
        weight = weight.contiguous() if weight is not None else None
        gy, v = same_layout(x, grad_y, ggx)[1:]
        rows, c, inner = geometry(x, channels_first)
        splits = column_splits(x, rows, c, inner)
        d_gy, d_x = torch.empty_like(x), torch.empty_like(x)
        acc = accumulate_dtype(x.dtype)
        rowstat = x.new_empty(2, rows, dtype=acc)
        part = x.new_zeros(splits, 2, c, dtype=acc)
        launch(
            backend,
            lambda: _triton_kernels().layer_norm_double_backward,
            "layer_norm_double_backward",
            (
                gy,
                x,
                weight,
                mean,
                invstd,
                v,
                ggw.to(acc).contiguous(),
                ggb.to(acc).contiguous(),
                d_gy,
                d_x,
                rowstat,
                part,
            ),
            (),
            (rows, c, inner, splits),
        )
        return d_gy, d_x, part[:, 0].sum(0)

    def fake_forward(x, weight, bias, eps, channels_first):
        x = _dense(x, channels_first)
        rows = geometry(x, channels_first)[0]
        return torch.empty_like(x), row_values(x, rows), row_values(x, rows)

    def column_values(x, channels_first):
        c = x.shape[1] if channels_first else x.shape[-1]
        return x.new_empty(c, dtype=accumulate_dtype(x.dtype))

    fwd = define_op(f"layer_norm_{backend}", forward, fake_forward)
    bwd = define_op(
        f"layer_norm_backward_{backend}",
        backward,
        lambda gy, x, w, m, r, cf: (
            torch.empty_like(_dense(x, cf)),
            column_values(x, cf),
            column_values(x, cf),
        ),
    )
    dbl = define_op(
        f"layer_norm_double_backward_{backend}",
        double_backward,
        lambda gy, x, w, m, r, ggx, ggw, ggb, cf: (
            torch.empty_like(_dense(x, cf)),
            torch.empty_like(_dense(x, cf)),
            column_values(x, cf),
        ),
    )

    def setup_forward(ctx, inputs, output):
        x, weight, bias, _, ctx.channels_first = inputs
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.save_for_backward(x, weight, output[1], output[2])

    def backward_of_forward(ctx, grad_y, grad_mean, grad_invstd):
        # mean and invstd are internal (saved for the backward), never differentiated by users
        x, weight, mean, invstd = ctx.saved_tensors
        if grad_y is None:
            grad_y = torch.zeros_like(x)
        gx, gw, gb = bwd(grad_y, x, weight, mean, invstd, ctx.channels_first)
        return gx, gw if ctx.has_weight else None, gb if ctx.has_bias else None, None, None

    def setup_backward(ctx, inputs, output):
        grad_y, x, weight, mean, invstd, ctx.channels_first = inputs
        ctx.has_weight = weight is not None
        ctx.save_for_backward(grad_y, x, weight, mean, invstd)

    def backward_of_backward(ctx, ggx, ggw, ggb):
        grad_y, x, weight, mean, invstd = ctx.saved_tensors
        c = mean.new_zeros(x.shape[1] if ctx.channels_first else x.shape[-1])
        ggx = ggx if ggx is not None else torch.zeros_like(x)
        ggw = ggw if ggw is not None else c
        ggb = ggb if ggb is not None else c
        d_gy, d_x, d_w = dbl(grad_y, x, weight, mean, invstd, ggx, ggw, ggb, ctx.channels_first)
        # d_x is the total derivative: mean and invstd, functions of x, get none of their own
        return d_gy, d_x, d_w if ctx.has_weight else None, None, None, None

    fwd.register_autograd(backward_of_forward, setup_context=setup_forward)
    bwd.register_autograd(backward_of_backward, setup_context=setup_backward)
    return fwd


_OPS = {backend: _build(backend) for backend in FUSED_BACKENDS}


def _self_check_cases(device, dtype):
    """Last dimension (37 columns: more than one column block in the interpreter) and channels
    first, NCHW and channels_last; data away from 0, as after a ReLU."""
    w, b = 1.0 + 0.1 * random_tensor((37,), device, dtype, 41), random_tensor((37,), device, dtype, 42)
    x = random_tensor((3, 2, 37), device, dtype, 43, scale=2.0) + 3.0
    yield SelfCheckCase(
        lambda backend: lambda x, w, b: layer_norm(x, w, b, backend=backend),
        lambda x, w, b: layer_norm_reference(x, w, b),
        [x, w, b],
    )
    w, b = 1.0 + 0.1 * random_tensor((5,), device, dtype, 44), random_tensor((5,), device, dtype, 45)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = (random_tensor((2, 5, 3, 3), device, dtype, 46, scale=2.0) + 3.0).contiguous(memory_format=memory_format)
        yield SelfCheckCase(
            lambda backend: lambda t, w, b: layer_norm(t, w, b, channels_first=True, backend=backend),
            lambda t, w, b: layer_norm_reference(t, w, b, channels_first=True),
            [x, w, b],
        )


SPEC = register(
    FusedOp(
        name="layer_norm",
        tolerances=NORMALISATION_TOLERANCES,
        self_check_cases=_self_check_cases,
        # the weight's and bias's gradients sum 1e5 rows in another order than torch's
        large_input_tolerances={torch.float32: Tolerance(1e-3, 1e-3)},
        fused_backends=FUSED_BACKENDS,
    )
)
