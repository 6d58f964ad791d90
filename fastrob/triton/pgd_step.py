"""Triton kernels of the fused PGD step (the CUDA twin is kernels/pgd_step.cuh).

For each sample b (eps_b, alpha_b per sample or shared), with d0 = x_adv - x_orig:
  Linf: out = clamp(x_orig + clamp(d0 + alpha_b * sign(grad), -eps_b, eps_b), lower, upper)
  L2:   s = alpha_b / ||grad_b||_2 (0 where the gradient is 0), delta = d0 + s * grad,
        f = min(1, eps_b / ||delta||_2), out = clamp(x_orig + f * delta, lower, upper)
Arithmetic is float32; the result is rounded to the storage dtype once. Inputs are flat arrays
with the batch outermost (contiguous or channels_last; fastrob/ops/pgd_step.py sees to that).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Samples up to this many elements are stepped by one program holding the whole sample, so each
# input is read once; larger ones take two passes (per-chunk partial sums, then the update).
# 8192: a 16384-element program (16 warps, 128 registers a thread at most) spilled 144-256 bytes a
# thread on sm_80/sm_90; 8192 on 8 warps may use 255 (bench/aot_compile.py reports it).
MAX_SAMPLE_IN_ONE_PROGRAM = 8192
L2_CHUNK = 4096
LINF_BLOCK = 1024
# The smallest normal float32 (torch.finfo(torch.float32).tiny), the reference's clamp of the norms,
# applied after the sqrt. A subnormal literal (1e-38) misbehaved on both Triton versions: 3.9 compiled
# max(gg, 1e-38) before sqrt.approx.ftz, which flushes it to 0 (alpha / 0); 3.6 types that literal
# float64, so the whole step ran in float64 (and its interpreter rounded the bfloat16 results wrongly).
FLT_MIN: tl.constexpr = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def _clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo), hi)


@triton.jit
def _pgd_step_linf_kernel(
    x_adv_ptr,
    grad_ptr,
    x_orig_ptr,
    out_ptr,
    eps_ptr,
    alpha_ptr,
    eps,
    alpha,
    lower,
    upper,
    n_total,
    per_sample,
    EPS_PER_SAMPLE: tl.constexpr,
    ALPHA_PER_SAMPLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_total
    xa = tl.load(x_adv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(x_orig_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if EPS_PER_SAMPLE:
        eps = tl.load(eps_ptr + offs // per_sample, mask=mask, other=0.0)
    if ALPHA_PER_SAMPLE:
        alpha = tl.load(alpha_ptr + offs // per_sample, mask=mask, other=0.0)
    sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
    delta = _clamp(xa + alpha * sign - xo, -eps, eps)
    out = _clamp(xo + delta, lower, upper)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pgd_step_l2_sample_kernel(
    x_adv_ptr,
    grad_ptr,
    x_orig_ptr,
    out_ptr,
    eps_ptr,
    alpha_ptr,
    eps,
    alpha,
    lower,
    upper,
    per_sample,
    EPS_PER_SAMPLE: tl.constexpr,
    ALPHA_PER_SAMPLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = b * per_sample + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < per_sample
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(x_orig_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(x_adv_ptr + offs, mask=mask, other=0.0).to(tl.float32) - xo
    if EPS_PER_SAMPLE:
        eps = tl.load(eps_ptr + b)
    if ALPHA_PER_SAMPLE:
        alpha = tl.load(alpha_ptr + b)
    gg = tl.sum(g * g, axis=0)
    s = tl.where(gg > 0, alpha / tl.maximum(tl.sqrt(gg), FLT_MIN), 0.0)
    d = d + s * g
    norm = tl.sqrt(tl.sum(d * d, axis=0))
    f = tl.where(norm > eps, eps / tl.maximum(norm, FLT_MIN), 1.0)
    out = _clamp(xo + f * d, lower, upper)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pgd_step_l2_partials_kernel(
    x_adv_ptr, grad_ptr, x_orig_ptr, partials_ptr, per_sample, n_chunks, BLOCK: tl.constexpr
):
    """partials[b, c] = (g.g, d0.g, d0.d0) over chunk c of sample b."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_chunks
    c = pid % n_chunks
    local = c * BLOCK + tl.arange(0, BLOCK)
    mask = local < per_sample
    offs = b * per_sample + local
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(x_adv_ptr + offs, mask=mask, other=0.0).to(tl.float32) - tl.load(
        x_orig_ptr + offs, mask=mask, other=0.0
    ).to(tl.float32)
    tl.store(partials_ptr + pid * 3 + 0, tl.sum(g * g, axis=0))
    tl.store(partials_ptr + pid * 3 + 1, tl.sum(d * g, axis=0))
    tl.store(partials_ptr + pid * 3 + 2, tl.sum(d * d, axis=0))


