"""The registry of fused ops: each ``fastrob/ops/<op>.py`` declares its facts in one ``FusedOp`` and
registers it at import (``fastrob.ops`` imports every op, so importing this module fills it).

A ``FusedOp`` holds what the rest of fastrob needs to know about an op besides its code:

- ``name``: the one key the op goes by (``_backend.resolve(op=...)``, the verification record,
  ``fastrob check``, tests/test_<name>.py);
- ``tolerances``: (atol, rtol) per dtype, the bar of the self-check and of the op's tests;
- ``self_check_cases(device, dtype)``: small seeded inputs, each with the fused call and the reference
  (fastrob.selfchecks compares them, in value and, for a differentiable op, first and second derivatives).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch


class Tolerance(NamedTuple):
    """|fused - reference| <= atol + rtol |reference|, elementwise."""

    atol: float
    rtol: float

    def kwargs(self) -> dict:
        """As keyword arguments of ``torch.testing.assert_close``."""
        return {"atol": self.atol, "rtol": self.rtol}


class SelfCheckCase(NamedTuple):
    """One self-check input: ``fused(backend)`` is a function of ``inputs`` computing the op on that
    fused backend, ``reference`` the same function on the torch reference. Inputs that are not
    floating point (labels) are passed through and not differentiated."""

    fused: Callable[[str], Callable]
    reference: Callable
    inputs: list


@dataclass(frozen=True)
class FusedOp:
    """The facts of one fused op (see the module docstring).

    ``differentiable=False`` (an update rule such as pgd_step) compares values only.
    ``fused_backends`` names the fused backends that have kernels for the op (a Triton-only op: ("triton",));
    ``auto`` picks only among them and ``fastrob check`` checks only them.
    ``large_input_tolerances`` are looser bars, per dtype, for inputs of 1e5 and more elements whose
    float32 sums the kernels and the reference add in different orders (the GPU tests' large shapes);
    a dtype not listed there uses ``tolerances``."""

    name: str
    tolerances: Mapping[torch.dtype, Tolerance]
    self_check_cases: Callable[[torch.device, torch.dtype], Iterable[SelfCheckCase]]
    differentiable: bool = True
    fused_backends: tuple[str, ...] = ("cuda", "triton")
    large_input_tolerances: Mapping[torch.dtype, Tolerance] = field(default_factory=dict)

    def tolerance(self, dtype: torch.dtype, *, large_inputs: bool = False) -> dict:
        """The bar for ``dtype`` as ``torch.testing.assert_close`` keyword arguments."""
        if large_inputs and dtype in self.large_input_tolerances:
            return self.large_input_tolerances[dtype].kwargs()
        return self.tolerances[dtype].kwargs()


_REGISTRY: dict[str, FusedOp] = {}


# The tolerances of the normalisations (batch norm, layer norm). float32: their first and second
# derivatives sum O(M) terms that cancel; 1e-4 is what separates float32 rounding (1e-6 .. 1e-5 seen)
# from a wrong term (O(1)).
NORMALISATION_TOLERANCES = {
    torch.float32: Tolerance(1e-4, 1e-4),
    torch.float64: Tolerance(1e-10, 1e-10),
    torch.float16: Tolerance(5e-3, 5e-3),
    torch.bfloat16: Tolerance(5e-2, 5e-2),
}


def register(op: FusedOp) -> FusedOp:
    """Adds ``op`` to the registry (once per name) and returns it."""
    if op.name in _REGISTRY and _REGISTRY[op.name] is not op:
        raise ValueError(f"a fused op named {op.name!r} is registered already")
    _REGISTRY[op.name] = op
    return op


def fused_op(name: str) -> FusedOp:
    """The registered op called ``name``; ValueError naming the registered ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"op must be one of {fused_op_names()}, got {name!r}") from None


def fused_op_names() -> tuple[str, ...]:
    """The names of the registered ops, sorted (whatever order they were imported in)."""
    return tuple(sorted(_REGISTRY))


def random_tensor(shape, device, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Seeded standard-normal values (times ``scale``), drawn in float64 on the CPU and then cast, so
    that a self-check sees the same inputs on every device and dtype."""
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)
