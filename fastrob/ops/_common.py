"""Helpers shared by the fused ops: memory layout and the glue to fastrob._C."""

from __future__ import annotations

import torch

from fastrob import _backend

# dtype numbering shared with csrc/launchers.h (enum DType)
_CUDA_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def per_sample_view(value, like: torch.Tensor):
    """A float as is; a per-sample [B] tensor as [B, 1, ..., 1] in ``like``'s dtype, to broadcast
    over each sample's elements."""
    if isinstance(value, torch.Tensor):
        return value.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))
    return value


def batch_outermost_dense(t: torch.Tensor) -> bool:
    """True if each sample's elements form one contiguous block, in a layout shared by
    ``torch.empty_like(t)``: contiguous or channels_last(_3d) tensors."""
    if t.is_contiguous():
        return True
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return True
    return t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)


def same_layout(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors in one memory layout that kernels can treat as flat arrays with the batch
    outermost: the first tensor's if it has such a layout, else contiguous. Copies only those
    whose strides differ."""
    first = tensors[0] if batch_outermost_dense(tensors[0]) else tensors[0].contiguous()
    order = _memory_order(first)
    return [first] + [t if _memory_order(t) == order else torch.empty_like(first).copy_(t) for t in tensors[1:]]


def _memory_order(t: torch.Tensor) -> tuple:
    # Strides of size-1 dimensions are arbitrary (a [B, 1, H, W] tensor is both contiguous and
    # channels_last), so they do not make two layouts differ.
    return tuple(s for s, n in zip(t.stride(), t.shape) if n > 1)


def cuda_launch_context(t: torch.Tensor):
    """(device index, raw stream handle) for launching fastrob._C kernels on ``t``'s device."""
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(index).cuda_stream


def cuda_dtype_code(dtype: torch.dtype) -> int:
    return _CUDA_DTYPE_CODES[dtype]


# ---- dispatch and launch glue of the differentiable fused ops (sqnorm, cross_entropy, bias_act) ----

# The Triton kernels of the differentiable ops also run in float64 (arithmetic in float64), so that
# gradcheck/gradgradcheck can test them through the interpreter; the CUDA kernels do not.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class NoKernelsForBackend(RuntimeError, ValueError):
    """An explicit backend the op has no kernels for: unavailable, as any backend that cannot run
    (RuntimeError), and a bad value of the ``backend`` argument (ValueError)."""


def resolve_backend(backend: str, t: torch.Tensor, *, op: str, fused: tuple = ("cuda", "triton")) -> str:
    """``_backend.resolve`` for an op whose Triton kernels accept float64 as well; ``fused`` names the
    fused backends the op has kernels for (its ``SPEC.fused_backends``): ``auto`` considers only
    those, and an explicit other one is refused."""
    if backend in ("cuda", "triton") and backend not in fused:
        others = ", ".join(repr(b) for b in (*fused, "torch", "auto"))
        raise NoKernelsForBackend(
            f"{op}: backend={backend!r} is not available for this op (it has {', '.join(fused)} kernels only); "
            f"use backend={others}"
        )
    dtypes = TRITON_DTYPES if backend == "triton" else _backend.KERNEL_DTYPES
    return _backend.resolve(backend, t.device, t.dtype, op=op, dtypes=dtypes, fused=fused)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions accumulate (and per-row results are returned) in: float64 for float64,
    float32 otherwise (sums of half-precision squares and exponentials overflow or lose too much)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ptr(t) -> int:
    """The device pointer of an optional tensor (0 for None), for fastrob._C."""
    return 0 if t is None else t.data_ptr()


def cuda_launch(name: str, like: torch.Tensor, *args) -> None:
    """Calls fastrob._C.<name>(*args, dtype code, device, stream) for tensors like ``like``.

    The launchers take pointers and sizes first and the storage dtype, device index and stream
    last, so every op's Python side forwards them the same way."""
    device, stream = cuda_launch_context(like)
    getattr(_backend.extension(), name)(*args, cuda_dtype_code(like.dtype), device, stream)


def define_op(name: str, fn, fake, *, device_types=None):
    """Registers ``fn`` as the custom op ``fastrob::<name>`` with its fake (meta) implementation.

    The differentiable ops are built per backend by factories, so they are registered through this
    call rather than the decorator form pgd_step uses."""
    op = torch.library.custom_op(f"fastrob::{name}", fn, mutates_args=(), device_types=device_types)
    op.register_fake(fake)
    return op


def launch(backend: str, triton_kernel, cuda_kernel: str, tensors, sizes=(), scalars=()) -> None:
    """Runs one kernel of an op on a fused backend.

    triton: ``triton_kernel()(*tensors, *scalars)``, ``triton_kernel`` returning the function of
            fastrob/triton/<op>.py (sizes come from the shapes; triton is imported only when a Triton
            kernel runs);
    cuda:   ``fastrob._C.<cuda_kernel>(*pointers, *sizes, *scalars, dtype, device, stream)``, the
            storage dtype being that of ``tensors[0]``. ``None`` tensors become null pointers.
    Both are named <op>_<pass> (sqnorm_forward, ...), the same on either backend."""
    if backend == "triton":
        from fastrob.triton._common import on_device_of

        with on_device_of(tensors[0]):
            triton_kernel()(*tensors, *scalars)
    elif backend == "cuda":
        cuda_launch(cuda_kernel, tensors[0], *(ptr(t) for t in tensors), *sizes, *scalars)
    else:
        raise ValueError(f"no fused kernels for backend {backend!r}")


def dense_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor of ``t``'s shape, dtype and device (``t`` may be an
    expanded gradient, e.g. that of a mean, whose empty_like would keep zero strides)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)
