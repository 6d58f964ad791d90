"""Helpers shared by the Triton launchers."""

from __future__ import annotations

import torch
import triton.language as tl


def compute_type(dtype: torch.dtype):
    """The Triton type the kernels compute in: float64 for float64 storage, float32 otherwise
    (half-precision values are widened on load and rounded once on store)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def row_block(n: int, cap: int = 4096) -> int:
    """Columns a row program handles per iteration: the whole row up to ``cap``, then ``cap``-wide
    blocks in a loop (any row width runs; registers stay bounded)."""
    import triton

    return min(cap, max(16, triton.next_power_of_2(max(n, 1))))


def warps(block: int) -> int:
    # about 8 elements per thread for a block of one row
    return max(1, min(16, block // 256))
