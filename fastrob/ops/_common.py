"""Helpers shared by the fused ops: memory layout and the glue to fastrob._C."""

from __future__ import annotations

import torch

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
