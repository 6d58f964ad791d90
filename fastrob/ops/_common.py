"""Helpers shared by the fused ops: argument checks, memory layout, and the glue to fastrob._C."""

from __future__ import annotations

import math
from numbers import Real

import torch

# dtype numbering shared with csrc/launchers.h (enum DType)
_CUDA_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(name: str, t, *, min_dim: int = 1) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {dtype_name(t.dtype)}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions (batch first), got shape {tuple(t.shape)}")
    return t


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``t`` must match ``ref`` in shape, dtype and device."""
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({dtype_name(ref.dtype)}), got {dtype_name(t.dtype)}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def check_float(name: str, value, *, min_value: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if min_value is not None and value < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value}")
    return value


def per_sample_value(name: str, value, batch: int, device: torch.device, *, min_value: float = 0.0,
                     dtype: torch.dtype = torch.float32):
    """A float, or a per-sample tensor of shape [batch] (``dtype`` on ``device``) after checking it.

    A 0-dim tensor counts as a float. Checking a CUDA tensor's values costs one synchronisation;
    hot loops (the attacks) check once and then call the ops' unchecked entry points.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return check_float(name, value.item(), min_value=min_value)
        if value.shape != (batch,):
            raise ValueError(f"{name} must be a number or a tensor of shape [batch] = ({batch},), "
                             f"got shape {tuple(value.shape)}")
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must hold real numbers, got dtype {dtype_name(value.dtype)}")
        value = value.detach().to(device=device, dtype=dtype)
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} must be finite, got a non-finite entry")
        if bool((value < min_value).any()):
            raise ValueError(f"{name} must be >= {min_value}, got minimum {value.min().item()}")
        return value.contiguous()
    return check_float(name, value, min_value=min_value)


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
