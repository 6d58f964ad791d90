"""Random starts of PGD, drawn exactly as torchattacks draws them (so that the same seed gives the
same start)."""

from __future__ import annotations

import torch

from fastrob.ops._common import per_sample_view


def draw_start(x: torch.Tensor, eps, kind, norm: str, generator=None) -> torch.Tensor:
    """One start for the whole batch x (kind as checked by ``config.check_random_start``; eps a
    float or a per-sample [B] tensor):
      False: x itself; True: "uniform" for Linf, "normal" for L2;
      "uniform": x + U(-eps, eps) per element, clamped to [0, 1];
      "normal":  x + eps·U(0, 1)·g/‖g‖₂ with g ~ N(0, I) (torchattacks' L2 start), clamped to [0, 1];
      "trades":  x + 0.001·N(0, 1), projected into the ball but, as in the TRADES reference, not
                 clamped (the first step clamps it): the KL is 0 with zero gradient at x' = x."""
    if kind is False:
        return x.clone()
    if kind is True:
        kind = "uniform" if norm == "linf" else "normal"
    if kind == "uniform":
        if isinstance(eps, torch.Tensor):
            delta = torch.empty_like(x).uniform_(-1, 1, generator=generator) * per_sample_view(eps, x)
        else:
            delta = torch.empty_like(x).uniform_(-eps, eps, generator=generator)
        return torch.clamp(x + delta, 0, 1)
    if kind == "normal":
        delta = torch.empty_like(x).normal_(generator=generator)
        n = delta.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (x.dim() - 1)))
        r = torch.zeros_like(n).uniform_(0, 1, generator=generator)
        delta *= r / n * per_sample_view(eps, x)
        return torch.clamp(x + delta, 0, 1)
    delta = 0.001 * torch.empty_like(x).normal_(generator=generator)
    e = per_sample_view(eps, x)
    if norm == "linf":
        delta = torch.clamp(delta, -e, e)
    else:
        n = delta.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
        delta = delta * torch.clamp(e / n.clamp_min(1e-30), max=1.0)
    return x + delta
