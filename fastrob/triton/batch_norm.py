"""Triton kernels of the fused batch norm (the CUDA twin is kernels/batch_norm.cuh).

x is [N, C, S] (S = the product of the spatial sizes), stored densely as contiguous NCHW or
channels_last; M = N S elements per channel, sums below run over a channel's M elements.
mean, invstd r = 1 / sqrt(var + eps) (var biased), xhat = (x - mean) r, w = 1 / b = 0 if absent.
  forward:          mean, var from shifted sums (x - K), K = the channel's first element (no
                    cancellation for data far from 0);  y = w xhat + b
  backward:         A = sum(gy) / M, B = sum(gy xhat) / M
                    gx = w r (gy - A - B xhat),  gw = sum(gy xhat),  gb = sum(gy)
  double backward:  for V = dL/d(gx), gw', gb' = dL/d(gw), dL/d(gb), with Abar = sum(V) / M,
                    Cv = sum(V xhat) / M, D = sum(V gy) / M:
                    d_gy = w r V + (gw' - w r Cv) xhat + gb' - w r Abar
                    d_x  = r (gw' - w r Cv) gy - w r^2 B V + [w r^2 (3 B Cv + A Abar - D) - r gw' B] xhat
                           + r (w r (B Abar + Cv A) - gw' A)
                    d_w  = r (sum(V gy) - sum(gy) Abar - sum(gy xhat) Cv)
Every pass is three launches: a split reduction (a grid of channel blocks x row splits writes
partial sums to ``work``), a per-channel finalize (sums the splits, computes the statistics,
gradients of the weight and bias, and the coefficients of the element-wise pass) and one
element-wise pass out = k_a a + k_b b + k_xhat xhat + k_1 per channel (one or two outputs).
Arithmetic and per-channel values in float32 (float64 for float64 storage); element-wise results
are rounded to the storage dtype once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastrob._backend import triton_interpreter
from fastrob.triton._common import compute_type

BLOCK = 1024  # element-wise pass
FINAL_BLOCK = 128  # channels per finalize program
# ``work`` (fastrob.ops.batch_norm.work_size) holds [splits, 5, C] partial sums, then [8, C]
# element-wise coefficients: two outputs x (k_a, k_b, k_xhat, k_1).


def geometry(n: int, c: int, s: int, channels_last: bool):
    """(stride of n, of c, of s) in the dense layout, and the reduction's (BLOCK_M, BLOCK_C):
    channels_last tiles take up to 64 adjacent channels (coalesced along c), NCHW tiles two
    channels' runs of rows. The interpreter takes 16 rows per step, so that small test shapes loop."""
    block_c = min(64, max(2, triton.next_power_of_2(c))) if channels_last else 2
    block_m = 16 if triton_interpreter() else max(16, 4096 // block_c) if channels_last else 1024
    strides = (s * c, 1, c) if channels_last else (c * s, s, 1)
    return strides, (block_m, block_c)


def reduce_warps(block_m: int, block_c: int) -> int:
    """Warps of a reduction program: 16 tile elements a thread for each of its five accumulators.
    The 4096-element channels_last tile on 4 warps (32 a thread) used 255 registers and spilled
    240-392 bytes a thread in the double backward on sm_80/sm_90 (bench/aot_compile.py)."""
    return max(4, block_m * block_c // 512)


def _chunk(rows: int, splits: int, block_m: int) -> tuple[int, int]:
    """(rows per split, a multiple of BLOCK_M; the number of non-empty splits)."""
    chunk = triton.cdiv(triton.cdiv(rows, splits), block_m) * block_m
    return chunk, triton.cdiv(rows, chunk)


@triton.jit
def _batch_norm_reduce_kernel(
    x_ptr,
    gy_ptr,
    v_ptr,
    mean_ptr,
    invstd_ptr,
    part_ptr,
    C,
    S,
    M,
    sn,
    sc,
    ss,
    chunk,
    MODE: tl.constexpr,
    CT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Partial sums over rows [split * chunk, (split + 1) * chunk) of a block of channels.
    MODE 0: sum(x - K), sum((x - K)^2); 1: sum(gy), sum(gy xhat);
    2: those two and sum(V), sum(V xhat), sum(V gy). part is [splits, 5, C]."""
    split = tl.program_id(1).to(tl.int64)  # split * chunk exceeds int32 for M > 2^31 rows
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    col_off = (cols.to(tl.int64) * sc)[None, :]
    if MODE == 0:
        ref = tl.load(x_ptr + cols.to(tl.int64) * sc, mask=cmask, other=0.0).to(CT)
        r = ref * 0.0 + 1.0
    else:
        ref = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(CT)
        r = tl.load(invstd_ptr + cols, mask=cmask, other=0.0).to(CT)
    acc0 = tl.zeros((BLOCK_M, BLOCK_C), CT)
    acc1 = tl.zeros((BLOCK_M, BLOCK_C), CT)
    acc2 = tl.zeros((BLOCK_M, BLOCK_C), CT)
    acc3 = tl.zeros((BLOCK_M, BLOCK_C), CT)
    acc4 = tl.zeros((BLOCK_M, BLOCK_C), CT)
    start = split * chunk
    end = tl.minimum(start + chunk, M)
    for m0 in range(start, end, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (rows < end)[:, None] & cmask[None, :]
        offs = ((rows // S) * sn + (rows % S) * ss)[:, None] + col_off
        d = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(CT) - ref[None, :], 0.0)
        if MODE == 0:
            acc0 += d
            acc1 += d * d
        else:
            xhat = d * r[None, :]
            gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(CT)
            acc0 += gy
            acc1 += gy * xhat
            if MODE == 2:
                v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(CT)
                acc2 += v
                acc3 += v * xhat
                acc4 += v * gy
    base = part_ptr + split * 5 * C + cols
    tl.store(base, tl.sum(acc0, axis=0), mask=cmask)
    tl.store(base + C, tl.sum(acc1, axis=0), mask=cmask)
    if MODE == 2:
        tl.store(base + 2 * C, tl.sum(acc2, axis=0), mask=cmask)
        tl.store(base + 3 * C, tl.sum(acc3, axis=0), mask=cmask)
        tl.store(base + 4 * C, tl.sum(acc4, axis=0), mask=cmask)


@triton.jit
def _split_sum(part_ptr, k, cols, cmask, C, splits, CT: tl.constexpr, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), CT)
    for i in range(0, splits):
        acc += tl.load(part_ptr + (i * 5 + k) * C + cols, mask=cmask, other=0.0)
    return acc


@triton.jit
def _weight(w_ptr, cols, cmask, HAS_W: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr):
    if HAS_W:
        return tl.load(w_ptr + cols, mask=cmask, other=0.0).to(CT)
    return tl.full((BLOCK,), 1.0, CT)


@triton.jit
def _batch_norm_forward_finalize_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    part_ptr,
    coef_ptr,
    mean_ptr,
    invstd_ptr,
    C,
    M,
    sc,
    splits,
    eps,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    CT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < C
    shift = tl.load(x_ptr + cols.to(tl.int64) * sc, mask=cmask, other=0.0).to(CT)
    m = tl.zeros((BLOCK,), CT) + M
    d_mean = _split_sum(part_ptr, 0, cols, cmask, C, splits, CT, BLOCK) / m
    var = tl.maximum(_split_sum(part_ptr, 1, cols, cmask, C, splits, CT, BLOCK) / m - d_mean * d_mean, 0.0)
    invstd = 1.0 / tl.sqrt(var + (tl.zeros((BLOCK,), CT) + eps))
    tl.store(mean_ptr + cols, shift + d_mean, mask=cmask)
    tl.store(invstd_ptr + cols, invstd, mask=cmask)
    tl.store(coef_ptr + 2 * C + cols, _weight(w_ptr, cols, cmask, HAS_W, CT, BLOCK), mask=cmask)
    if HAS_B:
        bias = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(CT)
    else:
        bias = tl.zeros((BLOCK,), CT)
    tl.store(coef_ptr + 3 * C + cols, bias, mask=cmask)


@triton.jit
def _batch_norm_backward_finalize_kernel(
    w_ptr,
    invstd_ptr,
    part_ptr,
    coef_ptr,
    gw_ptr,
    gb_ptr,
    C,
    M,
    splits,
    HAS_W: tl.constexpr,
    CT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < C
    s_gy = _split_sum(part_ptr, 0, cols, cmask, C, splits, CT, BLOCK)
    s_gyx = _split_sum(part_ptr, 1, cols, cmask, C, splits, CT, BLOCK)
    wr = _weight(w_ptr, cols, cmask, HAS_W, CT, BLOCK) * tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
    m = tl.zeros((BLOCK,), CT) + M
    tl.store(gb_ptr + cols, s_gy, mask=cmask)
    tl.store(gw_ptr + cols, s_gyx, mask=cmask)
    tl.store(coef_ptr + cols, wr, mask=cmask)
    tl.store(coef_ptr + 2 * C + cols, -wr * s_gyx / m, mask=cmask)
    tl.store(coef_ptr + 3 * C + cols, -wr * s_gy / m, mask=cmask)


@triton.jit
def _batch_norm_double_backward_finalize_kernel(
    w_ptr,
    invstd_ptr,
    ggw_ptr,
    ggb_ptr,
    part_ptr,
    coef_ptr,
    d_w_ptr,
    C,
    M,
    splits,
    HAS_W: tl.constexpr,
    CT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < C
    s_gy = _split_sum(part_ptr, 0, cols, cmask, C, splits, CT, BLOCK)
    s_gyx = _split_sum(part_ptr, 1, cols, cmask, C, splits, CT, BLOCK)
    s_v = _split_sum(part_ptr, 2, cols, cmask, C, splits, CT, BLOCK)
    s_vx = _split_sum(part_ptr, 3, cols, cmask, C, splits, CT, BLOCK)
    s_vgy = _split_sum(part_ptr, 4, cols, cmask, C, splits, CT, BLOCK)
    m = tl.zeros((BLOCK,), CT) + M
    a, b, a_bar, cv, d = s_gy / m, s_gyx / m, s_v / m, s_vx / m, s_vgy / m
    r = tl.load(invstd_ptr + cols, mask=cmask, other=0.0).to(CT)
    wr = _weight(w_ptr, cols, cmask, HAS_W, CT, BLOCK) * r
    ggw = tl.load(ggw_ptr + cols, mask=cmask, other=0.0).to(CT)
    ggb = tl.load(ggb_ptr + cols, mask=cmask, other=0.0).to(CT)
    if HAS_W:
        tl.store(d_w_ptr + cols, r * (s_vgy - s_gy * a_bar - s_gyx * cv), mask=cmask)
    c5 = ggw - wr * cv
    # output 0: d_x = k_a gy + k_b V + k_xhat xhat + k_1
    tl.store(coef_ptr + cols, r * c5, mask=cmask)
    tl.store(coef_ptr + C + cols, -wr * r * b, mask=cmask)
    tl.store(coef_ptr + 2 * C + cols, wr * r * (3.0 * b * cv + a * a_bar - d) - r * ggw * b, mask=cmask)
    tl.store(coef_ptr + 3 * C + cols, r * (wr * (b * a_bar + cv * a) - ggw * a), mask=cmask)
    # output 1: d_gy = w r V + c5 xhat + gb' - w r Abar
    tl.store(coef_ptr + 4 * C + cols, tl.zeros((BLOCK,), CT), mask=cmask)
    tl.store(coef_ptr + 5 * C + cols, wr, mask=cmask)
    tl.store(coef_ptr + 6 * C + cols, c5, mask=cmask)
    tl.store(coef_ptr + 7 * C + cols, ggb - wr * a_bar, mask=cmask)


@triton.jit
def _batch_norm_apply_kernel(
    x_ptr,
    a_ptr,
    b_ptr,
    mean_ptr,
    invstd_ptr,
    coef_ptr,
    out0_ptr,
    out1_ptr,
    n,
    stride_c,
    C,
    HAS_A: tl.constexpr,
    HAS_B: tl.constexpr,
    TWO: tl.constexpr,
    CT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out0 = k_a a + k_b b + k_xhat xhat + k_1 (coefficients of the element's channel), out1
    likewise with the next four coefficients; flat memory index i has channel (i // stride_c) % C."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c = (offs // stride_c) % C
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(CT)
    xhat = (x - tl.load(mean_ptr + c, mask=mask, other=0.0)) * tl.load(invstd_ptr + c, mask=mask, other=0.0)
    out0 = tl.load(coef_ptr + 2 * C + c, mask=mask, other=0.0) * xhat + tl.load(
        coef_ptr + 3 * C + c, mask=mask, other=0.0
    )
    if TWO:
        out1 = tl.load(coef_ptr + 6 * C + c, mask=mask, other=0.0) * xhat + tl.load(
            coef_ptr + 7 * C + c, mask=mask, other=0.0
        )
    if HAS_A:
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(CT)
        out0 += tl.load(coef_ptr + c, mask=mask, other=0.0) * a
        if TWO:
            out1 += tl.load(coef_ptr + 4 * C + c, mask=mask, other=0.0) * a
    if HAS_B:
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(CT)
        out0 += tl.load(coef_ptr + C + c, mask=mask, other=0.0) * b
        if TWO:
            out1 += tl.load(coef_ptr + 5 * C + c, mask=mask, other=0.0) * b
    tl.store(out0_ptr + offs, out0.to(out0_ptr.dtype.element_ty), mask=mask)
    if TWO:
        tl.store(out1_ptr + offs, out1.to(out1_ptr.dtype.element_ty), mask=mask)


# ---- launchers: (tensors..., n, c, s, channels_last, splits, scalars) as fastrob.ops.batch_norm calls them ----


def _reduce(mode, x, gy, v, mean, invstd, work, n, c, s, channels_last, splits) -> int:
    """Runs the split reduction; returns the number of splits holding sums."""
    (sn, sc, ss), (block_m, block_c) = geometry(n, c, s, channels_last)
    chunk, used = _chunk(n * s, splits, block_m)
    _batch_norm_reduce_kernel[(triton.cdiv(c, block_c), used)](
        x,
        gy if gy is not None else x,
        v if v is not None else x,
        mean if mean is not None else work,
        invstd if invstd is not None else work,
        work,
        c,
        s,
        n * s,
        sn,
        sc,
        ss,
        chunk,
        MODE=mode,
        CT=compute_type(x.dtype),
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        num_warps=reduce_warps(block_m, block_c),
    )
    return used


def _apply(x, a, b, mean, invstd, coef, out0, out1, c, s, channels_last) -> None:
    numel = x.numel()
    stride_c = 1 if channels_last else s
    _batch_norm_apply_kernel[(triton.cdiv(numel, BLOCK),)](
        x,
        a if a is not None else x,
        b if b is not None else x,
        mean,
        invstd,
        coef,
        out0,
        out1 if out1 is not None else out0,
        numel,
        stride_c,
        c,
        HAS_A=a is not None,
        HAS_B=b is not None,
        TWO=out1 is not None,
        CT=compute_type(x.dtype),
        BLOCK=BLOCK,
    )


def _coef(work, c, splits):
    return work[splits * 5 * c :]


def batch_norm_forward(x, w, b, y, mean, invstd, work, n, c, s, channels_last, splits, eps) -> None:
    """y, mean, invstd of training-mode batch norm."""
    used = _reduce(0, x, None, None, None, None, work, n, c, s, channels_last, splits)
    (_, sc, _), _ = geometry(n, c, s, channels_last)
    coef = _coef(work, c, splits)
    _batch_norm_forward_finalize_kernel[(triton.cdiv(c, FINAL_BLOCK),)](
        x,
        w if w is not None else work,
        b if b is not None else work,
        work,
        coef,
        mean,
        invstd,
        c,
        n * s,
        sc,
        used,
        eps,
        HAS_W=w is not None,
        HAS_B=b is not None,
        CT=compute_type(x.dtype),
        BLOCK=FINAL_BLOCK,
    )
    _apply(x, None, None, mean, invstd, coef, y, None, c, s, channels_last)


def batch_norm_backward(gy, x, w, mean, invstd, gx, gw, gb, work, n, c, s, channels_last, splits) -> None:
    """gx, gw, gb of training-mode batch norm."""
    used = _reduce(1, x, gy, None, mean, invstd, work, n, c, s, channels_last, splits)
    coef = _coef(work, c, splits)
    _batch_norm_backward_finalize_kernel[(triton.cdiv(c, FINAL_BLOCK),)](
        w if w is not None else work,
        invstd,
        work,
        coef,
        gw,
        gb,
        c,
        n * s,
        used,
        HAS_W=w is not None,
        CT=compute_type(x.dtype),
        BLOCK=FINAL_BLOCK,
    )
    _apply(x, gy, None, mean, invstd, coef, gx, None, c, s, channels_last)


def batch_norm_double_backward(
    gy, x, w, mean, invstd, ggx, ggw, ggb, d_gy, d_x, d_w, work, n, c, s, channels_last, splits
) -> None:
    """d_gy, d_x, d_w (d_w only with a weight) of the backward, given V = ggx, gw' = ggw, gb' = ggb."""
    used = _reduce(2, x, gy, ggx, mean, invstd, work, n, c, s, channels_last, splits)
    coef = _coef(work, c, splits)
    _batch_norm_double_backward_finalize_kernel[(triton.cdiv(c, FINAL_BLOCK),)](
        w if w is not None else work,
        invstd,
        ggw,
        ggb,
        work,
        coef,
        d_w if d_w is not None else work,
        c,
        n * s,
        used,
        HAS_W=w is not None,
        CT=compute_type(x.dtype),
        BLOCK=FINAL_BLOCK,
    )
    _apply(x, gy, ggx, mean, invstd, coef, d_x, d_gy, c, s, channels_last)


def batch_norm_eval(x, mean, invstd, coef, y, n, c, s, channels_last) -> None:
    """y = k_xhat xhat + k_1 with the running statistics' mean and invstd (eval mode)."""
    _apply(x, None, None, mean, invstd, coef, y, None, c, s, channels_last)
