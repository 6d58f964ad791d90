"""The interpretation discrepancy D of Boopathy et al. (ICML 2020): how much an input's
interpretation maps change under a perturbation, per sample and over a data set."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastrob._checks import check_labels, check_tensor
from fastrob.attacks.state import attack_context
from fastrob.distributed import unwrap
from fastrob.interpret import default_map, map_function
from fastrob.metrics._common import batches, model_device, quantiles, shard

KINDS = ("2class", "1class")


def discrepancy(
    maps_clean: torch.Tensor,
    maps_adv: torch.Tensor,
    y: torch.Tensor,
    logits_adv: torch.Tensor | None = None,
    kind: str = "2class",
) -> torch.Tensor:
    """The l1 interpretation discrepancy per sample, [B] (docs/methods.md#interpretation-aware-training):
        1-class:  D1(x, x') = ||I_y(x') - I_y(x)||_1
        2-class:  D2(x, x') = D1 + sum_{c != y} p~_c(x') ||I_c(x') - I_c(x)||_1,
    p~ = softmax(z(x')) restricted to the classes c != y and renormalised, i.e. the softmax of the
    logits with z_y left out. The l1 norm sums over every element of a map (not a mean).

    Differentiable in both maps and in ``logits_adv`` (p~ included), so it can be maximised by an
    attack and minimised in training.

    Args:
        maps_clean, maps_adv: I(x) and I(x'), [B, C, ...] for all C classes (``classes=None`` in
            ``fastrob.interpret``). For kind="1class" they may also be [B, 1, ...], the maps of
            class y only.
        y: the labels [B].
        logits_adv: z(x') [B, C]; needed for kind="2class".
        kind: "2class" (the paper's default) or "1class".
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    check_tensor("maps_clean", maps_clean, min_dim=2)
    check_tensor("maps_adv", maps_adv, min_dim=2)
    if maps_clean.shape != maps_adv.shape:
        raise ValueError(
            f"maps_adv must have the shape of maps_clean {tuple(maps_clean.shape)}, got {tuple(maps_adv.shape)}"
        )
    batch, k = maps_clean.shape[:2]
    y = check_labels(y, batch).to(maps_clean.device)
    if maps_adv.dtype in (torch.float16, torch.bfloat16) or maps_clean.dtype in (torch.float16, torch.bfloat16):
        # autocast maps: sums of many half-precision terms lose too much
        maps_clean, maps_adv = maps_clean.float(), maps_adv.float()
    diff = (maps_adv - maps_clean).flatten(2).abs().sum(2)  # [B, K]: ||I_c(x') - I_c(x)||_1
    if kind == "1class" and k == 1:
        return diff[:, 0]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
        raise ValueError(
            f"y must hold labels in [0, {k}) for maps of {k} classes, got values in [{int(y.min())}, {int(y.max())}]"
        )
    d1 = diff.gather(1, y[:, None]).squeeze(1)
    if kind == "1class":
        return d1
    if logits_adv is None:
        raise ValueError("kind='2class' needs logits_adv, the logits of the perturbed inputs [B, C]")
    check_tensor("logits_adv", logits_adv, min_dim=2)
    if logits_adv.shape != (batch, k):
        raise ValueError(
            f"logits_adv must have shape [B, C] = ({batch}, {k}) (the maps' classes), got {tuple(logits_adv.shape)}"
        )
    if k < 2:
        return d1
    # p~: the softmax over c != y (the y entry masked to -inf gets weight 0)
    mask = torch.zeros_like(diff, dtype=torch.bool).scatter_(1, y[:, None], True)
    z = logits_adv.float() if logits_adv.dtype in (torch.float16, torch.bfloat16) else logits_adv
    p_other = torch.softmax(z.masked_fill(mask, float("-inf")), dim=1).to(diff.dtype)
    return d1 + (p_other * diff.masked_fill(mask, 0.0)).sum(1)


@dataclass
class InterpretationDiscrepancy:
    """mean: the average discrepancy D(x, attack(x)) over the data; values: D per sample [n];
    fooled: whether the attack changed the prediction away from y, per sample [n]; map, kind: which
    maps and which discrepancy (docs/methods.md#interpretation-aware-training)."""

    mean: float
    values: torch.Tensor = field(repr=False)
    fooled: torch.Tensor = field(repr=False)
    map: str
    kind: str

    @property
    def quantiles(self) -> dict:
        return quantiles(self.values)

    def as_dict(self) -> dict:
        return {
            "mean": self.mean,
            "map": self.map,
            "kind": self.kind,
            "n": len(self.values),
            "fooled_rate": float(self.fooled.float().mean()) if len(self.fooled) else 0.0,
            **self.quantiles,
        }


def interpretation_discrepancy(
    model,
    data,
    attack: Callable,
    *,
    map: str | Callable = "cam",
    kind: str = "2class",
    map_kwargs: dict | None = None,
    batch_size: int = 256,
    device=None,
    quiet: bool = False,
    n: int | None = None,
    distributed: bool | None = None,
) -> InterpretationDiscrepancy:
    """The mean interpretation discrepancy D(x, attack(x, y)) over ``data`` (``discrepancy``,
    with the true labels y), and its per-sample values.

    The maps are computed with the model in eval mode and frozen parameters (restored afterwards),
    for all classes, at x and at x' = attack(x, y).

    Args:
        attack: any callable attack(x, y) -> x_adv (e.g. ``fastrob.PGD(model, eps=0.1)``).
        map: "cam" | "grad_cam" | "saliency" | "ig" | "auto" (CAM when the model has a CAM head,
            ``fastrob.interpret.cam_parts``, else saliency), or a callable (model, x, classes) -> maps.
        kind: "2class" or "1class".
        map_kwargs: keyword arguments of the map (grad_cam: {"layer": module}; ig: {"steps": 5}).
        n: read at most this many samples.
        distributed: as ``fastrob.metrics.robust_accuracy``: with a DistributedSampler-sharded
            loader (or True) each rank evaluates its shard and every rank gets the global result.
    """
    if not callable(attack):
        raise TypeError(f"attack must be callable as attack(x, y) -> x_adv, got {type(attack).__name__}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    model = unwrap(model)  # a DDP model's wrapped module: no communication
    if map == "auto":
        map = default_map(model)
    fn = map_function(map, **(map_kwargs or {}))
    name = map if isinstance(map, str) else getattr(map, "__name__", "custom")
    device = model_device(model, device)
    part = shard(data, n, distributed)
    values, fooled = [], []
    for x, y in batches(
        data, batch_size, device, desc=f"interpretation discrepancy ({name})", quiet=quiet, limit=n, shard=part
    ):
        x_adv = attack(x, y).detach()
        with attack_context(model):
            classes = y if kind == "1class" else None  # 1-class D needs class y's maps only
            maps_clean, _ = fn(model, x, classes, create_graph=False)
            maps_adv, logits_adv = fn(model, x_adv, classes, create_graph=False)
            d = discrepancy(maps_clean.detach(), maps_adv.detach(), y, logits_adv.detach(), kind)
        values.append(d.float().cpu())
        fooled.append((logits_adv.argmax(1) != y).cpu())  # eval-mode logits at x_adv
    values = torch.cat(values) if values else torch.zeros(0)
    fooled = torch.cat(fooled) if fooled else torch.zeros(0, dtype=torch.bool)
    if part is not None:
        values, fooled = part.gather(values), part.gather(fooled)
    return InterpretationDiscrepancy(float(values.mean()) if len(values) else 0.0, values, fooled, name, kind)
