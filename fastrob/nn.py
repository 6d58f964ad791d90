"""Modules built on the fused ops and the functions that put them into an existing model, so that
its double backprop runs through the fused first- and second-derivative kernels.

Modules: ``BiasAct`` and ``BatchNorm2d`` (``fastrob._fused_modules``); ``LayerNorm``,
``LayerNorm2d``, ``BatchNormAct2d`` and ``BatchNormDropAct2d`` (``fastrob._norm_modules``).
Functions: ``patch_model`` (everything it recognises), and ``swap_activations``,
``swap_batch_norm`` and ``swap_layer_norm``, the same engine (``fastrob.patching``) limited to
their kinds of module."""

from __future__ import annotations

from torch import nn

from fastrob import _backend
from fastrob._fused_modules import BatchNorm2d, BiasAct
from fastrob._norm_modules import BatchNormAct2d, BatchNormDropAct2d, LayerNorm, LayerNorm2d
from fastrob.ops.bias_act import ACTIVATIONS
from fastrob.patching import activation_kinds, patch

__all__ = [
    "BatchNorm2d",
    "BatchNormAct2d",
    "BatchNormDropAct2d",
    "BiasAct",
    "LayerNorm",
    "LayerNorm2d",
    "patch_model",
    "swap_activations",
    "swap_batch_norm",
    "swap_layer_norm",
]


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def swap_activations(model: nn.Module, act: str | None = None, *, backend: str = "auto") -> nn.Module:
    """Replaces, in place, every activation module of ``model`` that has a fused op (nn.ReLU,
    nn.Softplus, nn.GELU in both its erf and tanh forms, nn.SiLU, nn.Sigmoid, nn.Hardswish, and
    modules computing one of them, as ``patch_model`` recognises them) by a ``BiasAct`` computing
    the same function. With ``act``, every ReLU, Softplus, GELU (erf form) and SiLU computes ``act``
    instead (e.g. "softplus" or "half_huber" to give a ReLU network a non-zero second derivative
    for gradient penalties). Activations called functionally inside ``forward`` are not modules
    and stay as they are. Returns ``model``, or the new module when ``model`` itself is an
    activation."""
    _check_model(model)
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"act must be None or one of {tuple(ACTIVATIONS)}, got {act!r}")
    _backend.check_backend_name(backend)
    return patch(model, act, False, backend, kinds=activation_kinds())[0]


def swap_batch_norm(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Replaces, in place, every ``torch.nn.BatchNorm2d`` of ``model`` (exactly that class: not
    SyncBatchNorm, a subclass that may compute something else, nor an already fused one) by a
    ``fastrob.nn.BatchNorm2d`` with the same settings, parameters and buffers (the same tensors:
    optimizers and state_dict keys are unaffected) and hooks. Returns ``model``, or the new module
    when ``model`` itself is an ``nn.BatchNorm2d``."""
    _check_model(model)
    _backend.check_backend_name(backend)
    return patch(model, None, True, backend, kinds=("batch_norm",))[0]


def swap_layer_norm(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Replaces, in place, every ``torch.nn.LayerNorm`` (exactly that class: a subclass may compute
    something else) of one normalised dimension by a ``fastrob.nn.LayerNorm`` sharing its
    parameters and hooks. Returns ``model``, or the new module when ``model`` is such a LayerNorm."""
    _check_model(model)
    _backend.check_backend_name(backend)
    return patch(model, None, False, backend, kinds=("layer_norm",))[0]


def patch_model(
    model: nn.Module,
    act: str | None = None,
    batch_norm: bool = True,
    *,
    backend: str = "auto",
    return_report: bool = False,
    verbose: bool = False,
):
    """Puts ``model``'s activations and BatchNorm layers on the fused ops, in place, so that double
    backprop through them runs through the fused first- and second-derivative kernels.

    Modules are recognised by what they compute (``fastrob.patching``): torch's classes and their
    subclasses that keep torch's forward, activations that are not torch's classes (found by a
    probe), BatchNorm + activation modules (timm's ``BatchNormAct2d``). ``act`` replaces every
    ReLU, Softplus, GELU and SiLU by that activation instead (e.g. "softplus" to give a ReLU network
    a non-zero second derivative); ``batch_norm=False`` leaves BatchNorm alone.

    Returns ``model`` (the new module when ``model`` itself is swapped), or ``(model, report)``
    with ``return_report``: a ``fastrob.patching.PatchReport`` of every module swapped and every
    module left, with the reason; ``verbose`` prints it. When nothing is swapped it warns (once per
    process) with the report. Functional calls inside ``forward`` and custom autograd Functions are
    out of its reach.
    """
    _check_model(model)
    if not isinstance(batch_norm, bool):
        raise TypeError(f"batch_norm must be a bool, got {type(batch_norm).__name__}")
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"act must be None or one of {tuple(ACTIVATIONS)}, got {act!r}")
    _backend.check_backend_name(backend)
    model, report = patch(model, act, batch_norm, backend)
    if verbose:
        print(report)
    return (model, report) if return_report else model
