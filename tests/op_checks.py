"""Checks shared by the tests of the differentiable fused ops (sqnorm, cross_entropy, bias_act):
value, first and second derivatives of a fused call against the reference."""

import torch

from fastrob import _backend
from fastrob.selfchecks import derivatives


def triton_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def triton_runs_here() -> bool:
    return torch.cuda.is_available() or _backend.triton_interpreter()


def assert_derivatives_close(fused, reference, inputs, **tol):
    """fused and reference agree in value, first and second derivatives (``tol`` as for
    torch.testing.assert_close, applied after casting to float64)."""
    for name, a, b in zip(("value", "first", "second"), derivatives(fused, inputs), derivatives(reference, inputs)):
        a, b = ([a], [b]) if isinstance(a, torch.Tensor) else (a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            torch.testing.assert_close(x.double(), y.double(), **tol, msg=lambda m: f"{name} derivative {i}: {m}")
