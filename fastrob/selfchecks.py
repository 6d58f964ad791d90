"""The self-checks of the fused kernels: each op on small random inputs of one dtype, on one fused
backend, against its torch reference in value and first and second derivatives (pgd_step, an update
rule that is not differentiated, in value). The cases and tolerances are the op's own, declared in
its ``SPEC`` (a ``FusedOp``, fastrob/ops/_registry.py) and shared with its tests.

``run_check(op, backend, device, dtype)`` returns a ``CheckResult``; fastrob.verify decides from it
whether ``backend="auto"`` may use the kernel, and ``fastrob check`` prints and records them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastrob import ops  # noqa: F401  (imports every op, which registers itself)
from fastrob._checks import dtype_name
from fastrob.ops._registry import fused_op, fused_op_names

# the registered fused ops (fastrob/ops/_registry.py), each with its cases and tolerances
OPS = fused_op_names()


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


def _values(fn, inputs):
    return [fn(*inputs)]


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


def run_check(op: str, backend: str, device, dtype: torch.dtype) -> CheckResult:
    """The self-check of ``op`` on ``backend`` for tensors of ``device`` and ``dtype``; never raises
    for a failing kernel (the exception's text is in the result)."""
    device = torch.device(device)
    spec = fused_op(op)
    atol, rtol = spec.tolerances[dtype]
    compared = _flat_derivatives if spec.differentiable else _values
    max_error, ratio = 0.0, 0.0
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for case in spec.self_check_cases(device, dtype):
                got, expected = compared(case.fused(backend), case.inputs), compared(case.reference, case.inputs)
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
