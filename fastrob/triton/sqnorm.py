"""Triton kernels of the squared-norm reduction (the CUDA twin is kernels/sqnorm.cuh).

For g viewed as [M, N] rows (M kept, N reduced) and per-row incoming gradients:
  forward:          s[m]   = sum_n g[m, n]^2
  backward:         dg     = 2 * go[m] * g                      (go = dL/ds)
  double backward:  for V  = dL/d(dg):
                    d_g    = 2 * go[m] * V
                    d_go[m] = 2 * sum_n g[m, n] * V[m, n]
Sums accumulate in float32 (float64 for float64 storage); elementwise results are rounded to the
storage dtype once. All tensors are contiguous [M, N] (fastrob/ops/sqnorm.py sees to that).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrob.triton._common import compute_type, row_block, warps


@triton.jit
def _sqnorm_forward_kernel(g_ptr, out_ptr, n_cols, CT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK,), dtype=CT)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + row * n_cols + cols, mask=cols < n_cols, other=0.0).to(CT)
        acc += g * g
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


@triton.jit
def _sqnorm_backward_kernel(g_ptr, go_ptr, dg_ptr, n_cols, col_blocks, CT: tl.constexpr, BLOCK: tl.constexpr):
    # a 1-D grid of rows x column blocks (axes 1 and 2 of a grid hold at most 65535 blocks):
    # elementwise, so no program loops
    pid = tl.program_id(0).to(tl.int64)
    row = pid // col_blocks
    cols = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    scale = 2.0 * tl.load(go_ptr + row).to(CT)
    g = tl.load(g_ptr + row * n_cols + cols, mask=mask, other=0.0).to(CT)
    tl.store(dg_ptr + row * n_cols + cols, (scale * g).to(dg_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sqnorm_double_backward_kernel(
    g_ptr, go_ptr, v_ptr, d_g_ptr, d_go_ptr, n_cols, CT: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    scale = 2.0 * tl.load(go_ptr + row).to(CT)
    acc = tl.zeros((BLOCK,), dtype=CT)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        v = tl.load(v_ptr + row * n_cols + cols, mask=mask, other=0.0).to(CT)
        g = tl.load(g_ptr + row * n_cols + cols, mask=mask, other=0.0).to(CT)
        acc += g * v
        tl.store(d_g_ptr + row * n_cols + cols, (scale * v).to(d_g_ptr.dtype.element_ty), mask=mask)
    tl.store(d_go_ptr + row, 2.0 * tl.sum(acc, axis=0))


def sqnorm_forward(g: torch.Tensor, out: torch.Tensor) -> None:
    rows, cols = g.shape
    if rows == 0:
        return
    block = row_block(cols)
    _sqnorm_forward_kernel[(rows,)](g, out, cols, CT=compute_type(g.dtype), BLOCK=block, num_warps=warps(block))


def sqnorm_backward(g: torch.Tensor, go: torch.Tensor, dg: torch.Tensor) -> None:
    rows, cols = g.shape
    if g.numel() == 0:
        return
    block = row_block(cols, 1024)
    col_blocks = triton.cdiv(cols, block)
    _sqnorm_backward_kernel[(rows * col_blocks,)](g, go, dg, cols, col_blocks, CT=compute_type(g.dtype), BLOCK=block)


def sqnorm_double_backward(g, go, v, d_g, d_go) -> None:
    rows, cols = g.shape
    if rows == 0:
        return
    block = row_block(cols)
    _sqnorm_double_backward_kernel[(rows,)](
        g, go, v, d_g, d_go, cols, CT=compute_type(g.dtype), BLOCK=block, num_warps=warps(block)
    )
