"""Triton kernels of the fused layer norm (fastrob/ops/layer_norm.py has the math's derivation).

x holds ``rows`` rows of C elements each, normalised separately; element c of row r sits at
    (r // inner) * C * inner + r % inner + c * inner
so inner = 1 is a last-dimension layer norm (rows of C adjacent elements), and inner = S (the
spatial size) a channels-first one over [B, C, S] stored contiguously (channels_last storage is
inner = 1). Per row: mean, r = 1 / sqrt(var + eps) (var biased), xhat = (x - mean) r; per column
c: w = 1 and b = 0 when absent.
  forward:          y = w xhat + b  (mean, then the variance from (x - mean)^2: no cancellation)
  backward:         g = gy w, A = mean(g), B = mean(g xhat):  gx = r (g - A - B xhat)
                    columns: gw = sum_rows gy xhat,  gb = sum_rows gy
  double backward:  V = dL/d(gx), gw', gb' = dL/d(gw), dL/d(gb) (per column), q = gw' gy;
                    Vbar = mean(V), Cv = mean(V xhat), D = mean(V g), qbar = mean(q), Qx = mean(q xhat):
                    d_gy = w r (V - Vbar - Cv xhat) + gw' xhat + gb'
                    d_x  = r^2 (-Cv g - B V + A Cv + B Vbar + (3 B Cv + A Vbar - D) xhat)
                           + r (q - qbar - Qx xhat)
                    columns: d_w = sum_rows gy r (V - Vbar - Cv xhat)
The row kernels handle BLOCK_R rows a program, looping over the columns in BLOCK_C blocks; the
column sums are a split reduction (programs: column blocks x row splits) into [splits, 2, C]
partial sums that the caller adds up. Arithmetic and per-row values in float32 (float64 for
float64 storage); element-wise results are rounded to the storage dtype once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrob._backend import triton_interpreter
from fastrob.triton._common import compute_type


def row_tile(c: int, inner: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of the row kernels: a whole row (up to 1024 columns) a step when the row
    is contiguous (inner = 1), else 64 adjacent rows x 16 columns (coalesced along the rows). The
    interpreter takes 16 columns a step, so that small test shapes loop."""
    if triton_interpreter():
        return (4, 16) if inner == 1 else (8, 16)
    if inner == 1:
        block_c = min(1024, max(16, triton.next_power_of_2(c)))
        return max(1, min(64, 2048 // block_c)), block_c  # 64 rows at most: 128 x 16 spilled in float64
    return 64, 16


def row_warps(block_r: int, block_c: int, wide: bool = False) -> int:
    """Warps of a row or column program: 8 tile elements a thread for each of its accumulators (the
    double backward keeps seven), 4 when they are float64 (``wide``: 8 a thread spilled on sm_80/90)."""
    return max(4, min(16, block_r * block_c // (128 if wide else 256)))


def column_tile(inner: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of the column reduction: 64 adjacent columns (coalesced) for inner = 1,
    64 adjacent rows x 16 columns otherwise; 8 x 16 in the interpreter."""
    if triton_interpreter():
        return 8, 16
    return (32, 64) if inner == 1 else (64, 16)


@triton.jit
def _offsets(rows_idx, cols, C, inner):
    """Memory offsets of the [BLOCK_R, BLOCK_C] tile of rows ``rows_idx`` and columns ``cols``."""
    r = rows_idx.to(tl.int64)
    base = (r // inner) * C * inner + r % inner
    return base[:, None] + (cols.to(tl.int64) * inner)[None, :]


@triton.jit
def _column(ptr, cols, cmask, HAS: tl.constexpr, fill, CT: tl.constexpr):
    """A per-column vector as a [1, BLOCK_C] row, or ``fill`` when absent."""
    if HAS:
        return tl.load(ptr + cols, mask=cmask, other=0.0).to(CT)[None, :]
    return (tl.zeros_like(cols).to(CT) + fill)[None, :]


@triton.jit
def _layer_norm_forward_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    mean_ptr,
    invstd_ptr,
    rows,
    C,
    inner,
    eps,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    CT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r_idx = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r_idx < rows
    acc = tl.zeros((BLOCK_R, BLOCK_C), CT)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (cols < C)[None, :]
        acc += tl.load(x_ptr + _offsets(r_idx, cols, C, inner), mask=mask, other=0.0).to(CT)
    n = tl.zeros((BLOCK_R,), CT) + C
    mean = tl.sum(acc, axis=1) / n
    acc = tl.zeros((BLOCK_R, BLOCK_C), CT)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + _offsets(r_idx, cols, C, inner), mask=mask, other=0.0).to(CT)
        d = tl.where(mask, x - mean[:, None], 0.0)
        acc += d * d
    invstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / n + (tl.zeros((BLOCK_R,), CT) + eps))
    tl.store(mean_ptr + r_idx, mean, mask=rmask)
    tl.store(invstd_ptr + r_idx, invstd, mask=rmask)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mask = rmask[:, None] & cmask[None, :]
        offs = _offsets(r_idx, cols, C, inner)
        xhat = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(CT) - mean[:, None]) * invstd[:, None]
        y = xhat * _column(w_ptr, cols, cmask, HAS_W, 1.0, CT) + _column(b_ptr, cols, cmask, HAS_B, 0.0, CT)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_backward_kernel(
    gy_ptr,
    x_ptr,
    w_ptr,
    mean_ptr,
    invstd_ptr,
    gx_ptr,
    rows,
    C,
    inner,
    HAS_W: tl.constexpr,
    CT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r_idx = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r_idx < rows
    mean = tl.load(mean_ptr + r_idx, mask=rmask, other=0.0).to(CT)
    r = tl.load(invstd_ptr + r_idx, mask=rmask, other=0.0).to(CT)
    acc_g = tl.zeros((BLOCK_R, BLOCK_C), CT)
    acc_gx = tl.zeros((BLOCK_R, BLOCK_C), CT)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mask = rmask[:, None] & cmask[None, :]
        offs = _offsets(r_idx, cols, C, inner)
        xhat = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(CT) - mean[:, None]) * r[:, None]
        g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(CT) * _column(w_ptr, cols, cmask, HAS_W, 1.0, CT)
        acc_g += g
        acc_gx += tl.where(mask, g * xhat, 0.0)
    n = tl.zeros((BLOCK_R,), CT) + C
    a = tl.sum(acc_g, axis=1) / n
    b = tl.sum(acc_gx, axis=1) / n
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mask = rmask[:, None] & cmask[None, :]
        offs = _offsets(r_idx, cols, C, inner)
        xhat = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(CT) - mean[:, None]) * r[:, None]
        g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(CT) * _column(w_ptr, cols, cmask, HAS_W, 1.0, CT)
        gx = r[:, None] * (g - a[:, None] - b[:, None] * xhat)
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_double_backward_kernel(
    gy_ptr,
    x_ptr,
    w_ptr,
    mean_ptr,
    invstd_ptr,
    v_ptr,
    ggw_ptr,
    ggb_ptr,
    d_gy_ptr,
    d_x_ptr,
    rowstat_ptr,
    rows,
    C,
    inner,
    HAS_W: tl.constexpr,
    CT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """d_gy and d_x; writes each row's (Vbar, Cv) to rowstat [2, rows] for the d_w column sums."""
    r_idx = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r_idx < rows
    mean = tl.load(mean_ptr + r_idx, mask=rmask, other=0.0).to(CT)
    r = tl.load(invstd_ptr + r_idx, mask=rmask, other=0.0).to(CT)
    s_g = tl.zeros((BLOCK_R, BLOCK_C), CT)
    s_gx = tl.zeros((BLOCK_R, BLOCK_C), CT)
    s_v = tl.zeros((BLOCK_R, BLOCK_C), CT)
    s_vx = tl.zeros((BLOCK_R, BLOCK_C), CT)
    s_vg = tl.zeros((BLOCK_R, BLOCK_C), CT)
    s_q = tl.zeros((BLOCK_R, BLOCK_C), CT)
    s_qx = tl.zeros((BLOCK_R, BLOCK_C), CT)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mask = rmask[:, None] & cmask[None, :]
        offs = _offsets(r_idx, cols, C, inner)
        xhat = tl.where(mask, (tl.load(x_ptr + offs, mask=mask, other=0.0).to(CT) - mean[:, None]) * r[:, None], 0.0)
        gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(CT)
        g = gy * _column(w_ptr, cols, cmask, HAS_W, 1.0, CT)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(CT)
        q = gy * tl.load(ggw_ptr + cols, mask=cmask, other=0.0).to(CT)[None, :]
        s_g += g
        s_gx += g * xhat
        s_v += v
        s_vx += v * xhat
        s_vg += v * g
        s_q += q
        s_qx += q * xhat
    n = tl.zeros((BLOCK_R,), CT) + C
    a = tl.sum(s_g, axis=1) / n
    b = tl.sum(s_gx, axis=1) / n
    v_bar = tl.sum(s_v, axis=1) / n
    cv = tl.sum(s_vx, axis=1) / n
    d = tl.sum(s_vg, axis=1) / n
    q_bar = tl.sum(s_q, axis=1) / n
    qx = tl.sum(s_qx, axis=1) / n
    tl.store(rowstat_ptr + r_idx, v_bar, mask=rmask)
    tl.store(rowstat_ptr + rows + r_idx, cv, mask=rmask)
    r2 = r * r
    # d_x = -r^2 Cv g + k_v V + k_xhat xhat + k_1 + r q
    k_1 = r2 * (a * cv + b * v_bar) - r * q_bar
    k_xhat = r2 * (3.0 * b * cv + a * v_bar - d) - r * qx
    k_v = -r2 * b
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mask = rmask[:, None] & cmask[None, :]
        offs = _offsets(r_idx, cols, C, inner)
        xhat = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(CT) - mean[:, None]) * r[:, None]
        gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(CT)
        w = _column(w_ptr, cols, cmask, HAS_W, 1.0, CT)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(CT)
        ggw = tl.load(ggw_ptr + cols, mask=cmask, other=0.0).to(CT)[None, :]
        ggb = tl.load(ggb_ptr + cols, mask=cmask, other=0.0).to(CT)[None, :]
        d_gy = w * r[:, None] * (v - v_bar[:, None] - cv[:, None] * xhat) + ggw * xhat + ggb
        d_x = (
            -(r2 * cv)[:, None] * gy * w
            + k_v[:, None] * v
            + k_xhat[:, None] * xhat
            + k_1[:, None]
            + r[:, None] * ggw * gy
        )
        tl.store(d_gy_ptr + offs, d_gy.to(d_gy_ptr.dtype.element_ty), mask=mask)
        tl.store(d_x_ptr + offs, d_x.to(d_x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_column_kernel(
    x_ptr,
    gy_ptr,
    v_ptr,
    mean_ptr,
    invstd_ptr,
    rowstat_ptr,
    part_ptr,
    rows,
    C,
    inner,
    chunk,
    MODE: tl.constexpr,
    CT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Column sums over rows [split * chunk, + chunk) into part [splits, 2, C].
    MODE 0: sum(gy xhat), sum(gy);  1: sum(gy r (V - Vbar - Cv xhat)) (Vbar, Cv from rowstat)."""
    split = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    acc0 = tl.zeros((BLOCK_R, BLOCK_C), CT)
    acc1 = tl.zeros((BLOCK_R, BLOCK_C), CT)
    start = split * chunk
    end = tl.minimum(start + chunk, rows)
    for r0 in range(start, end, BLOCK_R):
        r_idx = r0 + tl.arange(0, BLOCK_R)
        rmask = r_idx < end
        mask = rmask[:, None] & cmask[None, :]
        offs = _offsets(r_idx, cols, C, inner)
        mean = tl.load(mean_ptr + r_idx, mask=rmask, other=0.0).to(CT)
        r = tl.load(invstd_ptr + r_idx, mask=rmask, other=0.0).to(CT)
        xhat = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(CT) - mean[:, None]) * r[:, None]
        gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(CT)
        if MODE == 0:
            acc0 += gy * xhat
            acc1 += gy
        else:
            v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(CT)
            v_bar = tl.load(rowstat_ptr + r_idx, mask=rmask, other=0.0).to(CT)
            cv = tl.load(rowstat_ptr + rows + r_idx, mask=rmask, other=0.0).to(CT)
            acc0 += gy * r[:, None] * (v - v_bar[:, None] - cv[:, None] * xhat)
    base = part_ptr + split * 2 * C + cols
    tl.store(base, tl.sum(acc0, axis=0), mask=cmask)
    if MODE == 0:
        tl.store(base + C, tl.sum(acc1, axis=0), mask=cmask)


# ---- launchers: (tensors..., rows, C, inner, scalars) as fastrob.ops.layer_norm calls them ----


def _row_grid(rows, c, inner, dtype):
    block_r, block_c = row_tile(c, inner)
    warps = row_warps(block_r, block_c, dtype == torch.float64)
    return (triton.cdiv(rows, block_r),), dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)


def column_chunk(rows: int, splits: int, inner: int) -> tuple[int, int]:
    """(rows per split, a multiple of the tile's rows; the number of non-empty splits)."""
    block_r, _ = column_tile(inner)
    chunk = triton.cdiv(triton.cdiv(rows, splits), block_r) * block_r
    return chunk, triton.cdiv(rows, chunk)


def _columns(mode, x, gy, v, mean, invstd, rowstat, part, rows, c, inner, splits) -> None:
    block_r, block_c = column_tile(inner)
    chunk, used = column_chunk(rows, splits, inner)
    _layer_norm_column_kernel[(triton.cdiv(c, block_c), used)](
        x,
        gy,
        v if v is not None else x,
        mean,
        invstd,
        rowstat if rowstat is not None else mean,
        part,
        rows,
        c,
        inner,
        chunk,
        MODE=mode,
        CT=compute_type(x.dtype),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=row_warps(block_r, block_c, x.dtype == torch.float64),
    )


def layer_norm_forward(x, w, b, y, mean, invstd, rows, c, inner, eps) -> None:
    grid, tile = _row_grid(rows, c, inner, x.dtype)
    _layer_norm_forward_kernel[grid](
        x,
        w if w is not None else mean,
        b if b is not None else mean,
        y,
        mean,
        invstd,
        rows,
        c,
        inner,
        eps,
        HAS_W=w is not None,
        HAS_B=b is not None,
        CT=compute_type(x.dtype),
        **tile,
    )


def layer_norm_backward(gy, x, w, mean, invstd, gx, part, rows, c, inner, splits) -> None:
    """gx, and the column partial sums (gw, gb) in part [splits, 2, C]."""
    grid, tile = _row_grid(rows, c, inner, x.dtype)
    _layer_norm_backward_kernel[grid](
        gy,
        x,
        w if w is not None else mean,
        mean,
        invstd,
        gx,
        rows,
        c,
        inner,
        HAS_W=w is not None,
        CT=compute_type(x.dtype),
        **tile,
    )
    _columns(0, x, gy, None, mean, invstd, None, part, rows, c, inner, splits)


def layer_norm_double_backward(
    gy, x, w, mean, invstd, v, ggw, ggb, d_gy, d_x, rowstat, part, rows, c, inner, splits
) -> None:
    """d_gy, d_x, and the column partial sums of d_w in part [splits, 2, C] (row 0 of each split)."""
    grid, tile = _row_grid(rows, c, inner, x.dtype)
    _layer_norm_double_backward_kernel[grid](
        gy,
        x,
        w if w is not None else mean,
        mean,
        invstd,
        v,
        ggw,
        ggb,
        d_gy,
        d_x,
        rowstat,
        rows,
        c,
        inner,
        HAS_W=w is not None,
        CT=compute_type(x.dtype),
        **tile,
    )
    _columns(1, x, gy, v, mean, invstd, rowstat, part, rows, c, inner, splits)
