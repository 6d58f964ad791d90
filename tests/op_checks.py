"""Checks shared by the tests of the differentiable fused ops (sqnorm, cross_entropy, bias_act):
value, first and second derivatives of a fused call against the reference."""

import torch

from fastrob import _backend


def triton_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def triton_runs_here() -> bool:
    return torch.cuda.is_available() or _backend.triton_interpreter()


def derivatives(fn, inputs, seed=0):
    """(output, first derivatives, second derivatives) of fn at ``inputs``.

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


def assert_derivatives_close(fused, reference, inputs, **tol):
    """fused and reference agree in value, first and second derivatives (``tol`` as for
    torch.testing.assert_close, applied after casting to float64)."""
    for name, a, b in zip(("value", "first", "second"), derivatives(fused, inputs), derivatives(reference, inputs)):
        a, b = ([a], [b]) if isinstance(a, torch.Tensor) else (a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            torch.testing.assert_close(x.double(), y.double(), **tol, msg=lambda m: f"{name} derivative {i}: {m}")
