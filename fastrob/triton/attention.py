"""Triton kernels of scaled dot-product attention, flash-style: tiled over queries and keys, with
an online softmax, so that no [N_q, N_k] matrix exists in memory (fastrob/ops/attention.py wires
them for autograd).

Per (batch, head) z, with q already multiplied by the scale (so the kernels need no float scalar,
which Triton would round to float32) and M the additive mask (-inf where a key is masked):
  forward:   S = q k^T + M,  lse = logsumexp_rows(S),  O = softmax(S) v
             (lse = +inf for a row whose every key is masked: its output row is 0, and every
             later exp(S - lse) of that row is exp(-inf) = 0, never nan)
  backward:  P = exp(S - lse), delta = rowsum(dO * O) (computed by the caller)
             dv = P^T dO,  dS = P * (dO v^T - delta),  dk = dS^T q,  dq_unscaled = dS k
             in two kernels (one program per key block for dk, dv; one per query block for dq),
             so no atomics.
Tensors are contiguous [Z, N, d]; the mask is read through its strides ([B, H, N_q, N_k] with
stride 0 along broadcast dimensions, z = b * H + h). Head dimensions pad to a power of two with
masked loads. Products are computed in float32 (float64 for float64 storage) at full precision
(no TF32), which favours accuracy over speed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastrob.triton._common import compute_type


@triton.jit
def _scores(q, k_blk, rows, cols, n_q, n_k, m_base, sm_i, sm_j, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """S of one (query block, key block) tile, -inf where a key is masked or out of range."""
    s = tl.dot(q, tl.trans(k_blk), input_precision="ieee")
    keep = (rows[:, None] < n_q) & (cols[None, :] < n_k)
    if HAS_MASK:
        s += tl.load(m_base + rows[:, None] * sm_i + cols[None, :] * sm_j, mask=keep, other=0.0).to(s.dtype)
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None])
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, lse_ptr,
    n_q, n_k, d, heads, sm_b, sm_h, sm_i, sm_j,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, CT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    z = tl.program_id(0).to(tl.int64)  # batch x heads on axis 0: axis 1 holds at most 65535
    start_m = tl.program_id(1)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok, dim_ok = rows < n_q, dims < d
    q = tl.load(
        q_ptr + (z * n_q + rows[:, None]) * d + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0
    )
    q = q.to(CT)
    m_base = m_ptr + (z // heads) * sm_b + (z % heads) * sm_h
    m_i = tl.full((BLOCK_M,), float("-inf"), CT)
    l_i = tl.zeros((BLOCK_M,), CT)
    acc = tl.zeros((BLOCK_M, BLOCK_D), CT)
    end = n_k
    if CAUSAL:
        end = tl.minimum(n_k, (start_m + 1) * BLOCK_M)
    for start_n in range(0, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (cols[:, None] < n_k) & dim_ok[None, :]
        k_blk = tl.load(k_ptr + (z * n_k + cols[:, None]) * d + dims[None, :], mask=kv_mask, other=0.0).to(CT)
        s = _scores(q, k_blk, rows, cols, n_q, n_k, m_base, sm_i, sm_j, HAS_MASK, CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far: no -inf - -inf
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_blk = tl.load(v_ptr + (z * n_k + cols[:, None]) * d + dims[None, :], mask=kv_mask, other=0.0).to(CT)
        acc = acc * alpha[:, None] + tl.dot(p, v_blk, input_precision="ieee")
        m_i = m_new
    alive = l_i > 0
    l_safe = tl.where(alive, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        o_ptr + (z * n_q + rows[:, None]) * d + dims[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )
    tl.store(lse_ptr + z * n_q + rows, tl.where(alive, m_i + tl.log(l_safe), float("inf")), mask=row_ok)


@triton.jit
def _attention_backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    n_q, n_k, d, heads, sm_b, sm_h, sm_i, sm_j,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, CT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    z = tl.program_id(0).to(tl.int64)  # batch x heads on axis 0: axis 1 holds at most 65535
    start_n = tl.program_id(1)
    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < d
    kv_mask = (cols[:, None] < n_k) & dim_ok[None, :]
    k_blk = tl.load(k_ptr + (z * n_k + cols[:, None]) * d + dims[None, :], mask=kv_mask, other=0.0).to(CT)
    v_blk = tl.load(v_ptr + (z * n_k + cols[:, None]) * d + dims[None, :], mask=kv_mask, other=0.0).to(CT)
    m_base = m_ptr + (z // heads) * sm_b + (z % heads) * sm_h
    dk = tl.zeros((BLOCK_N, BLOCK_D), CT)
    dv = tl.zeros((BLOCK_N, BLOCK_D), CT)
    begin = 0
    if CAUSAL:  # query rows before this key block attend to none of its keys
        begin = (start_n * BLOCK_N) // BLOCK_M * BLOCK_M
    for start_m in range(begin, n_q, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < n_q
        q_mask = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(q_ptr + (z * n_q + rows[:, None]) * d + dims[None, :], mask=q_mask, other=0.0).to(CT)
        do = tl.load(do_ptr + (z * n_q + rows[:, None]) * d + dims[None, :], mask=q_mask, other=0.0).to(CT)
        lse = tl.load(lse_ptr + z * n_q + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptr + z * n_q + rows, mask=row_ok, other=0.0)
        s = _scores(q, k_blk, rows, cols, n_q, n_k, m_base, sm_i, sm_j, HAS_MASK, CAUSAL)
        p = tl.exp(s - lse[:, None])
        dv += tl.dot(tl.trans(p), do, input_precision="ieee")
        dp = tl.dot(do, tl.trans(v_blk), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
    tl.store(dk_ptr + (z * n_k + cols[:, None]) * d + dims[None, :], dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + (z * n_k + cols[:, None]) * d + dims[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attention_backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    n_q, n_k, d, heads, sm_b, sm_h, sm_i, sm_j,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, CT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    z = tl.program_id(0).to(tl.int64)  # batch x heads on axis 0: axis 1 holds at most 65535
    start_m = tl.program_id(1)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok, dim_ok = rows < n_q, dims < d
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(q_ptr + (z * n_q + rows[:, None]) * d + dims[None, :], mask=q_mask, other=0.0).to(CT)
    do = tl.load(do_ptr + (z * n_q + rows[:, None]) * d + dims[None, :], mask=q_mask, other=0.0).to(CT)
    lse = tl.load(lse_ptr + z * n_q + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptr + z * n_q + rows, mask=row_ok, other=0.0)
    m_base = m_ptr + (z // heads) * sm_b + (z % heads) * sm_h
    dq = tl.zeros((BLOCK_M, BLOCK_D), CT)
    end = n_k
    if CAUSAL:
        end = tl.minimum(n_k, (start_m + 1) * BLOCK_M)
    for start_n in range(0, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (cols[:, None] < n_k) & dim_ok[None, :]
        k_blk = tl.load(k_ptr + (z * n_k + cols[:, None]) * d + dims[None, :], mask=kv_mask, other=0.0).to(CT)
        v_blk = tl.load(v_ptr + (z * n_k + cols[:, None]) * d + dims[None, :], mask=kv_mask, other=0.0).to(CT)
        s = _scores(q, k_blk, rows, cols, n_q, n_k, m_base, sm_i, sm_j, HAS_MASK, CAUSAL)
        p = tl.exp(s - lse[:, None])
        ds = p * (tl.dot(do, tl.trans(v_blk), input_precision="ieee") - delta[:, None])
        dq += tl.dot(ds, k_blk, input_precision="ieee")
    tl.store(dq_ptr + (z * n_q + rows[:, None]) * d + dims[None, :], dq.to(dq_ptr.dtype.element_ty), mask=q_mask)


def _blocks(d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D): tl.dot needs every side >= 16; wide heads take smaller tiles
    to bound registers."""
    block_d = max(16, triton.next_power_of_2(d))
    tile = 64 if block_d <= 64 else 32
    return tile, tile, block_d


