"""Grouped (and depthwise) convolution whose backward is cheap to differentiate.

torch differentiates a convolution's backward with ``_convolution_double_backward``, which computes
the weight-gradient term of a grouped convolution with one convolution per group: a depthwise
7x7 convolution of 320 channels becomes 320 small convolutions, on every device. An input-gradient
penalty on a ConvNeXt spends a third of its step there (CPU profile in docs/models.md).

A convolution is bilinear in (input, weight), so its two gradients are bilinear too, and the
three maps close under differentiation:

    y  = conv(x, w)
    gx = input_grad(gy, w)    (the transposed convolution; x gives only its shape)
    gw = weight_grad(gy, x)   (w gives only its shape)

    d conv        = conv(dx, w) + conv(x, dw)              -> gx, gw   as above
    d input_grad  = input_grad(dgy, w) + input_grad(gy, dw) -> d/dgy = conv(ggx, w),  d/dw = weight_grad(gy, ggx)
    d weight_grad = ...                                     -> d/dgy = conv(x, ggw),  d/dx = input_grad(gy, ggw)

Each map runs as one native call (``aten.convolution`` or ``aten.convolution_backward`` with one
output selected), which handles the groups itself, and each map's backward is written with the
three maps, so derivatives of any order stay on native grouped kernels. ``grouped_conv`` is what
``fastrob.routing.twice_differentiable`` runs for every ``conv{1,2,3}d`` call with groups > 1;
the values are torch's up to float rounding (tests/test_grouped_conv.py).
"""

from __future__ import annotations

import torch

_aten = torch.ops.aten


def _convolution_backward(grad_out, x, w, settings, mask):
    stride, padding, dilation, groups = settings
    zeros = [0] * len(stride)
    return _aten.convolution_backward(grad_out, x, w, None, stride, padding, dilation, False, zeros, groups, mask)


class _Conv(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, b, stride, padding, dilation, groups):
        return _aten.convolution(x, w, b, stride, padding, dilation, False, [0] * len(stride), groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, *settings = inputs
        ctx.save_for_backward(x, w)
        ctx.settings = settings
        ctx.has_bias = b is not None

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = _InputGrad.apply(gy, x, w, *ctx.settings) if need_x else None
        gw = _WeightGrad.apply(gy, x, w, *ctx.settings) if need_w else None
        gb = gy.sum([d for d in range(gy.dim()) if d != 1]) if ctx.has_bias and need_b else None
        return gx, gw, gb, None, None, None, None


class _InputGrad(torch.autograd.Function):
    """gx = input_grad(gy, w); ``x`` only gives the shape (and the memory format)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(gy, x, w, stride, padding, dilation, groups):
        return _convolution_backward(gy, x, w, (stride, padding, dilation, groups), [True, False, False])[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        gy, _, w, *settings = inputs
        ctx.save_for_backward(gy, w)  # not x: its backward needs no shape of it
        ctx.settings = settings

    @staticmethod
    def backward(ctx, ggx):
        gy, w = ctx.saved_tensors
        need_gy, _, need_w = ctx.needs_input_grad[:3]
        d_gy = _Conv.apply(ggx, w, None, *ctx.settings) if need_gy else None
        d_w = _WeightGrad.apply(gy, ggx, w, *ctx.settings) if need_w else None
        return d_gy, None, d_w, None, None, None, None


class _WeightGrad(torch.autograd.Function):
    """gw = weight_grad(gy, x); ``w`` only gives the shape."""

    generate_vmap_rule = True

    @staticmethod
    def forward(gy, x, w, stride, padding, dilation, groups):
        return _convolution_backward(gy, x, w, (stride, padding, dilation, groups), [False, True, False])[1]

    @staticmethod
    def setup_context(ctx, inputs, output):
        gy, x, _, *settings = inputs
        ctx.save_for_backward(gy, x)  # not w: its backward needs no shape of it
        ctx.settings = settings

    @staticmethod
    def backward(ctx, ggw):
        gy, x = ctx.saved_tensors
        need_gy, need_x, _ = ctx.needs_input_grad[:3]
        d_gy = _Conv.apply(x, ggw, None, *ctx.settings) if need_gy else None
        d_x = _InputGrad.apply(gy, x, ggw, *ctx.settings) if need_x else None
        return d_gy, d_x, None, None, None, None, None


def _expand(value, n: int, name: str) -> list[int]:
    values = list(value) if isinstance(value, (tuple, list)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} must be an int or {n} ints, got {value!r}")
    return [int(v) for v in values]


def _explicit_padding(padding, w: torch.Tensor, stride: list[int], dilation: list[int], n: int) -> list[int] | None:
    """Padding as n ints; None for what this module leaves to torch: padding="same" that needs more
    on one side (an even kernel extent), which torch pads asymmetrically, and a string padding that
    torch refuses (an unknown one, or one with a stride), so that torch's error is the one raised."""
    if isinstance(padding, str) and (padding not in ("valid", "same") or any(s != 1 for s in stride)):
        return None
    if padding == "valid":
        return [0] * n
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, w.shape[2:])]
        return None if any(t % 2 for t in totals) else [t // 2 for t in totals]
    return _expand(padding, n, "padding")


def grouped_conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv{1,2,3}d(input, weight, bias, stride, padding, dilation, groups)`` for a batched
    input, with a backward whose derivatives stay on native grouped kernels (module docstring).
    Returns None where it does not apply (an unbatched input, or asymmetric padding="same"), for
    the caller to run torch's convolution."""
    n = weight.dim() - 2
    if input.dim() != n + 2:
        return None
    stride, dilation = _expand(stride, n, "stride"), _expand(dilation, n, "dilation")
    explicit = _explicit_padding(padding, weight, stride, dilation, n)
    if explicit is None:
        return None
    device_type = input.device.type
    if not torch.is_autocast_enabled(device_type):
        return _Conv.apply(input, weight, bias, stride, explicit, dilation, int(groups))
    # autocast runs convolutions in its lower precision: cast here, where the casts are ordinary
    # differentiable ops, so that the maps' backward calls see one dtype (they run without autocast)
    dtype = torch.get_autocast_dtype(device_type)
    input, weight, bias = (None if t is None else t.to(dtype) for t in (input, weight, bias))
    with torch.autocast(device_type, enabled=False):
        return _Conv.apply(input, weight, bias, stride, explicit, dilation, int(groups))


__all__ = ["grouped_conv"]
