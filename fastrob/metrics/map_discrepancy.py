"""The interpretation discrepancy D of Boopathy et al. (ICML 2020) over a data set under an attack;
the per-sample D is ``fastrob.interpret_discrepancy.discrepancy``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastrob.attacks.state import attack_context
from fastrob.distributed import unwrap
from fastrob.interpret import default_map, map_function
from fastrob.interpret_discrepancy import KINDS, discrepancy
from fastrob.metrics._common import batches, model_device, quantiles, shard

# the per-sample D lives next to the maps; it is re-exported here with the metric
__all__ = ["KINDS", "InterpretationDiscrepancy", "discrepancy", "interpretation_discrepancy"]


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
