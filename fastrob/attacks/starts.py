"""Random starts: PGD's, drawn exactly as torchattacks draws them (so that the same seed gives the
same start), and the sphere starts of APGD and FAB; and the attacks' private random generator."""

from __future__ import annotations

import torch

from fastrob._checks import check_int
from fastrob.attacks.numerics import DIVISION_EPS
from fastrob.ops._common import per_sample_view
from fastrob.ops.pgd_step import perturbation_norm


def make_generator(seed: int | None, device) -> torch.Generator:
    """A torch.Generator on ``device`` seeded with ``seed`` (an int >= 0; None: drawn from the
    global RNG), so that an attack never reseeds torch's global RNG (torchattacks does)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    seed = check_int("seed", seed, 0)
    return torch.Generator(device=device).manual_seed(seed)


def sphere_start(x: torch.Tensor, radius, norm: str, generator=None) -> torch.Tensor:
    """x + δ with ‖δ‖ = radius (a float or per-sample [B]), clamped to [0, 1]: APGD's start
    (radius eps) and FAB's restarts (radius eps/2). Linf: t ~ U(-1, 1) per element scaled so that
    its largest |t_i| is the radius; L2: t ~ N(0, I) scaled to norm radius."""
    if norm == "linf":
        t = torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator) * 2 - 1
    else:
        t = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    size = perturbation_norm(t, norm).clamp_min(DIVISION_EPS)
    return torch.clamp(x + t * per_sample_view(radius / size, x), 0, 1)


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
