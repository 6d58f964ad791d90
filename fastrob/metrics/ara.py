"""The accuracy-robustness area (ARA) of Woods et al. 2019 (docs/methods.md#adversarial-explanations)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fastrob._checks import check_int, check_positive
from fastrob.attacks import default_alpha, pgd
from fastrob.distributed import all_reduce_max, unwrap
from fastrob.metrics._common import batches, clean_logits, model_device, shard

KINDS = ("attack", "btr")


@dataclass
class ARAResult:
    """ara: the area; radii: per-sample minimal RMSE perturbation found [n] (0 for clean errors,
    ``max_rmse`` where no perturbation up to it succeeded); num_classes: C (chance = 1/C)."""

    ara: float
    radii: torch.Tensor = field(repr=False)
    kind: str
    num_classes: int
    clean_accuracy: float
    max_rmse: float

    def curve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, acc(r)) at the steps of the curve: acc(r) = fraction of samples with radius > r."""
        r = torch.cat([torch.zeros(1), self.radii.sort().values])
        acc = 1.0 - torch.arange(len(r), dtype=torch.float32) / max(len(self.radii), 1)
        return r, acc

    def as_dict(self) -> dict:
        return {
            "ara": self.ara,
            "kind": self.kind,
            "num_classes": self.num_classes,
            "clean_accuracy": self.clean_accuracy,
            "max_rmse": self.max_rmse,
            "n": len(self.radii),
            "median_radius": float(self.radii.median()) if len(self.radii) else 0.0,
        }


def ara_from_radii(radii: torch.Tensor, num_classes: int) -> float:
    """ARA = ∫₀^∞ max(0, acc(r) - 1/C) dr with acc(r) = #{i : r_i > r} / N, exactly.

    acc is a step function: with r_(1) <= ... <= r_(N) and r_(0) = 0 it equals (N - k)/N on
    [r_(k), r_(k+1)), so the integral is Σ_k max(0, (N - k)/N - 1/C)·(r_(k+1) - r_(k))."""
    num_classes = check_int("num_classes", num_classes, 2)
    r = radii.detach().double().flatten().clamp_min(0).sort().values
    n = len(r)
    if n == 0:
        return 0.0
    widths = torch.diff(r, prepend=r.new_zeros(1))
    heights = (n - torch.arange(n, dtype=torch.float64)) / n - 1.0 / num_classes
    return float((heights.clamp_min(0) * widths).sum())


def ara(
    model,
    data,
    n: int = 1000,
    kind: str = "attack",
    *,
    steps: int = 20,
    search_steps: int = 10,
    max_rmse: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    device=None,
    quiet: bool = False,
    distributed: bool | None = None,
) -> ARAResult:
    """Accuracy-robustness area over the first ``n`` samples of ``data``.

    For each sample, r_i = the smallest RMSE ‖δ‖₂/√d of a successful perturbation found by a
    minimal-norm L2 attack; clean errors count as r_i = 0. Then ARA = ∫₀^∞ max(0, acc(r) - 1/C) dr,
    acc(r) = fraction of samples with r_i > r (``ara_from_radii``).

    The minimal-norm attack (fastrob's choice; the authors use a 450-step momentum l2-min attack):
    bisection on the radius, per sample and batched, over PGD-L2 (``fastrob.attacks.pgd``, random
    start off so the search is deterministic, ``steps`` steps of 2.5·eps/steps). The bracket starts
    at [0, max_rmse]; each of the ``search_steps`` rounds attacks every sample at the midpoint of its
    own bracket (a per-sample eps) and halves the bracket. r_i is the RMSE of the smallest successful
    perturbation actually found (an upper bound of the true minimum; the bracket bounds the search
    error by max_rmse/2^search_steps). A sample never fooled within max_rmse gets r_i = max_rmse,
    which makes the area a lower bound in that case.

    kind="attack": success is argmax f(x+δ) ≠ y (PGD on the CW margin, with early stop and
        compaction: ``robust_only``). kind="btr" (better than random): success is p_y(x+δ) <= 1/C
        (PGD on the cross-entropy, which is -log p_y, last iterate); clean "errors" are p_y(x) <= 1/C.

    Distributed: as ``robust_accuracy`` (``n`` is global; each rank searches its shard's radii, the
    radii are gathered in the sampler's order and every rank gets the same area). The search has
    no random start, so the result equals the single-process one on the same samples.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    n = check_int("n", n, 1)
    steps = check_int("steps", steps, 1)
    search_steps = check_int("search_steps", search_steps, 1)
    max_rmse = check_positive("max_rmse", max_rmse)
    model = unwrap(model)
    device = model_device(model, device)
    part = shard(data, n, distributed)
    generator = torch.Generator(device=device).manual_seed(seed + (part.rank if part else 0))
    all_radii, n_correct, num_classes = [], 0, None
    for x, y in batches(data, batch_size, device, desc=f"ARA ({kind})", quiet=quiet, limit=n, shard=part):
        logits = clean_logits(model, x, y)
        num_classes = logits.shape[1]
        correct = _success(logits, y, kind).logical_not()
        n_correct += int((logits.argmax(1) == y).sum())
        radii = torch.zeros(len(y), dtype=torch.float64, device=device)
        rows = correct.nonzero().squeeze(1)
        if len(rows):
            radii[rows] = _minimal_rmse(model, x[rows], y[rows], kind, steps, search_steps, max_rmse, generator)
        all_radii.append(radii.cpu())
    radii = torch.cat(all_radii) if all_radii else torch.zeros(0, dtype=torch.float64)
    if part is not None:  # before any raise: a rank with an empty shard must still join
        radii, n_correct = part.gather(radii), int(part.sum(n_correct))
        num_classes = all_reduce_max(-1 if num_classes is None else num_classes)
        num_classes = None if num_classes < 0 else num_classes
    if num_classes is None:
        raise ValueError("data holds no samples")
    return ARAResult(
        ara_from_radii(radii, num_classes), radii.float(), kind, num_classes, n_correct / len(radii), max_rmse
    )


def _success(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "attack":
        return logits.argmax(1) != y
    p_y = F.softmax(logits.float(), dim=1).gather(1, y[:, None]).squeeze(1)
    return p_y <= 1.0 / logits.shape[1]


def _minimal_rmse(model, x, y, kind, steps, search_steps, max_rmse, generator) -> torch.Tensor:
    """Per-sample bisection on the RMSE radius over batched PGD-L2 (see ``ara``)."""
    root_d = math.sqrt(x[0].numel())
    lo = torch.zeros(len(y), dtype=torch.float64, device=x.device)
    hi = torch.full_like(lo, max_rmse)
    best = torch.full_like(lo, max_rmse)
    for _ in range(search_steps):
        mid = (lo + hi) / 2
        eps = mid * root_d
        ball = dict(eps=eps, alpha=default_alpha(eps, steps), steps=steps, norm="l2", random_start=False)
        if kind == "attack":
            x_adv, fooled = pgd(
                model, x, y, loss="margin", robust_only=True, return_fooled=True, generator=generator, **ball
            )
        else:
            x_adv = pgd(model, x, y, loss="ce", generator=generator, **ball)
            fooled = _success(clean_logits(model, x_adv), y, kind)
        found = (x_adv - x).flatten(1).double().norm(dim=1) / root_d
        best = torch.where(fooled, torch.minimum(best, found), best)
        hi = torch.where(fooled, mid, hi)
        lo = torch.where(fooled, lo, mid)
    return best