@triton.jit
def _pgd_step_l2_apply_kernel(
    x_adv_ptr,
    grad_ptr,
    x_orig_ptr,
    out_ptr,
    partials_ptr,
    eps_ptr,
    alpha_ptr,
    eps,
    alpha,
    lower,
    upper,
    per_sample,
    n_chunks,
    EPS_PER_SAMPLE: tl.constexpr,
    ALPHA_PER_SAMPLE: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNKS: tl.constexpr,
):
    """The update from the partial sums, using ||d0 + s g||^2 = d0.d0 + 2 s d0.g + s^2 g.g."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_chunks
    c = pid % n_chunks
    chunk_ids = tl.arange(0, CHUNKS)
    rows = partials_ptr + (b * n_chunks + chunk_ids) * 3
    present = chunk_ids < n_chunks
    gg = tl.sum(tl.load(rows + 0, mask=present, other=0.0), axis=0)
    dg = tl.sum(tl.load(rows + 1, mask=present, other=0.0), axis=0)
    dd = tl.sum(tl.load(rows + 2, mask=present, other=0.0), axis=0)
    if EPS_PER_SAMPLE:
        eps = tl.load(eps_ptr + b)
    if ALPHA_PER_SAMPLE:
        alpha = tl.load(alpha_ptr + b)
    s = tl.where(gg > 0, alpha / tl.maximum(tl.sqrt(gg), FLT_MIN), 0.0)
    norm = tl.sqrt(tl.maximum(dd + 2.0 * s * dg + s * s * gg, 0.0))
    f = tl.where(norm > eps, eps / tl.maximum(norm, FLT_MIN), 1.0)
    local = c * BLOCK + tl.arange(0, BLOCK)
    mask = local < per_sample
    offs = b * per_sample + local
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(x_orig_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(x_adv_ptr + offs, mask=mask, other=0.0).to(tl.float32) - xo + s * g
    out = _clamp(xo + f * d, lower, upper)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def pgd_step(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x_orig: torch.Tensor,
    out: torch.Tensor,
    eps_per_sample: torch.Tensor | None,
    alpha_per_sample: torch.Tensor | None,
    eps: float,
    alpha: float,
    norm: str,
    lower: float,
    upper: float,
) -> None:
    """Launches the step into ``out``. All tensors share one batch-outermost dense layout;
    per-sample eps/alpha are float32 [B] on the same device, or None to use the floats."""
    batch = x_adv.shape[0]
    n_total = x_adv.numel()
    if n_total == 0:
        return
    per_sample = n_total // batch
    # Unused pointer arguments still need a tensor; the constexpr flags keep them unread.
    eps_arg = eps_per_sample if eps_per_sample is not None else x_adv
    alpha_arg = alpha_per_sample if alpha_per_sample is not None else x_adv
    flags = dict(EPS_PER_SAMPLE=eps_per_sample is not None, ALPHA_PER_SAMPLE=alpha_per_sample is not None)
    if norm == "linf":
        grid = (triton.cdiv(n_total, LINF_BLOCK),)
        _pgd_step_linf_kernel[grid](
            x_adv,
            grad,
            x_orig,
            out,
            eps_arg,
            alpha_arg,
            eps,
            alpha,
            lower,
            upper,
            n_total,
            per_sample,
            BLOCK=LINF_BLOCK,
            **flags,
        )
    elif per_sample <= MAX_SAMPLE_IN_ONE_PROGRAM:
        block = triton.next_power_of_2(per_sample)
        _pgd_step_l2_sample_kernel[(batch,)](
            x_adv,
            grad,
            x_orig,
            out,
            eps_arg,
            alpha_arg,
            eps,
            alpha,
            lower,
            upper,
            per_sample,
            BLOCK=block,
            num_warps=_warps(block),
            **flags,
        )
    else:
        n_chunks = triton.cdiv(per_sample, L2_CHUNK)
        partials = torch.empty((batch, n_chunks, 3), device=x_adv.device, dtype=torch.float32)
        grid = (batch * n_chunks,)
        _pgd_step_l2_partials_kernel[grid](x_adv, grad, x_orig, partials, per_sample, n_chunks, BLOCK=L2_CHUNK)
        _pgd_step_l2_apply_kernel[grid](
            x_adv,
            grad,
            x_orig,
            out,
            partials,
            eps_arg,
            alpha_arg,
            eps,
            alpha,
            lower,
            upper,
            per_sample,
            n_chunks,
            BLOCK=L2_CHUNK,
            CHUNKS=triton.next_power_of_2(n_chunks),
            **flags,
        )


def _warps(block: int) -> int:
    # about 32 elements of each input per thread keeps a whole sample in registers
    return max(1, min(16, block // (32 * 32)))
