"""The self-checks of the fused kernels: each op on small random inputs of one dtype, on one fused
backend, against its torch reference in value and first and second derivatives (pgd_step, an update
rule that is not differentiated, in value), with the tolerances of the tests' GPU checks.

``run_check(op, backend, device, dtype)`` returns a ``CheckResult``; fastrob.verify decides from it
whether ``backend="auto"`` may use the kernel, and ``fastrob check`` prints and records them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# (atol, rtol) per op and dtype: those of the tests' GPU comparisons (tests/test_<op>.py), so that a
# kernel passing ``fastrob check`` passes the ``-m cuda`` tests' accuracy bar and vice versa.
_HALF = {torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}
TOLERANCES = {
    "sqnorm": {torch.float32: (1e-4, 1e-4), torch.float64: (1e-7, 1e-7), **_HALF},
    "cross_entropy": {torch.float32: (1e-4, 1e-4), torch.float64: (1e-7, 1e-7), **_HALF},
    "bias_act": {
        torch.float32: (1e-4, 1e-4),
        torch.float64: (1e-10, 1e-10),
        torch.float16: (2e-3, 2e-3),
        torch.bfloat16: (2e-2, 2e-2),
    },
    "batch_norm": {
        torch.float32: (1e-4, 1e-4),
        torch.float64: (1e-10, 1e-10),
        torch.float16: (5e-3, 5e-3),
        torch.bfloat16: (5e-2, 5e-2),
    },
    # one rounding of the storage dtype (both sides compute in float32 and round once)
    "pgd_step": {
        torch.float32: (1e-5, 1e-5),
        torch.float64: (1e-12, 1e-12),
        torch.float16: (1e-3, 1e-3),
        torch.bfloat16: (8e-3, 8e-3),
    },
}
OPS = tuple(TOLERANCES)


@dataclass(frozen=True)
class CheckResult:
    """One self-check. ``max_error`` is the largest |fused - reference| over every compared tensor,
    ``ratio`` the largest |fused - reference| / (atol + rtol |reference|): the check passes when every
    value is finite where the reference is and ratio <= 1. ``error`` holds the exception text when the
    kernel raised (then max_error and ratio are nan)."""

    op: str
    backend: str
    device: str
    dtype: str
    max_error: float
    ratio: float
    passed: bool
    error: str = ""

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else ("error" if self.error else "MISMATCH")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _randn(shape, device, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)


def derivatives(fn, inputs, seed=0):
    """(output, first derivatives, second derivatives) of fn at ``inputs`` (also what the op tests
    compare).

    The first derivatives are vector-Jacobian products with a random cotangent u, which itself
    requires grad; the second are the VJPs of those with random w, with respect to the inputs and
    u (so the backward op's derivative in its incoming gradient is checked too). Inputs that are
    not floating point (labels) are passed through."""
    gen = torch.Generator().manual_seed(seed)
    leaves = [t.detach().clone().requires_grad_(True) if t.is_floating_point() else t for t in inputs]
    diff = [t for t in leaves if t.is_floating_point()]
    out = fn(*leaves)
    u = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out).requires_grad_(True)
    first = torch.autograd.grad(out, diff, u, create_graph=True)
    ws = [torch.randn(f.shape, generator=gen, dtype=torch.float64).to(f) for f in first]
    second = torch.autograd.grad(first, diff + [u], ws, allow_unused=True)
    second = [torch.zeros_like(t) if s is None else s for s, t in zip(second, diff + [u])]
    return out, first, second


def _flat_derivatives(fn, inputs):
    out, first, second = derivatives(fn, inputs)
    return [out, *first, *second]


def _compare(fused: list, reference: list, atol: float, rtol: float) -> tuple[float, float]:
    max_error, ratio = 0.0, 0.0
    for a, b in zip(fused, reference, strict=True):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        if a.shape != b.shape or not torch.equal(torch.isfinite(a), torch.isfinite(b)):
            return math.inf, math.inf
        finite = torch.isfinite(b)
        if not torch.equal(a[~finite], b[~finite]):  # the same infinities where the reference has them
            return math.inf, math.inf
        diff = (a[finite] - b[finite]).abs()
        if diff.numel():
            max_error = max(max_error, diff.max().item())
            ratio = max(ratio, (diff / (atol + rtol * b[finite].abs())).max().item())
    return max_error, ratio


def _differentiable_cases(op: str, device, dtype):
    """(fused(backend), reference, inputs) triples of one differentiable op."""
    from fastrob import ops

    if op == "sqnorm":
        g = _randn((3, 37), device, dtype, 1)
        yield (lambda b: lambda t: ops.sqnorm(t, backend=b)), ops.sqnorm_reference, [g]
    elif op == "cross_entropy":
        z = _randn((4, 37), device, dtype, 2, scale=3.0)
        y = torch.tensor([0, 5, 36, 17], device=device)
        yield (
            (lambda b: lambda t, y: ops.cross_entropy(t, y, "mean", 0.1, backend=b)),
            lambda t, y: ops.cross_entropy_reference(t, y, "mean", 0.1),
            [z, y],
        )
    elif op == "bias_act":
        x, bias = _randn((2, 3, 5), device, dtype, 3), _randn((3,), device, dtype, 4)
        for act in ("relu", "gelu"):
            yield (
                (lambda b, act=act: lambda t, c: ops.bias_act(t, c, act, backend=b)),
                lambda t, c, act=act: ops.bias_act_reference(t, c, act),
                [x, bias],
            )
    elif op == "batch_norm":
        w, bias = 1.0 + 0.1 * _randn((3,), device, dtype, 6), _randn((3,), device, dtype, 7)
        for memory_format in (torch.contiguous_format, torch.channels_last):
            x = _randn((4, 3, 5, 5), device, dtype, 5, scale=2.0).contiguous(memory_format=memory_format)
            yield (
                (lambda b: lambda t, w, c: ops.batch_norm(t, w, c, None, None, True, backend=b)),
                lambda t, w, c: ops.batch_norm_reference(t, w, c, None, None, True),
                [x, w, bias],
            )
    else:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")


def _pgd_step_cases(device, dtype):
    """(fused(backend), reference) pairs: Linf with per-sample eps, L2 in one program per sample (one
    sample with a tiny gradient, whose step needs its norm's clamp to be a normal float) and L2 in
    two passes (samples of more than 16384 elements, 8192 on Triton)."""
    from fastrob import ops

    def case(shape, norm, seed, grad_scale=None):
        x_orig = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        x_adv = (x_orig + 0.02 * _randn(shape, "cpu", torch.float64, seed + 1)).clamp(0, 1)
        grad = _randn(shape, "cpu", torch.float64, seed + 2)
        if grad_scale is not None:
            grad = grad * grad_scale.view(-1, *([1] * (len(shape) - 1)))
        x_orig, x_adv, grad = (t.to(device=device, dtype=dtype) for t in (x_orig, x_adv, grad))
        eps = torch.linspace(0.01, 0.5, shape[0], device=device)
        kw = dict(alpha=0.05, eps=eps, norm=norm)
        return (
            lambda b: ops.pgd_step(x_adv, grad, x_orig, **kw, backend=b),
            lambda: ops.pgd_step_reference(x_adv, grad, x_orig, **kw),
        )

    yield case((3, 2, 4, 4), "linf", 10)
    tiny = torch.tensor([1.0, 1e-18, 3.0], dtype=torch.float64)
    yield case((3, 3, 5, 5), "l2", 20, tiny)
    yield case((2, 16400), "l2", 30)


def run_check(op: str, backend: str, device, dtype: torch.dtype) -> CheckResult:
    """The self-check of ``op`` on ``backend`` for tensors of ``device`` and ``dtype``; never raises
    for a failing kernel (the exception's text is in the result)."""
    device = torch.device(device)
    if op not in TOLERANCES:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    atol, rtol = TOLERANCES[op][dtype]
    max_error, ratio = 0.0, 0.0
    try:
        with torch.inference_mode(False), torch.enable_grad():
            if op == "pgd_step":
                pairs = [([fused(backend)], [reference()]) for fused, reference in _pgd_step_cases(device, dtype)]
            else:
                pairs = [
                    (_flat_derivatives(fused(backend), inputs), _flat_derivatives(reference, inputs))
                    for fused, reference, inputs in _differentiable_cases(op, device, dtype)
                ]
            for got, expected in pairs:
                err, r = _compare(got, expected, atol, rtol)
                max_error, ratio = max(max_error, err), max(ratio, r)
    except Exception as err:  # noqa: BLE001  (any failure of a kernel means: do not use it)
        return CheckResult(
            op,
            backend,
            str(device),
            dtype_name(dtype),
            math.nan,
            math.nan,
            False,
            f"{type(err).__name__}: {err}".splitlines()[0][:300],
        )
    return CheckResult(op, backend, str(device), dtype_name(dtype), max_error, ratio, ratio <= 1.0)
