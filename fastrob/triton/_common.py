"""Helpers shared by the Triton launchers."""

from __future__ import annotations

import contextlib

import torch
import triton.language as tl


def on_device_of(t: torch.Tensor):
    """A context that makes ``t``'s CUDA device current for a Triton launch: Triton launches on the
    current device, so a tensor on cuda:1 while cuda:0 is current would fault. No-op on CPU tensors
    (the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


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
