"""``patch_model``'s engine: which modules of a model it can put on the fused ops, recognised by
what they compute, and a report of what it swapped and what it left, with the reason.

Recognition. A module is recognised by its class first (torch's activations and BatchNorm2d,
subclasses included when they keep torch's ``forward``), then by a probe: a leaf module without
parameters or buffers is run once on a fixed tensor (its ``forward`` is called directly, so no
hook sees the probe), and its output compared with each known activation. That finds the
activations that are not torch's classes (timm's ``GELU`` wraps ``F.gelu`` without subclassing
``nn.GELU``). A probe whose output comes from a custom ``torch.autograd.Function`` is left alone:
the Function defines its own backward (straight-through estimators, memory-saving activations),
which a swap would replace.

Out of reach, whatever the table says: functional calls inside a module's ``forward``
(``F.gelu(x)``, ``x.sigmoid()`` in an SE gate written functionally) are not modules, and custom
autograd Functions keep their own derivatives.

Adding a kind (how the table grows). ``KINDS`` maps a kind's name to a ``Kind``: ``probe`` (the
function the module must compute, for the probe; None: recognised by class only), ``classes``
(module classes that compute it), and ``swap`` (a function ``(module, backend) -> replacement``,
or None while no fused op exists: the kind is then reported as left, "no fused op for <kind>
yet"). A new fused op is one ``swap`` filled in, e.g.::

    KINDS["sigmoid"] = Kind(torch.sigmoid, (nn.Sigmoid,), lambda m, backend: FusedSigmoid(backend=backend))
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastrob._fused_modules import BatchNorm2d, BiasAct
from fastrob._norm_modules import BatchNormDropAct2d, LayerNorm, LayerNorm2d
from fastrob.ops.layer_norm import layer_norm_reference

LINEAR = (nn.Linear, nn.Bilinear, nn.Embedding, nn.modules.conv._ConvNd)
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
OUT_OF_REACH = (
    "functional calls inside a module's forward (F.gelu(x), x.sigmoid()) and custom autograd Functions are "
    "out of patch_model's reach"
)


@dataclasses.dataclass(frozen=True)
class Kind:
    """A kind of module the table knows (see the module docstring)."""

    probe: Callable | None
    classes: tuple = ()
    swap: Callable | None = None  # (module, backend) -> the fused replacement


def _bias_act(act: str):
    return lambda module, backend: BiasAct(act, backend=backend)


def _softplus(module, backend):
    return BiasAct("softplus", beta=float(module.beta), threshold=float(module.threshold), backend=backend)


def _batch_norm(module, backend):
    return BatchNorm2d.from_module(module, backend)


def _batch_norm_act(module, backend):
    return BatchNormDropAct2d.from_module(module, backend)  # its act child is patched on its own


def _layer_norm(module, backend):
    return LayerNorm.from_module(module, backend)


def _layer_norm2d(module, backend):
    return LayerNorm2d.from_module(module, backend)


def _is_layer_norm2d(module) -> bool:
    """A channels-first layer norm written as an nn.LayerNorm subclass with its own forward (timm's
    LayerNorm2d, ConvNeXt's): recognised by running it once on a small [2, C, 3, 3] tensor (its
    forward directly, under no_grad: no hook sees it, no graph is kept) against the reference."""
    if not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) != 1:
        return False
    if type(module).forward is nn.LayerNorm.forward or list(module.children()):
        return False
    channels = module.normalized_shape[0]
    like = module.weight if module.weight is not None else torch.empty(0)
    if like.is_meta:
        return False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, 3, 3, generator=g).to(device=like.device, dtype=like.dtype if like.numel() else None)
    try:
        with torch.no_grad():
            out = module.forward(x)
            ref = layer_norm_reference(x, module.weight, module.bias, module.eps, channels_first=True)
    except Exception:  # noqa: BLE001 - a module that cannot take the probe is no channels-first layer norm
        return False
    return isinstance(out, torch.Tensor) and out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-4, atol=1e-5)


def _is_batch_norm_act(module) -> bool:
    """timm's BatchNorm + activation: an nn.BatchNorm2d subclass named BatchNormAct2d whose
    ``forward`` is batch norm, then its ``drop`` child, then its ``act`` child."""
    return (
        type(module).__name__ == "BatchNormAct2d"
        and isinstance(module, nn.BatchNorm2d)
        and isinstance(getattr(module, "act", None), nn.Module)
        and isinstance(getattr(module, "drop", None), nn.Module)
    )


KINDS: dict[str, Kind] = {
    "relu": Kind(F.relu, (nn.ReLU,), _bias_act("relu")),
    "softplus": Kind(None, (nn.Softplus,), _softplus),  # beta and threshold are read from the module
    "gelu": Kind(F.gelu, (), _bias_act("gelu")),  # nn.GELU's two forms are told apart by the probe
    "gelu_tanh": Kind(lambda t: F.gelu(t, approximate="tanh"), (), _bias_act("gelu_tanh")),
    "silu": Kind(F.silu, (nn.SiLU,), _bias_act("silu")),
    "sigmoid": Kind(torch.sigmoid, (nn.Sigmoid,), _bias_act("sigmoid")),
    "hardswish": Kind(F.hardswish, (nn.Hardswish,), _bias_act("hardswish")),
    "hardsigmoid": Kind(F.hardsigmoid, (nn.Hardsigmoid,)),
    "tanh": Kind(torch.tanh, (nn.Tanh,)),
    "mish": Kind(F.mish, (nn.Mish,)),
    "relu6": Kind(F.relu6, (nn.ReLU6,)),
    "elu": Kind(F.elu, (nn.ELU,)),
    "leaky_relu": Kind(F.leaky_relu, (nn.LeakyReLU,)),
    "batch_norm": Kind(None, (), _batch_norm),  # exactly nn.BatchNorm2d: subclasses may compute something else
    "batch_norm_act": Kind(None, (), _batch_norm_act),
    "layer_norm": Kind(None, (), _layer_norm),  # exactly nn.LayerNorm over one dimension (classify)
    "layer_norm2d": Kind(None, (), _layer_norm2d),  # a channels-first subclass, found by _is_layer_norm2d
    "group_norm": Kind(None, (nn.GroupNorm,)),
}
BATCH_NORM_KINDS = ("batch_norm", "batch_norm_act")
NORM_KINDS = (*BATCH_NORM_KINDS, "layer_norm", "layer_norm2d", "group_norm")
# the activations ``act=`` replaces (patch_model(model, act="softplus"))
REPLACEABLE_BY_ACT = ("relu", "softplus", "gelu", "silu")


@dataclasses.dataclass
class PatchReport:
    """What ``patch_model`` did: ``swapped`` [(name, old class, new class)], ``left`` [(name,
    class, reason)] for every other module that computes something (containers are not listed)."""

    swapped: list = dataclasses.field(default_factory=list)
    left: list = dataclasses.field(default_factory=list)

    def reasons(self) -> dict[str, list[str]]:
        """reason -> names of the modules left for it."""
        out: dict[str, list[str]] = {}
        for name, _, reason in self.left:
            out.setdefault(reason, []).append(name)
        return out

    def __str__(self) -> str:
        lines = [f"patch_model: swapped {len(self.swapped)} module(s), left {len(self.left)}"]
        for name, old, new in self.swapped:
            lines.append(f"  swapped {name or '(model)'}: {old} -> {new}")
        for reason, names in self.reasons().items():
            shown = ", ".join(n or "(model)" for n in names[:6]) + (" ..." if len(names) > 6 else "")
            lines.append(f"  left {len(names)} ({reason}): {shown}")
        lines.append(f"  note: {OUT_OF_REACH}")
        return "\n".join(lines)


def activation_kinds() -> tuple[str, ...]:
    """The table's activations with a fused op (what ``swap_activations`` swaps), read when called,
    so that a kind added to ``KINDS`` counts."""
    return tuple(kind for kind, entry in KINDS.items() if kind not in NORM_KINDS and entry.swap is not None)


def _probe_input(dtype=torch.float64) -> torch.Tensor:
    # [1, 241, 1, 1]: any elementwise module takes it, channels-first layers too
    return torch.linspace(-6.0, 6.0, 241, dtype=dtype).view(1, -1, 1, 1)


def probe(module: nn.Module) -> tuple[str | None, str | None]:
    """(kind, None) when ``module`` computes one of the table's activations; (None, reason) when it
    cannot be swapped for what it computes; (None, None) when it is no known activation."""
    if list(module.children()) or any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
        return None, None
    t = _probe_input().requires_grad_(True)
    try:
        # forward, not __call__: no user hook sees the probe; a forked RNG: a Dropout in train mode
        # probed here does not move the user's random stream
        with torch.enable_grad(), torch.random.fork_rng(devices=[]):
            out = module.forward(t.clone())
    except Exception:  # noqa: BLE001 - a module that cannot take the probe is no elementwise activation
        return None, None
    if not isinstance(out, torch.Tensor) or out.shape != t.shape:
        return None, None
    if isinstance(out.grad_fn, torch.autograd.function.BackwardCFunction):
        return None, "custom autograd Function (its own backward): out of reach"
    with torch.no_grad():
        for kind, entry in KINDS.items():
            if entry.probe is not None and torch.allclose(out, entry.probe(t), rtol=1e-6, atol=1e-9):
                return kind, None
    return None, None


def classify(module: nn.Module) -> tuple[str | None, str | None]:
    """(kind, reason): the table's kind of ``module`` (None when unknown), or why it is left."""
    if isinstance(module, (BiasAct, BatchNorm2d, LayerNorm)):
        return None, "already fused"
    if type(module) is nn.LayerNorm:
        if len(module.normalized_shape) == 1:
            return "layer_norm", None
        return None, "LayerNorm over several trailing dimensions: no fused op (one dimension only)"
    if _is_layer_norm2d(module):
        return "layer_norm2d", None
    if _is_batch_norm_act(module):
        return "batch_norm_act", None
    if type(module) is nn.BatchNorm2d:
        return "batch_norm", None
    if isinstance(module, nn.SyncBatchNorm):
        return None, "SyncBatchNorm: no fused op (its statistics are reduced across processes)"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if isinstance(module, nn.BatchNorm2d):
            return None, f"a subclass of nn.BatchNorm2d ({type(module).__name__}) may compute something else"
        return None, f"no fused op for {type(module).__name__} (BatchNorm2d only)"
    own_forward = type(module).forward
    if isinstance(module, nn.GELU) and own_forward is nn.GELU.forward:
        return ("gelu" if module.approximate == "none" else "gelu_tanh"), None
    for kind, entry in KINDS.items():
        # a subclass counts when it keeps its torch class's forward (else the probe decides)
        if any(isinstance(module, c) and own_forward is c.forward for c in entry.classes):
            return kind, None
    kind, reason = probe(module)
    if kind is not None or reason is not None:
        return kind, reason
    name = type(module).__name__
    if "norm" in name.lower():
        return None, f"no fused op for {name} yet"
    if isinstance(module, LINEAR):
        return None, "linear: its derivatives are torch's own kernels (nothing to fuse)"
    if list(module.children()):
        return None, "a module with its own forward: its children are patched, functional calls in it are not"
    return None, "not an activation or normalisation the table knows"


