"""Triton kernels of the fused cross-entropy (the CUDA twin is kernels/cross_entropy.cuh).

Per row b of logits z [B, C] with label y and smoothing e, q = (1 - e) onehot(y) + e / C:
  forward:          lse = logsumexp(z)  (online: one pass over column blocks, any C)
                    loss = lse - sum_c q_c z_c = lse - (1 - e) z_y - (e / C) sum_c z_c
  backward:         p = exp(z - lse);  dz = p (gl + gs) - q gl
                    (gl = dL/dloss; gs = dL/dlse, 0 when the logsumexp output is unused)
  double backward:  for V = dL/d(dz), with s = gl + gs and p.V = sum_c p_c V_c:
                    d_z  = s p (V - p.V)          (the softmax Hessian-vector product, times s)
                    d_gl = p.V - q.V,   d_gs = p.V
Only lse is saved by the forward; the backward recomputes p from z. lse enters the backward as a
function of z: d_z above is the total derivative, so lse itself receives no gradient there.
Per-row values are float32 (float64 for float64 logits); dz and d_z are rounded to the storage
dtype once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastrob.triton._common import compute_type, row_block, warps


@triton.jit
def _cross_entropy_forward_kernel(
    z_ptr, y_ptr, loss_ptr, lse_ptr, n_cols, smoothing, CT: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * n_cols
    # Per-lane online logsumexp, combined across lanes at the end: lane values never mix until then.
    m = tl.full((BLOCK,), float("-inf"), CT)
    s = tl.zeros((BLOCK,), CT)
    total = tl.zeros((BLOCK,), CT)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(CT)
        m_new = tl.maximum(m, x)
        # a lane that has seen only masked columns stays at -inf; shifting it by 0 instead of
        # -inf keeps exp() at 0 rather than exp(-inf + inf) = nan
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.exp(x - shift)
        m = m_new
        total += tl.where(mask, x, 0.0)
    m_row = tl.max(m, axis=0)
    s_row = tl.sum(s * tl.exp(m - m_row), axis=0)
    lse = m_row + tl.log(s_row)
    z_y = tl.load(base + tl.load(y_ptr + row)).to(CT)
    # without smoothing the sum of the logits is not part of the loss: 0 * (-inf) would be nan
    smooth = tl.where(smoothing > 0, smoothing / n_cols * tl.sum(total, axis=0), 0.0)
    loss = lse - (1.0 - smoothing) * z_y - smooth
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, loss)


@triton.jit
def _cross_entropy_backward_kernel(
    z_ptr,
    y_ptr,
    lse_ptr,
    gl_ptr,
    gs_ptr,
    dz_ptr,
    n_cols,
    col_blocks,
    smoothing,
    HAS_GS: tl.constexpr,
    CT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # a 1-D grid of rows x column blocks (axes 1 and 2 of a grid hold at most 65535 blocks):
    # elementwise given the row's lse
    pid = tl.program_id(0).to(tl.int64)
    row = pid // col_blocks
    cols = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    lse = tl.load(lse_ptr + row).to(CT)
    gl = tl.load(gl_ptr + row).to(CT)
    scale = gl
    if HAS_GS:
        scale += tl.load(gs_ptr + row).to(CT)
    y = tl.load(y_ptr + row)
    z = tl.load(z_ptr + row * n_cols + cols, mask=mask, other=0.0).to(CT)
    q = tl.where(cols == y, 1.0 - smoothing, 0.0) + smoothing / n_cols
    dz = tl.exp(z - lse) * scale - q * gl
    tl.store(dz_ptr + row * n_cols + cols, dz.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cross_entropy_double_backward_kernel(
    z_ptr,
    y_ptr,
    lse_ptr,
    gl_ptr,
    gs_ptr,
    v_ptr,
    d_z_ptr,
    d_gl_ptr,
    d_gs_ptr,
    n_cols,
    smoothing,
    HAS_GS: tl.constexpr,
    CT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(lse_ptr + row).to(CT)
    scale = tl.load(gl_ptr + row).to(CT)
    if HAS_GS:
        scale += tl.load(gs_ptr + row).to(CT)
    # pass 1: p.V and sum V (row reductions); pass 2: d_z, which needs p.V
    pv = tl.zeros((BLOCK,), CT)
    sv = tl.zeros((BLOCK,), CT)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.load(z_ptr + row * n_cols + cols, mask=mask, other=float("-inf")).to(CT)
        v = tl.load(v_ptr + row * n_cols + cols, mask=mask, other=0.0).to(CT)
        pv += tl.exp(z - lse) * v
        sv += v
    p_dot_v = tl.sum(pv, axis=0)
    v_y = tl.load(v_ptr + row * n_cols + tl.load(y_ptr + row)).to(CT)
    q_dot_v = (1.0 - smoothing) * v_y + smoothing / n_cols * tl.sum(sv, axis=0)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.load(z_ptr + row * n_cols + cols, mask=mask, other=float("-inf")).to(CT)
        v = tl.load(v_ptr + row * n_cols + cols, mask=mask, other=0.0).to(CT)
        d_z = scale * tl.exp(z - lse) * (v - p_dot_v)
        tl.store(d_z_ptr + row * n_cols + cols, d_z.to(d_z_ptr.dtype.element_ty), mask=mask)
    tl.store(d_gl_ptr + row, p_dot_v - q_dot_v)
    tl.store(d_gs_ptr + row, p_dot_v)


def cross_entropy_forward(z, y, loss, lse, smoothing: float) -> None:
    rows, cols = z.shape
    if rows == 0:
        return
    block = row_block(cols)
    _cross_entropy_forward_kernel[(rows,)](
        z, y, loss, lse, cols, smoothing, CT=compute_type(z.dtype), BLOCK=block, num_warps=warps(block)
    )


def cross_entropy_backward(z, y, lse, gl, gs, dz, smoothing: float) -> None:
    rows, cols = z.shape
    if z.numel() == 0:
        return
    block = row_block(cols, 1024)
    col_blocks = triton.cdiv(cols, block)
    _cross_entropy_backward_kernel[(rows * col_blocks,)](
        z,
        y,
        lse,
        gl,
        gs if gs is not None else gl,
        dz,
        cols,
        col_blocks,
        smoothing,
        HAS_GS=gs is not None,
        CT=compute_type(z.dtype),
        BLOCK=block,
    )


def cross_entropy_double_backward(z, y, lse, gl, gs, v, d_z, d_gl, d_gs, smoothing: float) -> None:
    rows, cols = z.shape
    if rows == 0:
        return
    block = row_block(cols)
    _cross_entropy_double_backward_kernel[(rows,)](
        z,
        y,
        lse,
        gl,
        gs if gs is not None else gl,
        v,
        d_z,
        d_gl,
        d_gs,
        cols,
        smoothing,
        HAS_GS=gs is not None,
        CT=compute_type(z.dtype),
        BLOCK=block,
        num_warps=warps(block),
    )
