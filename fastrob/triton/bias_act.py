"""Triton kernels of the fused bias + activation (the CUDA twin is kernels/bias_act.cuh).

With u = x + b[c] (c the element's index along the bias dimension; b = 0 without bias):
  forward:          y   = f(u)
  backward:         dx  = dy f'(u)                      (db = sum of dx over the other dims, in torch)
  double backward:  for V = dL/d(dx):  d_dy = V f'(u),  d_x = V dy f''(u)
Activations (f, f', f''):
  relu        max(u, 0),  [u > 0],  0
  softplus    t = beta u; t > threshold: (u, 1, 0); else log(1 + e^t) / beta, s, beta s (1 - s), s = sigmoid(t)
  gelu        u Phi(u),  Phi + u phi,  phi (2 - u^2)    (Phi, phi: standard normal cdf and pdf; erf form)
  silu        u s,  s (1 + u (1 - s)),  s (1 - s) (2 + u (1 - 2 s)),  s = sigmoid(u)
  half_huber  0 (u < 0), u^2 / (2 d) (0 <= u <= d), u - d / 2 (u > d);  clamp(u / d, 0, 1);  [0 < u < d] / d
  gelu_tanh   t = k (u + a u^3), T = tanh(t), S = 1 - T^2, t' = k (1 + 3 a u^2)  (k = sqrt(2 / pi), a = 0.044715):
              u (1 + T) / 2,  (1 + T) / 2 + u S t' / 2,  S (t' + 3 k a u^2 - u T t'^2)
  sigmoid     s,  s (1 - s),  s (1 - s) (1 - 2 s)
  hardswish   0 (u < -3), u (u + 3) / 6 (-3 <= u <= 3), u (u > 3);  0 | (2 u + 3) / 6 | 1;  1/3 on -3 < u < 3, else 0
              (the boundaries as torch's hardswish_backward and its derivative)
Tensors are flat arrays in one dense layout (contiguous or channels_last): the channel of memory
index i is (i // stride_c) % channels, stride_c being the bias dimension's stride.
``act`` is the activation's code (fastrob.ops.bias_act.ACTIVATIONS: relu 0 ... half_huber 4, gelu_tanh 5,
sigmoid 6, hardswish 7).
Arithmetic in float32 (float64 for float64 storage), rounded to the storage dtype once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrob.triton._common import compute_type

BLOCK = 1024


@triton.jit
def _act(u, ACT: tl.constexpr, beta, threshold, d):
    """(f(u), f'(u), f''(u)); the compiler drops whichever a kernel does not use."""
    # float scalars arrive as float32: widen them first, so float64 math stays float64 (1 / d)
    zero = tl.zeros_like(u)
    beta, threshold, d = zero + beta, zero + threshold, zero + d
    if ACT == 0:
        f = tl.maximum(u, 0.0)
        f1 = tl.where(u > 0, 1.0, 0.0)
        f2 = f1 * 0.0
    elif ACT == 1:
        t = beta * u
        s = tl.sigmoid(t)
        over = t > threshold
        # log(1 + e^t) = max(t, 0) + log(1 + e^-|t|): no overflow for large t
        f = tl.where(over, u, (tl.maximum(t, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(t)))) / beta)
        f1 = tl.where(over, 1.0, s)
        f2 = tl.where(over, 0.0, beta * s * (1.0 - s))
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * u * u)
        f = u * cdf
        f1 = cdf + u * pdf
        f2 = pdf * (2.0 - u * u)
    elif ACT == 3:
        s = tl.sigmoid(u)
        f = u * s
        f1 = s * (1.0 + u * (1.0 - s))
        f2 = s * (1.0 - s) * (2.0 + u * (1.0 - 2.0 * s))
    elif ACT == 4:
        inside = (u > 0) & (u < d)
        f = tl.where(u <= 0, 0.0, tl.where(u <= d, u * u / (2.0 * d), u - 0.5 * d))
        f1 = tl.minimum(tl.maximum(u / d, 0.0), 1.0)
        f2 = tl.where(inside, 1.0 / d, 0.0)
    elif ACT == 5:
        # k = sqrt(2 / pi), ka = k * 0.044715, written out: a float assigned to a name would be
        # a float32 scalar, rounding float64 math
        u2 = u * u
        t = 0.7978845608028654 * u + 0.035677408136300125 * u2 * u
        # tanh and sech^2 from e = exp(-2 |t|) (no tanh in every Triton version's tl.math):
        # sech^2 = 4 e / (1 + e)^2 keeps its relative accuracy where 1 - tanh^2 would cancel
        e = tl.exp(-2.0 * tl.abs(t))
        th = (1.0 - e) / (1.0 + e)
        th = tl.where(t < 0, -th, th)
        sech2 = 4.0 * e / ((1.0 + e) * (1.0 + e))
        dt = 0.7978845608028654 + 0.10703222440890037 * u2
        ka3u2 = 0.10703222440890037 * u2
        f = 0.5 * u * (1.0 + th)
        f1 = 0.5 * (1.0 + th) + 0.5 * u * sech2 * dt
        f2 = sech2 * (dt + ka3u2 - u * th * dt * dt)
    elif ACT == 6:
        s = tl.sigmoid(u)
        f = s
        f1 = s * (1.0 - s)
        f2 = f1 * (1.0 - 2.0 * s)
    else:
        # torch's conventions at the kinks: f' = (2 u + 3) / 6 on [-3, 3], f'' = 1/3 on (-3, 3)
        f = tl.where(u < -3.0, 0.0, tl.where(u <= 3.0, u * (u + 3.0) / 6.0, u))
        f1 = tl.where(u < -3.0, 0.0, tl.where(u <= 3.0, (2.0 * u + 3.0) / 6.0, 1.0))
        f2 = tl.where((u > -3.0) & (u < 3.0), zero + 1.0, zero) / 3.0  # 1/3 in u's precision
    return f, f1, f2