def _mask_args(mask, like):
    """(pointer tensor, strides b, h, i, j, HAS_MASK) of an optional [B, H, N_q, N_k] mask view."""
    if mask is None:
        return like, 0, 0, 0, 0, False
    return (mask, *mask.stride(), True)


def attention_forward(qs, k, v, mask, causal: bool, out, lse) -> None:
    """out, lse of q_scaled [Z, N_q, d], k, v [Z, N_k, d]; ``mask`` None or [B, H, N_q, N_k]."""
    z, n_q, d = qs.shape
    n_k = k.shape[1]
    if out.numel() == 0:
        return
    heads = mask.shape[1] if mask is not None else 1
    block_m, block_n, block_d = _blocks(d)
    m, sb, sh, si, sj, has_mask = _mask_args(mask, qs)
    _attention_forward_kernel[(z, triton.cdiv(n_q, block_m))](
        qs, k, v, m, out, lse, n_q, n_k, d, heads, sb, sh, si, sj,
        HAS_MASK=has_mask, CAUSAL=causal, CT=compute_type(qs.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip


def attention_backward(qs, k, v, mask, causal: bool, grad_out, lse, delta, dq, dk, dv) -> None:
    """dq (unscaled: the caller multiplies by the scale), dk, dv into the given buffers."""
    z, n_q, d = qs.shape
    n_k = k.shape[1]
    if z == 0 or d == 0:
        return
    if n_q == 0:
        dk.zero_()
        dv.zero_()
        return
    heads = mask.shape[1] if mask is not None else 1
    block_m, block_n, block_d = _blocks(d)
    m, sb, sh, si, sj, has_mask = _mask_args(mask, qs)
    common = dict(HAS_MASK=has_mask, CAUSAL=causal, CT=compute_type(qs.dtype), BLOCK_M=block_m, BLOCK_N=block_n)
    if n_k > 0:
        _attention_backward_dkdv_kernel[(z, triton.cdiv(n_k, block_n))](
            qs, k, v, m, grad_out, lse, delta, dk, dv, n_q, n_k, d, heads, sb, sh, si, sj,
            **common, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    _attention_backward_dq_kernel[(z, triton.cdiv(n_q, block_m))](
        qs, k, v, m, grad_out, lse, delta, dq, n_q, n_k, d, heads, sb, sh, si, sj,
        **common, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip


__all__ = ["attention_forward", "attention_backward"]
