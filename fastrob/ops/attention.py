"""Scaled dot-product attention, differentiable twice on every backend: ``attention`` (dispatch),
``attention_reference`` (the math formula) and the ``fastrob::attention_triton`` custom ops.

Per (batch, head), with s the scale and M the mask (additive; -inf where a key is not attended):
    S = s q k^T + M,   P = softmax_rows(S),   O = P v
    backward:         dv = P^T dO,  dS = P * (dO v^T - rowsum(dO * O)),  dq = s dS k,  dk = s dS^T q
The Triton forward and backward are tiled (flash-style: no [N_q, N_k] matrix in memory; the forward
saves the rows' log-sum-exp). The backward is itself an op; its derivative (the double backward,
what a gradient penalty's parameter gradient runs through) is a closed-form composite of torch
ops that recomputes P from q, k and the saved log-sum-exp. It holds about eight [N_q, N_k]
matrices per (batch, head) in the accumulation dtype while it runs, one attention layer at a time
(the math path instead keeps P of every layer alive from the forward to the backward).
A row whose every key is masked gives output 0 and zero gradients, as torch's math attention does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastrob._checks import check_float, dtype_name
from fastrob.ops._common import accumulate_dtype, define_op, dense_like, launch, resolve_backend
from fastrob.ops._registry import FusedOp, SelfCheckCase, Tolerance, random_tensor, register

MAX_HEAD_DIM = 256  # the kernels' widest tile


def attention_reference(q, k, v, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, scale=None):
    """The math formula of ``torch.nn.functional.scaled_dot_product_attention``, computed in float32
    at least (float64 stays float64) and returned in q's dtype; fully masked rows give 0."""
    acc = accumulate_dtype(q.dtype)
    scale = _default_scale(q, scale)
    s = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale
    if is_causal:
        s = s.masked_fill(_causal_mask(s.shape[-2], s.shape[-1], s.device).logical_not(), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(attn_mask.logical_not(), float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    if attn_mask is None:  # every row attends to a key (with is_causal, key 0 at least)
        p = torch.softmax(s, -1)
    else:
        # A row with every key masked would be softmax(-inf, ..., -inf) = nan: it attends to nothing
        # instead (output 0). The row is replaced before the softmax, so no nan enters any derivative.
        dead = (s == float("-inf")).all(-1, keepdim=True)
        p = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return (p @ v.to(acc)).to(q.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` whose backward is differentiable again, on every backend.

    Args:
        q: [..., N_q, d]; k: [..., N_k, d]; v: [..., N_k, d_v]; leading dimensions broadcast.
        attn_mask: None, a bool mask (True: attend) or an additive float mask of q's dtype,
            broadcastable to [..., N_q, N_k].
        dropout_p: dropout on the attention weights, in [0, 1); > 0 runs the reference (the kernels
            have no dropout), with torch's random generator.
        is_causal: query i attends to keys j <= i (no attn_mask allowed with it).
        scale: the factor of q k^T; None is 1 / sqrt(d).
        backend: "auto" | "torch" | "triton". "auto" runs the Triton kernels on a GPU once they
            passed their self-check (fastrob.verify), else the reference; it also runs the
            reference for what the kernels do not cover (dropout, a mask that requires grad,
            d_v != d, d > 256). An explicit "triton" raises for those.

    Returns:
        [..., N_q, d_v] in q's dtype.
    """
    _check_args(q, k, v, attn_mask, dropout_p, is_causal, scale)
    # float64 runs on the kernels when asked for (tests, gradcheck); auto keeps it on the reference
    name = resolve_backend(backend, q, op=SPEC.name, fused=SPEC.fused_backends)
    if name == "triton":
        why = _kernels_do_not_cover(q, v, attn_mask, dropout_p)
        if why and backend != "auto":
            raise ValueError(f"attention: backend='triton' does not support {why}; use backend='auto' or 'torch'")
        name = "torch" if why else name
    if name == "torch":
        return attention_reference(q, k, v, attn_mask, dropout_p, is_causal, scale)
    return _fused(q, k, v, attn_mask, is_causal, _default_scale(q, scale))


def _default_scale(q, scale) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _causal_mask(n_q: int, n_k: int, device) -> torch.Tensor:
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril()


def _check_args(q, k, v, attn_mask, dropout_p, is_causal, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {dtype_name(t.dtype)}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape [..., N, d] (at least 2 dimensions), got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must have q's dtype and device ({dtype_name(q.dtype)}, {q.device})")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have q's head dimension {q.shape[-1]}, got shape {tuple(k.shape)}")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"v must have k's number of keys {k.shape[-2]}, got shape {tuple(v.shape)}")
    batch = [q.shape[:-2], k.shape[:-2], v.shape[:-2]]
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be None or a torch.Tensor, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            raise TypeError(
                f"attn_mask must be bool or of q's dtype {dtype_name(q.dtype)}, got {dtype_name(attn_mask.dtype)}"
            )
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask must be on q's device {q.device}, got {attn_mask.device}")
        if attn_mask.dim() < 2:
            attn_mask = attn_mask.view(*([1] * (2 - attn_mask.dim())), *attn_mask.shape)
        batch.append(attn_mask.shape[:-2])
        try:
            torch.broadcast_shapes(attn_mask.shape[-2:], (q.shape[-2], k.shape[-2]))
        except RuntimeError:
            raise ValueError(
                f"attn_mask must broadcast to [..., N_q, N_k] = [..., {q.shape[-2]}, {k.shape[-2]}], "
                f"got {tuple(attn_mask.shape)}"
            ) from None
        if is_causal:
            raise ValueError("attn_mask must be None when is_causal=True (as in F.scaled_dot_product_attention)")
    try:
        torch.broadcast_shapes(*batch)
    except RuntimeError:
        raise ValueError(f"the leading dimensions of q, k, v and attn_mask must broadcast, got {batch}") from None
    p = check_float("dropout_p", dropout_p, min_value=0.0)
    if p >= 1:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None:
        check_float("scale", scale)


def _kernels_do_not_cover(q, v, attn_mask, dropout_p) -> str:
    if dropout_p > 0:
        return "dropout_p > 0"
    if attn_mask is not None and attn_mask.requires_grad:
        return "an attn_mask that requires grad"
    if v.shape[-1] != q.shape[-1]:
        return "v with a head dimension other than q's"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dimensions above {MAX_HEAD_DIM}"
    return ""


def _fused(q, k, v, attn_mask, is_causal, scale):
    """The Triton path: leading dimensions broadcast and flattened to [B, H], the mask made an
    additive [B, H, N_q, N_k] view (stride 0 along broadcast dimensions, so a [N_q, N_k] mask is
    not copied per head)."""
    n_q, n_k, d = q.shape[-2], k.shape[-2], q.shape[-1]
    shapes = [q.shape[:-2], k.shape[:-2], v.shape[:-2]]
    if attn_mask is not None:
        if attn_mask.dim() < 2:
            attn_mask = attn_mask.view(*([1] * (2 - attn_mask.dim())), *attn_mask.shape)
        shapes.append(attn_mask.shape[:-2])
    lead = tuple(torch.broadcast_shapes(*shapes))
    b, h = (math.prod(lead[:-1]), lead[-1]) if lead else (1, 1)

    def flat(t, n):
        return t.expand(*lead, n, d).reshape(b * h, n, d).contiguous()

    mask = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            additive = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)
            attn_mask = additive.masked_fill_(attn_mask.logical_not(), float("-inf"))
        mask = attn_mask.expand(*lead, n_q, n_k).reshape(b, h, n_q, n_k)
    out, _ = _attention_triton(flat(q, n_q), flat(k, n_k), flat(v, n_k), mask, bool(is_causal), scale)
    return out.view(*lead, n_q, d).to(q.dtype)


# ---- the custom ops ----


def _triton_kernels():
    """fastrob/triton/attention.py, imported when a Triton kernel first runs (not by ``import fastrob``)."""
    from fastrob.triton import attention as kernels

    return kernels


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    qs = q.to(accumulate_dtype(q.dtype)) * scale  # scaled in torch: a float64 scale stays exact
    # the output in the accumulate dtype: the backward's rowsum(dO * O) from a half-precision O
    # would carry its rounding into every gradient (measured: 1.2x the bfloat16 tolerance)
    out = torch.empty(q.shape, dtype=accumulate_dtype(q.dtype), device=q.device)
    lse = q.new_empty(q.shape[:-1], dtype=accumulate_dtype(q.dtype))
    launch(
        "triton", lambda: _triton_kernels().attention_forward, "attention_forward", (qs, k, v, mask, causal, out, lse)
    )
    return out, lse


def _backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = accumulate_dtype(q.dtype)
    qs = q.to(acc) * scale
    grad_out = grad_out.contiguous()
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1)
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dk, dv = dense_like(k), dense_like(v)
    launch(
        "triton",
        lambda: _triton_kernels().attention_backward,
        "attention_backward",
        (qs, k, v, mask, causal, grad_out, lse, delta, dq, dk, dv),
    )
    return (dq * scale).to(q.dtype), dk, dv


def _double_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    gq: torch.Tensor | None,
    gk: torch.Tensor | None,
    gv: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The vector-Jacobian product of the backward (dq, dk, dv)(q, k, v, dO) with cotangents
    (gq, gk, gv) (None: zero), in closed form (derivation: docs/attention.md)."""
    acc = accumulate_dtype(q.dtype)
    q, k, v, go = (t.to(acc) for t in (q, k, v, grad_out))
    gq, gk, gv = (torch.zeros_like(t) if g is None else g.to(acc) for g, t in ((gq, q), (gk, k), (gv, v)))
    kt = k.transpose(-2, -1)
    s = (q @ kt) * scale
    if mask is not None:
        s = s + mask.reshape(s.shape).to(acc)  # [B, H, N_q, N_k] over [B * H, N_q, N_k]
    if causal:
        s = s.masked_fill(_causal_mask(s.shape[-2], s.shape[-1], s.device).logical_not(), float("-inf"))
    p = torch.exp(s - lse.unsqueeze(-1))  # lse = +inf on fully masked rows: P = 0 there
    del s
    dp = go @ v.transpose(-2, -1)
    delta = (p * dp).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    g_ds = (gq @ kt + q @ gk.transpose(-2, -1)) * scale  # the cotangent of dS
    d_q = (ds @ gk) * scale
    d_k = (ds.transpose(-2, -1) @ gq) * scale
    del ds
    d_go = p @ gv
    g_d = -(g_ds * p).sum(-1, keepdim=True)  # of delta
    g_p = go @ gv.transpose(-2, -1) + g_ds * (dp - delta) + g_d * dp
    g_dp = p * (g_ds + g_d)
    del g_ds, dp
    d_go = d_go + g_dp @ v
    d_v = g_dp.transpose(-2, -1) @ go
    del g_dp
    g_s = p * (g_p - (g_p * p).sum(-1, keepdim=True))  # through the softmax
    d_q = d_q + (g_s @ k) * scale
    d_k = d_k + (g_s.transpose(-2, -1) @ q) * scale
    return d_q.to(grad_out.dtype), d_k.to(grad_out.dtype), d_v.to(grad_out.dtype), d_go.to(grad_out.dtype)


def _build():
    """forward, backward and double-backward ops, wired for autograd. The double backward has no
    derivative of its own: a third derivative raises torch's "autograd not implemented" error."""

    def lse_like(q):
        return q.new_empty(q.shape[:-1], dtype=accumulate_dtype(q.dtype))

    fwd = define_op(
        "attention_triton",
        _forward,
        lambda q, k, v, mask, causal, scale: (q.new_empty(q.shape, dtype=accumulate_dtype(q.dtype)), lse_like(q)),
    )
    bwd = define_op(
        "attention_backward_triton",
        _backward,
        lambda q, k, v, mask, out, lse, go, causal, scale: (dense_like(q), dense_like(k), dense_like(v)),
    )
    dbl = define_op(
        "attention_double_backward",
        _double_backward,
        lambda q, k, v, mask, lse, go, gq, gk, gv, causal, scale: tuple(dense_like(t) for t in (q, k, v, go)),
    )

    def setup_forward(ctx, inputs, output):
        q, k, v, mask, ctx.causal, ctx.scale = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(q, k, v, mask, *output)

    def backward_of_forward(ctx, grad_out, _grad_lse):
        q, k, v, mask, out, lse = ctx.saved_tensors
        return (*bwd(q, k, v, mask, out, lse, grad_out, ctx.causal, ctx.scale), None, None, None)

    def setup_backward(ctx, inputs, output):
        q, k, v, mask, _out, lse, grad_out, ctx.causal, ctx.scale = inputs
        ctx.save_for_backward(q, k, v, mask, lse, grad_out)

    def backward_of_backward(ctx, gq, gk, gv):
        q, k, v, mask, lse, grad_out = ctx.saved_tensors
        d_q, d_k, d_v, d_go = dbl(q, k, v, mask, lse, grad_out, gq, gk, gv, ctx.causal, ctx.scale)
        # out and lse are functions of q, k, v whose derivatives d_q, d_k, d_v already include
        return d_q, d_k, d_v, None, None, None, d_go, None, None

    fwd.register_autograd(backward_of_forward, setup_context=setup_forward)
    bwd.register_autograd(backward_of_backward, setup_context=setup_backward)
    return fwd


_attention_triton = _build()


def _self_check_cases(device, dtype):
    """Odd lengths (tiles cut at 17 queries and 23 keys), a head dimension padded to a power of two
    (40), an additive mask broadcast over the batch with a fully masked row, and causal attention."""
    q, k, v = (
        random_tensor(shape, device, dtype, seed)
        for shape, seed in (((2, 2, 17, 40), 21), ((2, 2, 23, 40), 22), ((2, 2, 23, 40), 23))
    )
    mask = random_tensor((2, 1, 17, 23), device, dtype, 24)
    mask[:, :, 5] = float("-inf")
    yield SelfCheckCase(
        lambda b: lambda q, k, v: attention(q, k, v, mask, backend=b),
        lambda q, k, v: attention_reference(q, k, v, mask),
        [q, k, v],
    )
    yield SelfCheckCase(
        lambda b: lambda q, k: attention(q, k, k, is_causal=True, backend=b),
        lambda q, k: attention_reference(q, k, k, is_causal=True),
        [q, q],
    )


SPEC = register(
    FusedOp(
        name="attention",
        # sums of products over the head dimension and the keys, in float32 in both; half precision
        # rounds the output and each gradient once to the storage dtype
        tolerances={
            torch.float32: Tolerance(1e-4, 1e-4),
            torch.float64: Tolerance(1e-10, 1e-10),
            torch.float16: Tolerance(2e-3, 2e-3),
            torch.bfloat16: Tolerance(2e-2, 2e-2),
        },
        self_check_cases=_self_check_cases,
        fused_backends=("triton",),
    )
)
