"""Modules built on the fused ops: ``BiasAct`` and ``BatchNorm2d``, and ``swap_activations``,
``swap_batch_norm`` and ``patch_model``, which put them into an existing model so that its double
backprop runs through the fused first- and second-derivative kernels."""

from __future__ import annotations

import torch
from torch import nn

from fastrob import _backend
from fastrob.ops.batch_norm import batch_norm
from fastrob.ops.bias_act import ACTIVATIONS, bias_act, check_act_params


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


def _as_bias_act(module: nn.Module, act: str | None, backend: str):
    """The BiasAct computing what ``module`` computes (or ``act`` instead), or None if it is not a
    supported activation. GELU with approximate='tanh' is not one (the kernels use the erf form)."""
    if isinstance(module, nn.ReLU):
        own = dict(act="relu")
    elif isinstance(module, nn.Softplus):
        own = dict(act="softplus", beta=float(module.beta), threshold=float(module.threshold))
    elif isinstance(module, nn.GELU) and module.approximate == "none":
        own = dict(act="gelu")
    elif isinstance(module, nn.SiLU):
        own = dict(act="silu")
    else:
        return None
    return BiasAct(**(own if act is None else dict(act=act)), backend=backend)


def swap_activations(model: nn.Module, act: str | None = None, *, backend: str = "auto") -> nn.Module:
    """Replaces, in place, every nn.ReLU, nn.Softplus, nn.GELU (erf form) and nn.SiLU module of
    ``model`` by a ``BiasAct`` computing the same function (``act=None``), or ``act`` instead (e.g.
    "softplus" or "half_huber" to give a ReLU network a non-zero second derivative for gradient
    penalties). Activations called functionally inside ``forward`` are not modules and stay as
    they are. Returns ``model``, or the new module when ``model`` itself is an activation."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"act must be None or one of {tuple(ACTIVATIONS)}, got {act!r}")
    _backend.check_backend_name(backend)
    root = _as_bias_act(model, act, backend)
    if root is not None:  # the model is itself an activation
        return root
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            replacement = _as_bias_act(child, act, backend)
            if replacement is not None:
                setattr(parent, name, replacement)
    return model


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
        # exactly the module's own tensors (no fresh ones left beside them), and its hooks: a
        # parametrization or weight-norm pre-hook keeps computing the weight it computed
        new._parameters = type(module._parameters)(module._parameters)
        new._buffers = type(module._buffers)(module._buffers)
        for name, value in vars(module).items():
            if "hooks" in name and isinstance(value, dict):
                setattr(new, name, type(value)(value))
        new.train(module.training)
        return new


def swap_batch_norm(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Replaces, in place, every ``torch.nn.BatchNorm2d`` of ``model`` (not SyncBatchNorm, nor an
    already fused one) by a ``fastrob.nn.BatchNorm2d`` with the same settings, parameters and
    buffers (the same tensors: optimizers and state_dict keys are unaffected) and hooks. Returns
    ``model``, or the new module when ``model`` itself is an ``nn.BatchNorm2d``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _backend.check_backend_name(backend)
    if type(model) is nn.BatchNorm2d:
        return BatchNorm2d.from_module(model, backend)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:  # exactly: subclasses may compute something else
                setattr(parent, name, BatchNorm2d.from_module(child, backend))
    return model


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
    from fastrob.patching import patch  # patching builds on this module's classes

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(batch_norm, bool):
        raise TypeError(f"batch_norm must be a bool, got {type(batch_norm).__name__}")
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"act must be None or one of {tuple(ACTIVATIONS)}, got {act!r}")
    _backend.check_backend_name(backend)
    model, report = patch(model, act, batch_norm, backend)
    if verbose:
        print(report)
    return (model, report) if return_report else model


# the modules of the modern normalisation layers (LayerNorm, LayerNorm2d, BatchNormAct2d) live in
# their own file; imported last, as they build on BatchNorm2d above
from fastrob._norm_modules import BatchNormAct2d, LayerNorm, LayerNorm2d, swap_layer_norm  # noqa: E402, F401