@triton.jit
def _load_u(x_ptr, b_ptr, offs, mask, stride_c, channels, HAS_BIAS: tl.constexpr, CT: tl.constexpr):
    u = tl.load(x_ptr + offs, mask=mask, other=0.0).to(CT)
    if HAS_BIAS:
        u += tl.load(b_ptr + (offs // stride_c) % channels, mask=mask, other=0.0).to(CT)
    return u


@triton.jit
def _bias_act_kernel(
    x_ptr,
    b_ptr,
    y_ptr,
    n,
    stride_c,
    channels,
    beta,
    threshold,
    d,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    f, f1, f2 = _act(_load_u(x_ptr, b_ptr, offs, mask, stride_c, channels, HAS_BIAS, CT), ACT, beta, threshold, d)
    tl.store(y_ptr + offs, f.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_act_backward_kernel(
    dy_ptr,
    x_ptr,
    b_ptr,
    dx_ptr,
    n,
    stride_c,
    channels,
    beta,
    threshold,
    d,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    f, f1, f2 = _act(_load_u(x_ptr, b_ptr, offs, mask, stride_c, channels, HAS_BIAS, CT), ACT, beta, threshold, d)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(CT)
    tl.store(dx_ptr + offs, (dy * f1).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_act_double_backward_kernel(
    dy_ptr,
    x_ptr,
    b_ptr,
    v_ptr,
    d_dy_ptr,
    d_x_ptr,
    n,
    stride_c,
    channels,
    beta,
    threshold,
    d,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    f, f1, f2 = _act(_load_u(x_ptr, b_ptr, offs, mask, stride_c, channels, HAS_BIAS, CT), ACT, beta, threshold, d)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(CT)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(CT)
    tl.store(d_dy_ptr + offs, (v * f1).to(d_dy_ptr.dtype.element_ty), mask=mask)
    tl.store(d_x_ptr + offs, (v * dy * f2).to(d_x_ptr.dtype.element_ty), mask=mask)


def _launch(kernel, first: torch.Tensor, tensors, bias, stride_c, channels, act, beta, threshold, d):
    n = first.numel()
    if n == 0:
        return
    kernel[(triton.cdiv(n, BLOCK),)](
        *tensors,
        n,
        stride_c,
        channels,
        beta,
        threshold,
        d,
        ACT=act,
        HAS_BIAS=bias is not None,
        CT=compute_type(first.dtype),
        BLOCK=BLOCK,
    )


def bias_act_forward(x, b, y, stride_c, channels, act, beta, threshold, d) -> None:
    _launch(_bias_act_kernel, x, (x, b if b is not None else x, y), b, stride_c, channels, act, beta, threshold, d)


def bias_act_backward(dy, x, b, dx, stride_c, channels, act, beta, threshold, d) -> None:
    _launch(
        _bias_act_backward_kernel,
        x,
        (dy, x, b if b is not None else x, dx),
        b,
        stride_c,
        channels,
        act,
        beta,
        threshold,
        d,
    )


def bias_act_double_backward(dy, x, b, v, d_dy, d_x, stride_c, channels, act, beta, threshold, d) -> None:
    _launch(
        _bias_act_double_backward_kernel,
        x,
        (dy, x, b if b is not None else x, v, d_dy, d_x),
        b,
        stride_c,
        channels,
        act,
        beta,
        threshold,
        d,
    )
