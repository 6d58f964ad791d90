"""Argument checks shared by the whole package: each raises TypeError or ValueError naming the
argument and what was expected (docs/design.md#conventions)."""

from __future__ import annotations

import contextlib
import math
from numbers import Integral, Real

import torch

from fastrob.model_output import describe_output


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
        raise TypeError(
            f"{name} must have the dtype of {ref_name} ({dtype_name(ref.dtype)}), got {dtype_name(t.dtype)}"
        )
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


def per_sample_value(
    name: str, value, batch: int, device: torch.device, *, min_value: float = 0.0, dtype: torch.dtype = torch.float32
):
    """A float, or a per-sample tensor of shape [batch] (``dtype`` on ``device``) after checking it.

    A 0-dim tensor counts as a float. Checking a CUDA tensor's values costs one synchronisation;
    hot loops (the attacks) check once and then call the ops' unchecked entry points.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return check_float(name, value.item(), min_value=min_value)
        if value.shape != (batch,):
            raise ValueError(
                f"{name} must be a number or a tensor of shape [batch] = ({batch},), got shape {tuple(value.shape)}"
            )
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must hold real numbers, got dtype {dtype_name(value.dtype)}")
        value = value.detach().to(device=device, dtype=dtype)
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} must be finite, got a non-finite entry")
        if bool((value < min_value).any()):
            raise ValueError(f"{name} must be >= {min_value}, got minimum {value.min().item()}")
        return value.contiguous()
    return check_float(name, value, min_value=min_value)


def check_positive(name: str, value) -> float:
    """A finite real number > 0 (a step, a rate, a width), as a float."""
    value = check_float(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_int(name: str, value, min_value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value}")
    return int(value)


def check_generator(generator, device: torch.device, name: str = "generator") -> None:
    """None, or a torch.Generator on ``device``'s type (torch draws on the generator's device:
    a CPU generator cannot fill CUDA tensors)."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != torch.device(device).type:
        raise ValueError(
            f"{name} must be on the inputs' device type {torch.device(device).type!r}, got a generator "
            f"on {generator.device} (e.g. torch.Generator(device=x.device))"
        )


def check_device(value, name: str = "device") -> torch.device:
    """A device that computes here: a torch device name or torch.device, not meta, and for cuda a GPU
    that is visible. The one check behind the command line's --device and the attacks' set_device."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}: not a torch device: {value!r} (try cpu or cuda)") from None
    if device.type == "meta":
        raise ValueError(f"{name}: meta holds no values: choose a device that computes (cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: cuda was asked for but no GPU is visible")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{name}: {value}: only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def check_model(model) -> None:
    if not callable(model):
        raise TypeError(f"model must be callable (an nn.Module), got {type(model).__name__}")


def check_labels(y, batch: int) -> torch.Tensor:
    """y as int64 class indices of shape [batch] (the range is checked against the logits)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"y must hold integer class indices, got dtype {dtype_name(y.dtype)}")
    if y.shape != (batch,):
        raise ValueError(f"y must have shape [batch] = ({batch},), got {tuple(y.shape)}")
    return y.long()


def check_logits(logits, batch: int, y: torch.Tensor | None = None, where: str | None = None) -> None:
    """The model's output must be finite [batch, C] logits, and every label in y must be < C.

    A NaN logit has no argmax that means anything (torch's is the NaN's position), so a metric that
    decided on it would count an undefined answer; ``where`` names the inputs in the error, e.g.
    "clean inputs" or "adversarial inputs". The finiteness and label checks are one device
    synchronisation each: loops check once per batch. An output that is not a tensor (a tuple, a
    dict, an output object) is a TypeError that says how to pick the logits (``fastrob.logits_of``)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"model must return a logits tensor of shape [batch, classes] = ({batch}, C), got a "
            f"{describe_output(logits)}"
        )
    if logits.dim() != 2 or logits.shape[0] != batch:
        raise ValueError(
            f"model must return logits of shape [batch, classes] = ({batch}, C), got {tuple(logits.shape)}"
        )
    if logits.device.type != "meta" and logits.numel():
        bad = ~torch.isfinite(logits).all(1)
        n_bad = int(bad.sum())
        if n_bad:
            rows = bad.nonzero().squeeze(1)[:8].tolist()
            raise ValueError(
                f"model returned non-finite logits (NaN or inf) for {n_bad} of {batch} samples"
                f"{f' ({where})' if where else ''}: no prediction can be read from them "
                f"(samples {rows}{' ...' if n_bad > 8 else ''})"
            )
    if y is not None and y.numel():
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= logits.shape[1]:
            raise ValueError(
                f"y must hold labels in [0, {logits.shape[1]}) for a model with {logits.shape[1]} "
                f"outputs, got values in [{low}, {high}]"
            )


def check_finite(name: str, t: torch.Tensor) -> None:
    """Every entry of ``t`` finite: one NaN pixel would make a loss, and then every parameter, NaN."""
    if t.numel() and not bool(torch.isfinite(t).all()):
        n_bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {n_bad} non-finite value(s) (NaN or inf)")


def model_dtype_device(model) -> tuple[torch.dtype | None, torch.device | None]:
    """The dtype and device of the model's first floating-point parameter (or buffer); (None, None)
    for a model without any (a plain function)."""
    if isinstance(model, torch.nn.Module):
        for t in (*model.parameters(), *model.buffers()):
            if t.is_floating_point():
                return t.dtype, t.device
    return None, None


def check_model_input(model, x: torch.Tensor, allow_autocast: bool = True) -> None:
    """x fits the model: not on the meta device (it holds no values), the model's parameters
    neither, and x of the parameters' dtype, unless autocast chooses the dtypes (``allow_autocast``;
    the attacks pass False: their own bf16 autocast runs a float32 model on float32 inputs). Without
    this the errors are torch's ("mat1 and mat2 must have the same dtype", "Tensor.item() on meta
    tensors")."""
    if x.device.type == "meta":
        raise ValueError("x is on the meta device (it holds no values): move it to a real device first")
    dtype, device = model_dtype_device(model)
    if device is not None and device.type == "meta":
        raise ValueError(
            "the model's parameters are on the meta device (no values): load or move them to a real "
            "device (e.g. model.to_empty(device=...) and load_state_dict) first"
        )
    autocast = allow_autocast and torch.is_autocast_enabled(x.device.type)
    if dtype is not None and x.dtype != dtype and not autocast:
        raise TypeError(
            f"x has dtype {dtype_name(x.dtype)} but the model's parameters are {dtype_name(dtype)}: "
            f"convert one of them (e.g. x.to({str(dtype)}))"
        )


@contextlib.contextmanager
def eval_mode(model):
    """Runs the block with ``model`` in eval mode and restores each module's own ``training`` flag
    afterwards (also after an exception): ``model.train(flag)`` would reset a BatchNorm the user
    had put in eval mode inside a training model. A non-Module callable is left alone."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode
