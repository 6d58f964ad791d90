"""The modules of fastrob.nn for modern normalisation layers: ``LayerNorm`` (last dimension),
``LayerNorm2d`` (the channels of [B, C, H, W], as timm's LayerNorm2d and ConvNeXt), both computed
by ``fastrob.ops.layer_norm``; and the two batch norm + activation modules:

- ``BatchNormAct2d``, for a model built from scratch: the activation is a name of
  ``fastrob.ops.bias_act`` (fused batch norm, then the fused activation);
- ``BatchNormDropAct2d``, what ``patch_model`` puts in place of timm's ``BatchNormAct2d``: the
  activation (and dropout) are child modules, as in timm, so the state_dict keys are unchanged and
  the ``act`` child is patched on its own.

They stay two classes because their state differs: an activation child may hold parameters (a
PReLU) that a name cannot. Imported into (and documented as) fastrob.nn."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastrob import _backend
from fastrob._fused_modules import BatchNorm2d, share_state
from fastrob.ops.bias_act import ACTIVATIONS, bias_act, check_act_params
from fastrob.ops.layer_norm import layer_norm


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by ``fastrob.ops.layer_norm``, whose double backward (the part
    of a gradient penalty's parameter gradient that runs through the norm) is fused on a GPU.

    A drop-in subclass with the same parameters and state_dict keys. A normalized_shape of one
    dimension runs on the fused op; a longer one (normalising over several trailing dimensions)
    runs torch's ``F.layer_norm``. ``backend``: "auto" | "torch" | "triton".
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, *, backend="auto", **kw):
        super().__init__(normalized_shape, eps, elementwise_affine, **kw)
        self.backend = _backend.check_backend_name(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"

    @classmethod
    def from_module(cls, module: nn.LayerNorm, backend: str = "auto"):
        """A module of this class with ``module``'s settings, sharing its parameter tensors and hooks."""
        new = cls(
            module.normalized_shape,
            module.eps,
            module.elementwise_affine,
            backend=backend,
            device=torch.device("meta"),
        )
        share_state(new, module)
        return new


class LayerNorm2d(LayerNorm):
    """Layer norm over the channels of [B, C, ...] at each position (timm's ``LayerNorm2d``, the
    norm of ConvNeXt): ``F.layer_norm`` of the channels-last permutation, permuted back, computed
    by ``fastrob.ops.layer_norm(..., channels_first=True)`` without the permutations. NCHW and
    channels_last inputs keep their layout.

    Args:
        num_channels: C; weight and bias have this shape.
        eps, elementwise_affine: as ``nn.LayerNorm``.
        backend: "auto" | "torch" | "triton".
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, elementwise_affine: bool = True, *, backend="auto", **kw):
        super().__init__(num_channels, eps, elementwise_affine, backend=backend, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps, channels_first=True, backend=self.backend)

    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "auto"):
        """A LayerNorm2d computing what a channels-first layer norm ``module`` (an ``nn.LayerNorm``
        subclass over C, such as timm's LayerNorm2d) computes, sharing its parameters and hooks."""
        shape = tuple(module.normalized_shape)
        if len(shape) != 1:
            raise ValueError(f"module must normalise over one (the channel) dimension, got normalized_shape {shape}")
        new = cls(shape[0], module.eps, module.elementwise_affine, backend=backend, device=torch.device("meta"))
        share_state(new, module)
        return new


class BatchNormAct2d(BatchNorm2d):
    """Batch norm followed by an activation (timm's ``BatchNormAct2d``, EfficientNet's BN + SiLU):
    ``fastrob.ops.batch_norm`` then ``fastrob.ops.bias_act`` without bias, so that both the
    normalisation's and the activation's first and second derivatives run on fused kernels on a
    GPU. A subclass of ``fastrob.nn.BatchNorm2d`` (and so of ``nn.BatchNorm2d``) with its
    parameters, buffers and state_dict keys.

    Args:
        num_features, eps, momentum, affine, track_running_stats: as ``nn.BatchNorm2d``.
        act: an activation of ``fastrob.ops.bias_act`` ("silu", "relu", "gelu", "hardswish", ...).
        beta, threshold, d: the activation's parameters (softplus, half_huber).
        backend: "auto" | "torch" | "triton" | "cuda", for both ops.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        act: str = "relu",
        *,
        beta: float = 1.0,
        threshold: float = 20.0,
        d: float = 0.5,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, backend=backend)
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {tuple(ACTIVATIONS)}, got {act!r}")
        self.act = act
        self.beta, self.threshold, self.d = check_act_params(beta, threshold, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return bias_act(y, None, self.act, beta=self.beta, threshold=self.threshold, d=self.d, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act!r}"

    @classmethod
    def from_module(cls, module: nn.BatchNorm2d, act: str = "relu", backend: str = "auto", **act_params):
        """A BatchNormAct2d of ``module``'s settings followed by ``act``, sharing its parameters,
        buffers and hooks (``module``: a BatchNorm2d, or a BN + activation module whose
        activation is ``act``)."""
        new = cls(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            act,
            backend=backend,
            device=torch.device("meta"),
            **act_params,
        )
        share_state(new, module)
        return new


class BatchNormDropAct2d(BatchNorm2d):
    """A fused BatchNorm2d followed by its ``drop`` and ``act`` child modules: the drop-in for the
    BatchNorm + activation modules of timm (``BatchNormAct2d``, same parameter, buffer and child
    names, so the state_dict keys are unchanged). ``patch_model`` patches the ``act`` child on its
    own, so both halves run on fused ops (``BatchNormAct2d`` is the same for a model built from
    scratch). Made by ``from_module``, never directly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))

    @classmethod
    def from_module(cls, module: nn.BatchNorm2d, backend: str = "auto") -> BatchNormDropAct2d:
        """The fused module of a BN + ``drop`` + ``act`` ``module``, sharing its parameters, buffers,
        hooks and its ``drop`` and ``act`` children (the same module objects)."""
        new = super().from_module(module, backend)
        new.drop, new.act = module.drop, module.act
        return new
