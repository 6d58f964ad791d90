"""Modules built on the fused ops: ``BiasAct`` and ``swap_activations``, which puts them into an
existing model so that its double backprop runs through the fused first- and second-derivative
kernels."""

from __future__ import annotations

import torch
from torch import nn

from fastrob import _backend
from fastrob.ops.bias_act import ACTIVATIONS, bias_act, check_act_params


class BiasAct(nn.Module):
    """y = act(x + bias) along ``dim`` (``fastrob.ops.bias_act``), optionally with a learnable bias.

    Args:
        act: "relu" | "softplus" | "gelu" | "silu" | "half_huber".
        channels: if given, a learnable bias of this many elements (initialised to 0).
        dim: the dimension the bias runs along.
        beta, threshold: softplus's parameters; d: half_huber's width.
        backend: "auto" | "torch" | "triton" | "cuda".
    """

    def __init__(self, act: str = "relu", channels: int | None = None, dim: int = 1, *, beta: float = 1.0,
                 threshold: float = 20.0, d: float = 0.5, backend: str = "auto"):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {tuple(ACTIVATIONS)}, got {act!r}")
        beta, threshold, d = check_act_params(beta, threshold, d)
        self.act, self.dim, self.beta, self.threshold, self.d = act, dim, beta, threshold, d
        self.backend = _backend.check_backend_name(backend)
        self.bias = nn.Parameter(torch.zeros(channels)) if channels is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bias_act(x, self.bias, self.act, self.dim, beta=self.beta, threshold=self.threshold, d=self.d,
                        backend=self.backend)

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
    they are. Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"act must be None or one of {tuple(ACTIVATIONS)}, got {act!r}")
    _backend.check_backend_name(backend)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            replacement = _as_bias_act(child, act, backend)
            if replacement is not None:
                setattr(parent, name, replacement)
    return model
