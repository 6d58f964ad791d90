"""Interpretation maps (Boopathy et al. 2020; docs/methods.md#interpretation-aware-training): class
activation maps (CAM), Grad-CAM, input-gradient saliency and integrated gradients, batched over samples
and classes and differentiable.

Every function takes ``classes``: None (all C classes), an int tensor [B] (one class per sample,
e.g. the labels y) or [B, K] (K classes per sample), and returns maps [B, K, ...] whose row
[b, k] explains the logit z_{classes[b, k]} of sample b. Resolutions:

- ``cam``, ``grad_cam``: at the resolution of the explained feature map A, [B, K, H', W'] (one map
  for all channels). Upsample with ``F.interpolate`` to overlay them on the input.
- ``saliency``, ``integrated_gradients``: at input resolution with the input's channels,
  [B, K, *x.shape[1:]] (signed; plots take |.| and the max over channels).

Differentiability: by default (``create_graph=True``) the maps are built with the autograd graph,
so they can be differentiated with respect to the parameters and to x (the interpretation
regularizers and the ISA attack do); their forwards then run attention and grouped convolutions on
ops whose backward is differentiable (``fastrob.routing``). Pass ``create_graph=False`` for plain
pictures.

The model is called in its current mode (train or eval), its mode and its parameters'
``requires_grad`` are never changed, and no parameter's ``.grad`` moves (gradients are taken with
``torch.autograd.grad``). ``cam``, ``grad_cam`` and ``saliency`` make one forward pass, which in
train mode moves BatchNorm's running statistics as ``model(x)`` would; ``integrated_gradients``
evaluates the ``steps`` path points (stacked into batches of ``batch_size``) with the running
statistics left alone.

Batch coupling: the gradient maps are gradients of the class scores summed over the batch, as in
``fastrob.functional``; they are per-sample gradients unless the model mixes samples (BatchNorm in
train mode), where they also carry the terms through the batch statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastrob import functional as Fn
from fastrob._checks import check_int, check_logits, check_model, check_tensor, dtype_name
from fastrob.routing import twice_differentiable

MAPS = ("cam", "grad_cam", "saliency", "ig")

MapFn = Callable[..., torch.Tensor]


# ---- classes ------------------------------------------------------------------------------------


def class_index(classes, batch: int, num_classes: int, device) -> torch.Tensor:
    """``classes`` as an int64 [B, K] index: None -> all classes [B, C]; an int -> [B, 1]; a tensor
    [B] -> [B, 1]; a tensor [B, K] as it is. Every entry must lie in [0, num_classes)."""
    if classes is None:
        return torch.arange(num_classes, device=device).expand(batch, num_classes)
    if isinstance(classes, int) and not isinstance(classes, bool):
        idx = torch.full((batch, 1), classes, dtype=torch.long, device=device)
    elif isinstance(classes, torch.Tensor):
        if classes.dtype.is_floating_point or classes.dtype == torch.bool or classes.is_complex():
            raise TypeError(f"classes must hold integer class indices, got dtype {dtype_name(classes.dtype)}")
        if classes.dim() == 1 and classes.shape[0] == batch:
            idx = classes[:, None]
        elif classes.dim() == 2 and classes.shape[0] == batch and classes.shape[1] >= 1:
            idx = classes
        else:
            raise ValueError(
                f"classes must be None, an int, or an int tensor of shape [B] or [B, K] with "
                f"B = {batch}, got shape {tuple(classes.shape)}"
            )
        idx = idx.to(device=device, dtype=torch.long)
    else:
        raise TypeError(f"classes must be None, an int or an int tensor, got {type(classes).__name__}")
    if idx.numel():
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"classes must lie in [0, {num_classes}), got values in [{low}, {high}]")
    return idx


def _check_x(model, x):
    check_model(model)
    check_tensor("x", x, min_dim=2)


def _forward(model, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """model(x). With ``create_graph`` the maps' gradients will be differentiated again, so
    attention and grouped convolutions run on ops whose backward is differentiable (fastrob.routing)."""
    with twice_differentiable() if create_graph else contextlib.nullcontext():
        return model(x)


def _input_leaf(x: torch.Tensor) -> torch.Tensor:
    """x itself when it already requires grad (so that the maps stay differentiable in x), else a
    detached copy that requires grad (the gradient maps need something to differentiate by)."""
    return x if x.requires_grad else x.detach().requires_grad_(True)


def _score_grads(logits: torch.Tensor, idx: torch.Tensor, wrt: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """[B, K, *wrt.shape[1:]]: row k is d(sum_b z_{b, idx[b, k]}) / d wrt, one backward per class
    column (K backward passes; a vmapped backward measured slower on CPU, see functional.py)."""
    out = []
    for k in range(idx.shape[1]):
        score = logits.gather(1, idx[:, k : k + 1]).sum()
        out.append(Fn.input_grad(score, wrt, create_graph=create_graph, retain_graph=True))
    return torch.stack(out, 1)


# ---- CAM ----------------------------------------------------------------------------------------


def cam_parts(model, features=None, head=None):
    """(features, head) for ``cam``: the arguments if given, else ``model.features`` and
    ``model.head`` (``fastrob.models.SmallCNN``), else None."""
    features = getattr(model, "features", None) if features is None else features
    head = getattr(model, "head", None) if head is None else head
    if features is None or not isinstance(head, nn.Linear) or not callable(features):
        return None
    return features, head


def cam(
    model,
    x: torch.Tensor,
    classes=None,
    *,
    features: Callable | None = None,
    head: nn.Linear | None = None,
    return_logits: bool = False,
):
    """Class activation maps (Zhou et al. 2016) of a network ending in a conv feature map A(x)
    (K channels), global average pooling and a linear layer W, b:
        I_c(x) = sum_k W_{c,k} A_k(x),   z_c = mean_{h,w} I_c(x) + b_c,
    for the requested classes, [B, K, H', W'] (feature-map resolution, without the bias).

    Args:
        model: the classifier; its ``features`` (x -> A) and ``head`` (the final ``nn.Linear``) are
            used unless given here.
        features: the module computing A [B, K, H', W'] from x.
        head: the final ``nn.Linear`` (in_features = K).
        return_logits: also return the logits head(mean_{h,w} A), from the same forward; they equal
            model(x) for a network of that shape.

    Differentiable in x and the parameters (plain autograd: no backward pass is needed).
    """
    _check_x(model, x)
    parts = cam_parts(model, features, head)
    if parts is None:
        raise ValueError(
            "cam needs a network that ends in conv features -> global average pooling -> nn.Linear: "
            "pass features= (the module computing the last feature map) and head= (the final "
            f"nn.Linear), or give the model .features and .head ({type(model).__name__} has neither); "
            "for other networks use grad_cam(model, x, classes, layer=...)"
        )
    features, head = parts
    a = features(x)
    if not isinstance(a, torch.Tensor) or a.dim() < 3 or a.shape[0] != x.shape[0] or a.shape[1] != head.in_features:
        got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
        raise ValueError(
            f"features must return a feature map [B, K, ...] with B = {x.shape[0]} and K = "
            f"head.in_features = {head.in_features}, got {got}"
        )
    idx = class_index(classes, x.shape[0], head.out_features, x.device)
    w = head.weight[idx]  # [B, K, channels]
    maps = torch.einsum("bkc,bc...->bk...", w.to(a.dtype), a)
    if return_logits:
        return maps, head(a.flatten(2).mean(2))
    return maps


# ---- Grad-CAM -----------------------------------------------------------------------------------


def grad_cam(
    model,
    x: torch.Tensor,
    classes=None,
    *,
    layer: nn.Module,
    relu: bool = True,
    create_graph: bool = True,
    return_logits: bool = False,
):
    """Grad-CAM (Selvaraju et al. 2017) at the output A of ``layer`` (K channels, any spatial shape):
        alpha_{c,k} = mean_{spatial} d z_c / d A_k,   M_c = ReLU(sum_k alpha_{c,k} A_k),
    [B, K, H', W'] at the layer's resolution (``relu=False`` keeps the signed sum). For a network
    conv -> GAP -> linear with ``layer`` the last conv block, alpha_{c,k} = W_{c,k} / (H'W') and
    M_c = ReLU(CAM_c) / (H'W').

    One forward (the model's ``forward``, with a hook on ``layer``) and one backward per requested
    class column; ``create_graph=True`` keeps the maps differentiable.
    """
    _check_x(model, x)
    if not isinstance(layer, nn.Module):
        raise TypeError(
            f"layer must be an nn.Module of the model (whose output Grad-CAM explains), got {type(layer).__name__}"
        )
    captured = []

    def hook(module, inputs, output):
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"layer must output a tensor, got {type(output).__name__}")
        if not output.requires_grad:  # frozen parameters and an x without grad: still differentiable in A
            output = output.detach().requires_grad_(True)
        captured.append(output)
        return output

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = _forward(model, x, create_graph)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(f"layer must run exactly once in the model's forward, it ran {len(captured)} times")
    a = captured[0]
    if a.dim() < 3 or a.shape[0] != x.shape[0]:
        raise ValueError(f"layer must output a feature map [B, K, ...] with B = {x.shape[0]}, got {tuple(a.shape)}")
    check_logits(logits, x.shape[0])
    idx = class_index(classes, x.shape[0], logits.shape[1], x.device)
    with torch.enable_grad():
        grads = _score_grads(logits, idx, a, create_graph)  # [B, K, channels, ...]
        alpha = grads.flatten(3).mean(3)  # [B, K, channels]
        maps = torch.einsum("bkc,bc...->bk...", alpha, a)
        if relu:
            maps = F.relu(maps)
    return (maps, logits) if return_logits else maps


# ---- input gradients ----------------------------------------------------------------------------


def saliency(model, x: torch.Tensor, classes=None, *, create_graph: bool = True, return_logits: bool = False):
    """Input-gradient saliency (Simonyan et al. 2014): S_c = d z_c / d x, signed, at input
    resolution, [B, K, *x.shape[1:]]. One forward and one backward per requested class column."""
    _check_x(model, x)
    with torch.enable_grad():
        xl = _input_leaf(x)
        logits = _forward(model, xl, create_graph)
        check_logits(logits, x.shape[0])
        idx = class_index(classes, x.shape[0], logits.shape[1], x.device)
        maps = _score_grads(logits, idx, xl, create_graph)
    return (maps, logits) if return_logits else maps


def integrated_gradients(
    model,
    x: torch.Tensor,
    classes=None,
    *,
    baseline: torch.Tensor | None = None,
    steps: int = 5,
    batch_size: int | None = None,
    create_graph: bool = True,
    return_logits: bool = False,
):
    """Integrated gradients (Sundararajan et al. 2017) by a right Riemann sum of ``steps`` points
    (5 steps in Boopathy et al.'s code; docs/methods.md#interpretation-aware-training):
        IG_c(x) = (x - x0) * (1/m) sum_{i=1..m} d z_c / d x |_{x0 + (i/m)(x - x0)},   m = steps,
    at input resolution, [B, K, *x.shape[1:]]. Completeness: sum over the map of IG_c tends to
    z_c(x) - z_c(x0) as m grows (exactly for a model linear along the path).

    The m path points are stacked into forwards of about ``batch_size`` rows (default: all m*B at
    once), each followed by one backward per requested class column. Train-mode BatchNorm
    normalises each path point's batch of B with its own statistics (as m separate forwards would)
    and the running statistics do not move.

    Args:
        baseline: x0, a tensor broadcastable to x (default zeros, the black image).
        steps: m >= 1.
        batch_size: at most this many rows per forward (rounded to whole path points, at least one).
        return_logits: also return model(x) (the last path point, i = m).
    """
    _check_x(model, x)
    steps = check_int("steps", steps, 1)
    if baseline is None:
        baseline = torch.zeros_like(x)
    else:
        check_tensor("baseline", baseline, min_dim=0)
        try:
            baseline = torch.broadcast_to(baseline.to(x), x.shape)
        except RuntimeError:
            raise ValueError(
                f"baseline must broadcast to x's shape {tuple(x.shape)}, got {tuple(baseline.shape)}"
            ) from None
    batch = x.shape[0]
    per_chunk = steps if batch_size is None else max(1, check_int("batch_size", batch_size, 1) // max(batch, 1))
    diff = x - baseline
    total, idx, logits_last = 0.0, None, None
    with torch.enable_grad(), Fn.preserved_buffers(model):
        for start in range(1, steps + 1, per_chunk):
            alphas = torch.arange(start, min(start + per_chunk, steps + 1), device=x.device, dtype=x.dtype) / steps
            r = len(alphas)
            shape = (r,) + (1,) * x.dim()
            path = (baseline.unsqueeze(0) + alphas.view(shape) * diff.unsqueeze(0)).flatten(0, 1)  # [r*B, ...]
            if not path.requires_grad:
                path.requires_grad_(True)
            with Fn.per_replica_batch_norm(model, r):
                logits = _forward(model, path, create_graph)
            check_logits(logits, path.shape[0])
            if idx is None:
                idx = class_index(classes, batch, logits.shape[1], x.device)
            grads = _score_grads(logits, idx.repeat(r, 1), path, create_graph)  # [r*B, K, ...]
            total = total + grads.unflatten(0, (r, batch)).sum(0)
            logits_last = logits[-batch:]
    maps = diff.unsqueeze(1) * (total / steps)
    return (maps, logits_last) if return_logits else maps


# ---- by name --------------------------------------------------------------------------------------


def map_function(map: str | MapFn, **options) -> MapFn:
    """fn(model, x, classes, create_graph) -> (maps [B, K, ...], logits [B, C]) for a map name
    ("cam" | "grad_cam" | "saliency" | "ig") with its keyword ``options`` (grad_cam: layer=...;
    ig: steps=, baseline=, batch_size=), or a user callable fn(model, x, classes) -> maps, whose
    logits come from a separate model(x)."""
    if callable(map):

        def user(model, x, classes, create_graph=True):
            maps = map(model, x, classes, **options)
            return maps, model(x)

        return user
    if map not in MAPS:
        raise ValueError(f"map must be one of {MAPS} or a callable (model, x, classes) -> maps, got {map!r}")
    if map == "grad_cam" and "layer" not in options:
        raise ValueError("map='grad_cam' needs the layer to explain: pass map_kwargs={'layer': module}")

    def fn(model, x, classes, create_graph=True):
        if map == "cam":
            return cam(model, x, classes, return_logits=True, **options)
        if map == "grad_cam":
            return grad_cam(model, x, classes, create_graph=create_graph, return_logits=True, **options)
        if map == "saliency":
            return saliency(model, x, classes, create_graph=create_graph, return_logits=True, **options)
        return integrated_gradients(model, x, classes, create_graph=create_graph, return_logits=True, **options)

    return fn


def default_map(model) -> str:
    """ "cam" for models with a CAM head (``cam_parts``), else "saliency"."""
    return "cam" if cam_parts(model) is not None else "saliency"
