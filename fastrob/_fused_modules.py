"""The two base modules on the fused ops, ``BiasAct`` and ``BatchNorm2d``, and ``share_state``, the
one way a fused module takes over the tensors of the module it replaces. The normalisation modules
(``fastrob._norm_modules``) and ``patch_model``'s engine (``fastrob.patching``) build on them;
all are imported into (and documented as) fastrob.nn."""

from __future__ import annotations

import torch
from torch import nn

from fastrob import _backend
from fastrob.ops.batch_norm import batch_norm
from fastrob.ops.bias_act import ACTIVATIONS, bias_act, check_act_params


def share_state(new: nn.Module, module: nn.Module) -> None:
    """Gives ``new`` exactly ``module``'s parameter and buffer tensors (no fresh ones left beside
    them: an optimizer holding them keeps working, state_dict keys are unchanged), its hooks (a
    parametrization or weight-norm pre-hook keeps computing the weight it computed) and its
    training mode."""
    new._parameters = type(module._parameters)(module._parameters)
    new._buffers = type(module._buffers)(module._buffers)
    for name, value in vars(module).items():
        if "hooks" in name and isinstance(value, dict):
            setattr(new, name, type(value)(value))
    new.train(module.training)


class BiasAct(nn.Module):
    """y = act(x + bias) along ``dim`` (``fastrob.ops.bias_act``), optionally with a learnable bias.

    Args:
        act: a name of ``fastrob.ops.bias_act.ACTIVATIONS`` ("relu", "gelu", "silu", "hardswish", ...).
        channels: if given, a learnable bias of this many elements (initialised to 0).
        dim: the dimension the bias runs along.
        beta, threshold: softplus's parameters; d: half_huber's width.
        backend: "auto" | "torch" | "triton" | "cuda".
    """

    def __init__(
        self,
        act: str = "relu",
        channels: int | None = None,
        dim: int = 1,
        *,
        beta: float = 1.0,
        threshold: float = 20.0,
        d: float = 0.5,
        backend: str = "auto",
    ):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {tuple(ACTIVATIONS)}, got {act!r}")
        beta, threshold, d = check_act_params(beta, threshold, d)
        self.act, self.dim, self.beta, self.threshold, self.d = act, dim, beta, threshold, d
        self.backend = _backend.check_backend_name(backend)
        self.bias = nn.Parameter(torch.zeros(channels)) if channels is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bias_act(
            x, self.bias, self.act, self.dim, beta=self.beta, threshold=self.threshold, d=self.d, backend=self.backend
        )

    def extra_repr(self) -> str:
        params = {"softplus": f", beta={self.beta}, threshold={self.threshold}", "half_huber": f", d={self.d}"}
        channels = f", channels={self.bias.numel()}" if self.bias is not None else ""
        return f"act={self.act!r}{channels}{params.get(self.act, '')}, backend={self.backend!r}"


class BatchNorm2d(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` computed by ``fastrob.ops.batch_norm``, whose double backward (the
    part of a gradient penalty's parameter gradient that runs through BN) is fused on a GPU.

    A drop-in replacement: a subclass (isinstance checks hold), with the same parameters, buffers
    and state_dict keys, and the same semantics for momentum (None: cumulative average),
    track_running_stats and affine. ``backend`` picks the op's backend ("auto": the fused kernels
    on a GPU, the torch reference on CPU).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.backend = _backend.check_backend_name(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        # torch.nn.modules.batchnorm._BatchNorm.forward, with fastrob's op in place of F.batch_norm
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        return batch_norm(
            x,
            self.weight,
            self.bias,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            use_batch_stats,
            factor,
            self.eps,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"

    @classmethod
    def from_module(cls, module: nn.BatchNorm2d, backend: str = "auto") -> BatchNorm2d:
        """A fastrob BatchNorm2d with ``module``'s settings, sharing its parameter and buffer
        tensors (so an optimizer holding them keeps working) and its training mode."""
        new = cls(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, backend=backend
        )
        share_state(new, module)
        return new
