"""fastrob.ops.attention: the reference against torch's math attention, the Triton kernels' value and
first and second derivatives against the reference (odd lengths, head dims 32/64/80, bool and
additive masks, causal, broadcast batch dimensions, fully masked rows), float64
gradcheck/gradgradcheck, opcheck and errors."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from op_checks import assert_derivatives_close, triton_device, triton_runs_here
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastrob.ops import attention, attention_reference
from fastrob.ops.attention import SPEC

needs_triton = pytest.mark.skipif(not triton_runs_here(), reason="triton cannot run here")


def qkv(shape_q, n_k=None, dtype=torch.float64, device="cpu", seed=0, d_v=None):
    g = torch.Generator().manual_seed(seed)
    *lead, n_q, d = shape_q
    n_k = n_q if n_k is None else n_k

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    return rand(*lead, n_q, d), rand(*lead, n_k, d), rand(*lead, n_k, d_v or d)


def masks(n_q, n_k, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(9)
    boolean = torch.rand(n_q, n_k, generator=g) > 0.4
    boolean[2] = False  # a row with every key masked
    additive = torch.randn(2, 1, n_q, n_k, generator=g, dtype=torch.float64)
    additive[0, 0, :, 3] = float("-inf")
    padding = torch.ones(2, 1, 1, n_k, dtype=torch.bool)
    padding[1, ..., n_k // 2 :] = False  # key padding of the second sample
    return {
        "bool": boolean.to(device),
        "additive": additive.to(device=device, dtype=dtype),
        "padding": padding.to(device),
    }


@pytest.mark.parametrize("kind", ["none", "causal", "bool", "additive", "padding", "scale"])
def test_reference_is_torch_math_attention(kind):
    q, k, v = qkv((2, 3, 9, 8), n_k=11 if kind != "causal" else 9)
    kw = {"causal": dict(is_causal=True), "scale": dict(scale=0.3), "none": {}}.get(kind)
    kw = kw if kw is not None else dict(attn_mask=masks(9, 11)[kind])
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, k, v, **kw)
    torch.testing.assert_close(attention_reference(q, k, v, **kw), expected, **SPEC.tolerance(torch.float64))
    torch.testing.assert_close(attention(q, k, v, **kw, backend="torch"), expected, **SPEC.tolerance(torch.float64))


def test_fully_masked_row_is_zero_with_finite_gradients():
    q, k, v = (t.requires_grad_(True) for t in qkv((1, 1, 4, 8)))
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[1] = False
    out = attention_reference(q, k, v, mask)
    assert torch.equal(out[0, 0, 1], torch.zeros(8, dtype=out.dtype))
    (gq,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    assert torch.isfinite(gq).all() and torch.equal(gq[0, 0, 1], torch.zeros(8, dtype=gq.dtype))
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(gq.pow(2).sum(), (q, k, v)))


CASES = {
    "17x17_d32_heads3": dict(shape=(2, 3, 17, 32)),
    "65x40_d80": dict(shape=(1, 2, 65, 80), n_k=40),
    "causal_17_d64": dict(shape=(2, 2, 17, 64), is_causal=True),
    "causal_20x33_d16": dict(shape=(1, 1, 20, 16), n_k=33, is_causal=True),
    "bool_mask_dead_row": dict(shape=(2, 2, 17, 32), mask="bool"),
    "additive_mask_broadcast": dict(shape=(2, 2, 17, 32), mask="additive"),
    "key_padding": dict(shape=(2, 2, 17, 32), mask="padding"),
    "three_dims_d5": dict(shape=(3, 17, 5)),
}
SLOW = {"causal_20x33_d16"}


@needs_triton
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_triton_equals_reference(case):
    spec = dict(CASES[case])
    shape, n_k, mask = spec.pop("shape"), spec.pop("n_k", None), spec.pop("mask", None)
    dev = triton_device()
    q, k, v = qkv(shape, n_k, device=dev)
    if mask is not None:
        spec["attn_mask"] = masks(shape[-2], k.shape[-2], dev)[mask]
    assert_derivatives_close(
        lambda q, k, v: attention(q, k, v, **spec, backend="triton"),
        lambda q, k, v: attention_reference(q, k, v, **spec),
        [q, k, v],
        **SPEC.tolerance(torch.float64),
    )


@needs_triton
def test_triton_float32_and_leading_broadcast():
    dev = triton_device()
    q, k, v = qkv((2, 2, 33, 64), dtype=torch.float32, device=dev)
    k, v = k[:1], v[:1]  # one k, v for both samples: leading dimensions broadcast
    assert_derivatives_close(
        lambda q, k, v: attention(q, k, v, backend="triton"),
        lambda q, k, v: attention_reference(q, k, v),
        [q, k, v],
        **SPEC.tolerance(torch.float32),
    )


@needs_triton
@pytest.mark.parametrize(
    "kw",
    [
        {},
        pytest.param(dict(is_causal=True), marks=pytest.mark.slow),
        pytest.param(dict(mask=True), marks=pytest.mark.slow),
    ],
    ids=["plain", "causal", "mask"],
)
def test_gradcheck_and_gradgradcheck_float64(kw):
    dev = triton_device()
    q, k, v = (t.requires_grad_(True) for t in qkv((1, 2, 5, 4), device=dev))
    mask = torch.tensor([[1, 1, 0, 1, 0]], dtype=torch.bool, device=dev) if kw.pop("mask", False) else None

    def fn(q, k, v):
        return attention(q, k, v, mask, **kw, backend="triton")

    # fast mode (random projections of the Jacobians): each full-mode evaluation is an interpreted launch
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (q, k, v), fast_mode=True)


@needs_triton
def test_third_derivative_raises():
    q, k, v = (t.requires_grad_(True) for t in qkv((1, 1, 5, 4), device=triton_device()))
    (gq,) = torch.autograd.grad(attention(q, k, v, backend="triton").pow(2).sum(), q, create_graph=True)
    (gk,) = torch.autograd.grad(gq.pow(2).sum(), k, create_graph=True)
    with pytest.raises(RuntimeError, match="[Aa]utograd"):
        torch.autograd.grad(gk.sum(), q)


@needs_triton
@pytest.mark.parametrize("config", ["mask", pytest.param("causal", marks=pytest.mark.slow)])
def test_opcheck(config):
    dev = triton_device()
    # the custom ops take [B * H, N, d] and a [B, H, N_q, N_k] mask view (fastrob.ops.attention._fused)
    q, k, v = qkv((4, 9, 8), dtype=torch.float32, device=dev)
    mask = masks(9, 9, dev, torch.float32)["additive"].expand(2, 2, 9, 9)
    ops = torch.ops.fastrob
    for m, causal in [(mask, False)] if config == "mask" else [(None, False), (None, True)]:
        out, lse = ops.attention_triton(q, k, v, m, causal, 0.3)
        go = torch.randn_like(out)
        torch.library.opcheck(ops.attention_triton.default, (q, k, v, m, causal, 0.3))
        torch.library.opcheck(ops.attention_backward_triton.default, (q, k, v, m, out, lse, go, causal, 0.3))
        gq, gk, gv = torch.randn_like(q), torch.randn_like(k), torch.randn_like(v)
        torch.library.opcheck(ops.attention_double_backward.default, (q, k, v, m, lse, go, gq, gk, gv, causal, 0.3))


@needs_triton
def test_empty_batch():
    q, k, v = qkv((0, 2, 5, 8), device=triton_device())
    assert attention(q, k, v, backend="triton").shape == (0, 2, 5, 8)


def test_dropout_runs_the_reference_with_torchs_generator():
    q, k, v = qkv((1, 2, 6, 8))
    torch.manual_seed(3)
    got = attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    torch.testing.assert_close(got, attention_reference(q, k, v, dropout_p=0.5))
    assert not torch.equal(got, attention_reference(q, k, v))


@needs_triton
@pytest.mark.parametrize("what", ["dropout", "mask_grad", "d_v"])
def test_explicit_triton_refuses_what_its_kernels_do_not_cover(what):
    q, k, v = qkv((1, 2, 6, 8), device=triton_device(), d_v=4 if what == "d_v" else None)
    kw = {"dropout": dict(dropout_p=0.1), "d_v": {}}.get(what)
    if kw is None:
        kw = dict(attn_mask=torch.zeros(6, 6, dtype=q.dtype, device=q.device, requires_grad=True))
    with pytest.raises(ValueError, match="backend='triton' does not support"):
        attention(q, k, v, **kw, backend="triton")


def call(**overrides):
    q, k, v = qkv((1, 2, 6, 8))
    kwargs = dict(q=q, k=k, v=v)
    kwargs.update(overrides)
    return attention(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), **kwargs)


@pytest.mark.parametrize(
    "overrides, error, words",
    [
        (dict(q=[[0.0]]), TypeError, "q must be a torch.Tensor"),
        (dict(k=torch.zeros(1, 2, 6, 8, dtype=torch.int64)), TypeError, "k must be a floating-point"),
        (dict(v=torch.zeros(6)), ValueError, "v must have shape"),
        (dict(k=torch.zeros(1, 2, 6, 8)), ValueError, "k must have q's dtype"),
        (dict(k=torch.zeros(1, 2, 6, 7, dtype=torch.float64)), ValueError, "k must have q's head dimension"),
        (dict(v=torch.zeros(1, 2, 5, 8, dtype=torch.float64)), ValueError, "v must have k's number of keys"),
        (dict(attn_mask=torch.zeros(6, 6, dtype=torch.int64)), TypeError, "attn_mask must be bool or"),
        (dict(attn_mask=torch.zeros(5, 6, dtype=torch.bool)), ValueError, "attn_mask must broadcast"),
        (dict(attn_mask=torch.ones(6, 6, dtype=torch.bool), is_causal=True), ValueError, "is_causal"),
        (dict(k=torch.zeros(1, 3, 6, 8, dtype=torch.float64)), ValueError, "leading dimensions"),
        (dict(dropout_p=1.0), ValueError, "dropout_p must be in"),
        (dict(backend="cuda"), ValueError, "backend='cuda'"),
        (dict(backend="fast"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input_names_the_argument(overrides, error, words):
    with pytest.raises(error, match=words):
        call(**overrides)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n, d", [(197, 64), (257, 80), (65, 32)], ids=str)
@pytest.mark.parametrize("kind", ["plain", "causal", "additive"])
def test_gpu_triton_equals_reference(dtype, n, d, kind):
    q, k, v = qkv((4, 3, n, d), dtype=dtype, device="cuda")
    kw = {"plain": {}, "causal": dict(is_causal=True)}.get(kind)
    if kw is None:
        kw = dict(attn_mask=masks(n, n, "cuda", dtype)["additive"])
    assert_derivatives_close(
        lambda q, k, v: attention(q, k, v, **kw, backend="triton"),
        lambda q, k, v: attention_reference(q, k, v, **kw),
        [q, k, v],
        **SPEC.tolerance(dtype),
    )


@pytest.mark.cuda
def test_gpu_forward_and_backward_memory_is_linear_in_n():
    def peak(n):
        q, k, v = (t.requires_grad_(True) for t in qkv((1, 4, n, 64), dtype=torch.float32, device="cuda"))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.autograd.grad(attention(q, k, v, backend="triton").sum(), (q, k, v))
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    small, large = peak(2048), peak(8192)
    assert large < 6 * small  # an [N, N] matrix would make it 16x


@pytest.mark.slow  # the self-check runs the kernels through the interpreter (about 10 s)
@pytest.mark.skipif(torch.cuda.is_available() or not triton_runs_here(), reason="plants kernels on CPU tensors")
def test_auto_uses_the_kernels_once_their_self_check_passed(monkeypatch, tmp_path):
    from fastrob import _backend, verify

    monkeypatch.setattr(_backend, "AUTO_KERNELS_ON_CPU", True)  # CPU tensors as a GPU target
    monkeypatch.setattr(verify, "RECORD_PATH", tmp_path / "verified.json")
    monkeypatch.delenv("FASTROB_VERIFY", raising=False)
    verify.clear_cache()
    _backend.clear_auto_cache()
    try:
        q, k, v = qkv((1, 2, 9, 8), dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no failed self-check, no try of a CUDA kernel it does not have
            out = attention(q, k, v)
        assert _backend.resolve("auto", q.device, q.dtype, op="attention", kernels=SPEC.fused_backends) == "triton"
        torch.testing.assert_close(out, attention_reference(q, k, v), **SPEC.tolerance(torch.float32))
    finally:
        verify.clear_cache()
        _backend.clear_auto_cache()