_warned_nothing = False


def patch(
    model: nn.Module, act: str | None, batch_norm: bool, backend: str, kinds: tuple[str, ...] | None = None
) -> tuple[nn.Module, PatchReport]:
    """The swaps of ``fastrob.nn.patch_model``, and their report. ``kinds``: swap only modules of
    these kinds of ``KINDS`` (``swap_activations``, ``swap_batch_norm``, ``swap_layer_norm``);
    None: every kind, and a warning when nothing is swapped."""
    global _warned_nothing
    report = PatchReport()

    def replacement(name: str, module: nn.Module, listed: bool = True):
        kind, reason = classify(module)
        entry = KINDS.get(kind) if kind is not None else None
        if entry is not None and kinds is not None and kind not in kinds:
            entry, reason = None, f"{kind}: not among the kinds asked for"
        if entry is not None and (kind not in BATCH_NORM_KINDS or batch_norm):
            if act is not None and kind in REPLACEABLE_BY_ACT:
                return BiasAct(act, backend=backend)
            if entry.swap is not None:
                return entry.swap(module, backend)
            reason = f"no fused op for {kind} yet"
        elif entry is not None:
            reason = "batch_norm=False"
        if listed and not isinstance(module, CONTAINERS):
            report.left.append((name, type(module).__name__, reason or "not an activation the table knows"))
        return None

    def visit(prefix: str, parent: nn.Module):
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}.{child_name}" if prefix else child_name
            new = replacement(name, child)
            if new is not None:
                setattr(parent, child_name, new)
                report.swapped.append((name, type(child).__name__, type(new).__name__))
                child = new
            visit(name, child)

    # the model itself is listed when it is one module; a model made of modules is its modules
    root = replacement("", model, listed=not list(model.children()))
    if root is not None:
        report.swapped.append(("", type(model).__name__, type(root).__name__))
        model = root
    visit("", model)
    already = any(reason == "already fused" for _, _, reason in report.left)
    if kinds is None and not report.swapped and not already and not _warned_nothing:
        _warned_nothing = True
        warnings.warn(f"patch_model swapped nothing: no module runs on the fused ops.\n{report}", stacklevel=3)
    return model, report
