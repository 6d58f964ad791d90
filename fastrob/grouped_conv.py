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
the values are torch's up to float rounding (tests/test_grouped_conv.py), forward mode (jvp)
included. One limit, torch's for every autograd.Function: ``torch.autograd.grad(...,
is_grads_batched=True, create_graph=True)`` records no graph through them, so batched gradients
that are to be differentiated again are taken with ``torch.func.vmap`` over ``autograd.grad``.
"""

from __future__ import annotations

import torch

_aten = torch.ops.aten


# ---- the three maps as native calls -------------------------------------------------------------


def _conv_native(x, w, b, settings):
    stride, padding, dilation, groups = settings
    return _aten.convolution(x, w, b, stride, padding, dilation, False, [0] * len(stride), groups)


def _grad_native(gy, x, w, settings, which: int):
    """input_grad (which=0) or weight_grad (which=1) in one native call."""
    stride, padding, dilation, groups = settings
    mask = [which == 0, which == 1, False]
    zeros = [0] * len(stride)
    return _aten.convolution_backward(gy, x, w, None, stride, padding, dilation, False, zeros, groups, mask)[which]


def _add(a, b):
    return b if a is None else a if b is None else a + b


# ---- the three maps as autograd Functions, each differentiated with the three -------------------


def _conv(x, w, b, settings):
    return _Conv.apply(x, w, b, *settings)


def _input_grad(gy, x, w, settings):
    return _InputGrad.apply(gy, x, w, *settings)


def _weight_grad(gy, x, w, settings):
    return _WeightGrad.apply(gy, x, w, *settings)


class _Conv(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, b, stride, padding, dilation, groups):
        return _conv_native(x, w, b, (stride, padding, dilation, groups))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, *settings = inputs
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)
        ctx.settings = settings
        ctx.has_bias = b is not None

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = _input_grad(gy, x, w, ctx.settings) if need_x else None
        gw = _weight_grad(gy, x, w, ctx.settings) if need_w else None
        gb = gy.sum([d for d in range(gy.dim()) if d != 1]) if ctx.has_bias and need_b else None
        return gx, gw, gb, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, dw, db, *_):
        x, w = ctx.saved_tensors
        out = _add(
            None if dx is None else _conv_native(dx, w, None, ctx.settings),
            None if dw is None else _conv_native(x, dw, None, ctx.settings),
        )
        if db is not None:
            out = _add(out, db.view(1, -1, *[1] * (x.dim() - 2)))
        return out


class _InputGrad(torch.autograd.Function):
    """gx = input_grad(gy, w); ``x`` only gives the shape (and the memory format)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(gy, x, w, stride, padding, dilation, groups):
        return _grad_native(gy, x, w, (stride, padding, dilation, groups), 0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        gy, x, w, *settings = inputs
        ctx.save_for_backward(gy, w)  # not x: its backward needs no shape of it
        ctx.save_for_forward(gy, x, w)
        ctx.settings = settings

    @staticmethod
    def backward(ctx, ggx):
        gy, w = ctx.saved_tensors
        need_gy, _, need_w = ctx.needs_input_grad[:3]
        d_gy = _conv(ggx, w, None, ctx.settings) if need_gy else None
        d_w = _weight_grad(gy, ggx, w, ctx.settings) if need_w else None
        return d_gy, None, d_w, None, None, None, None

    @staticmethod
    def jvp(ctx, dgy, _dx, dw, *_):
        gy, x, w = ctx.saved_tensors
        return _add(
            None if dgy is None else _grad_native(dgy, x, w, ctx.settings, 0),
            None if dw is None else _grad_native(gy, x, dw, ctx.settings, 0),
        )


class _WeightGrad(torch.autograd.Function):
    """gw = weight_grad(gy, x); ``w`` only gives the shape."""

    generate_vmap_rule = True

    @staticmethod
    def forward(gy, x, w, stride, padding, dilation, groups):
        return _grad_native(gy, x, w, (stride, padding, dilation, groups), 1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        gy, x, w, *settings = inputs
        ctx.save_for_backward(gy, x)  # not w: its backward needs no shape of it
        ctx.save_for_forward(gy, x, w)
        ctx.settings = settings

    @staticmethod
    def backward(ctx, ggw):
        gy, x = ctx.saved_tensors
        need_gy, need_x, _ = ctx.needs_input_grad[:3]
        d_gy = _conv(x, ggw, None, ctx.settings) if need_gy else None
        d_x = _input_grad(gy, x, ggw, ctx.settings) if need_x else None
        return d_gy, d_x, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dgy, dx, _dw, *_):
        gy, x, w = ctx.saved_tensors
        return _add(
            None if dgy is None else _grad_native(dgy, x, w, ctx.settings, 1),
            None if dx is None else _grad_native(gy, dx, w, ctx.settings, 1),
        )


# ---- arguments as F.conv{1,2,3}d takes them ------------------------------------------------------


def _expand(value, n: int) -> list[int] | None:
    """An int, or a sequence of 1 or n ints (as torch takes them), as n ints; None otherwise, for
    torch's convolution to raise its own error."""
    values = list(value) if isinstance(value, (tuple, list)) else [value]
    if len(values) == 1:
        values = values * n
    if len(values) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return None
    return values


def _explicit_padding(padding, w: torch.Tensor, stride: list[int], dilation: list[int], n: int) -> list[int] | None:
    """Padding as n ints; None for what this module leaves to torch: padding="same" that needs more
    on one side (an even kernel extent), which torch pads asymmetrically, and a string padding that
    torch refuses (an unknown one, or "same" with a stride), so that torch's error is the one raised."""
    if padding == "valid":
        return [0] * n
    if padding == "same":
        if any(s != 1 for s in stride):
            return None
        totals = [d * (k - 1) for d, k in zip(dilation, w.shape[2:])]
        return None if any(t % 2 for t in totals) else [t // 2 for t in totals]
    if isinstance(padding, str):
        return None
    return _expand(padding, n)


def grouped_conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, dims: int | None = None):
    """``F.conv{dims}d(input, weight, bias, stride, padding, dilation, groups)`` for a batched
    input, with a backward whose derivatives stay on native grouped kernels (module docstring);
    ``dims`` (1, 2 or 3; default: from the weight) is the convolution's number of spatial
    dimensions. Returns None where it does not apply (an unbatched input, asymmetric
    padding="same", arguments torch would refuse), for the caller to run torch's convolution."""
    n = weight.dim() - 2 if dims is None else dims
    if weight.dim() != n + 2 or input.dim() != n + 2 or isinstance(groups, bool) or not isinstance(groups, int):
        return None
    stride, dilation = _expand(stride, n), _expand(dilation, n)
    if stride is None or dilation is None:
        return None
    explicit = _explicit_padding(padding, weight, stride, dilation, n)
    if explicit is None:
        return None
    settings = (stride, explicit, dilation, groups)
    device_type = input.device.type
    if not torch.is_autocast_enabled(device_type):
        return _conv(input, weight, bias, settings)
    # autocast runs convolutions in its lower precision (float32 tensors are cast; float64 ones are
    # not): cast here, where the casts are ordinary differentiable ops, so that the maps' backward
    # calls see one dtype (they run without autocast)
    dtype = torch.get_autocast_dtype(device_type)
    input, weight, bias = (
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in (input, weight, bias)
    )
    with torch.autocast(device_type, enabled=False):
        return _conv(input, weight, bias, settings)


__all__ = ["grouped_conv"]
