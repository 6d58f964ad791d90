"""Seed 004's robustness metric: the upper bound of prediction divergence in the eps-ball."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fastrob._checks import check_float, check_int
from fastrob.attacks.pgd import kl_loss, pgd
from fastrob.metrics._common import batches, clean_logits, model_device


@dataclass
class KLRobustness:
    """mean: the average of psi(x) over the data; values: psi per sample [n]; quantiles: the 10%,
    50%, 90% quantiles of psi (its distribution, which the paper's normalisation leaves open)."""

    mean: float
    values: torch.Tensor = field(repr=False)
    eps: float
    norm: str
    steps: int

    @property
    def quantiles(self) -> dict:
        if not len(self.values):
            return {}
        q = torch.quantile(self.values.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
        return {"q10": float(q[0]), "median": float(q[1]), "q90": float(q[2])}

    def as_dict(self) -> dict:
        return {"mean": self.mean, "eps": self.eps, "norm": self.norm, "steps": self.steps, "n": len(self.values),
                **self.quantiles}


def kl_robustness(model, data, eps: float, norm: str = "linf", steps: int = 10, *, alpha: float | None = None,
                  seed: int = 0, batch_size: int = 256, device=None, quiet: bool = False,
                  n: int | None = None) -> KLRobustness:
    """psi(x) = max_{‖δ‖ <= eps, x+δ ∈ [0,1]} KL(p(x) ‖ p(x + δ)) per sample (Yu et al. 2019), and its mean.

    The max is found as in TRADES' inner maximisation: ``steps`` PGD steps of size ``alpha``
    (default 2.5·eps/steps) ascending the KL (``fastrob.attacks.pgd`` with loss="kl", no early
    stop) from x + 0.001·N(0, 1), since the KL has zero gradient at δ = 0; psi is the KL at the last
    iterate. Gradient ascent finds a point of the ball, so what is reported is the paper's bound as
    ascent estimates it: never above the true maximum, and (the tests check) above the KL at random
    points of the ball. Labels are not used: the divergence is from the model's own prediction.
    """
    eps = check_float("eps", eps, min_value=0.0)
    steps = check_int("steps", steps, 0)
    alpha = 2.5 * eps / max(steps, 1) if alpha is None else check_float("alpha", alpha, min_value=0.0)
    device = model_device(model, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    values = []
    for x, y in batches(data, batch_size, device, desc=f"KL bound ({norm}, eps={eps:g})", quiet=quiet, limit=n):
        p = F.softmax(clean_logits(model, x), dim=1)
        if eps == 0:
            values.append(torch.zeros(len(y)))
            continue
        x_adv = pgd(model, x, None, eps=eps, alpha=alpha, steps=steps, norm=norm, random_start="trades", loss="kl",
                    generator=generator)
        kl = kl_loss(clean_logits(model, x_adv), p)
        values.append(kl.clamp_min(0).cpu())
    values = torch.cat(values) if values else torch.zeros(0)
    return KLRobustness(float(values.mean()) if len(values) else 0.0, values, eps, norm, steps)
