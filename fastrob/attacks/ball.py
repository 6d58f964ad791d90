"""The threat model an attack's output must respect: inside the eps-ball around x and the box
[0, 1], finite. One rule, with one rounding slack, for AutoAttack's check of every broken point
(``inside_ball``) and the metrics' check of any attack's output (``check_attack_output``)."""

from __future__ import annotations

import torch

from fastrob.ops._common import accumulate_dtype
from fastrob.ops.pgd_step import NORMS, perturbation_norm

# the least slack of the ball and box checks: float32 rounding of x + delta
BALL_SLACK = 1e-5
# the relative slack of the radius: eps itself rounded to x's dtype, and a norm summed in float32
RADIUS_SLACK = 1e-4

# torchattacks' classes carry eps but no norm: their norm, by class (only for torchattacks' own classes)
_TORCHATTACKS_NORMS = {
    **dict.fromkeys(("PGD", "FGSM", "FFGSM", "RFGSM", "BIM", "MIFGSM", "TPGD"), "linf"),
    "PGDL2": "l2",
}


def box_slack(dtype: torch.dtype) -> float:
    """The slack for rounding: x + delta stored in ``dtype`` (half precision rounds at ~5e-4)."""
    return BALL_SLACK + 4 * torch.finfo(dtype).eps if dtype.is_floating_point else BALL_SLACK


def _distance_bound(eps: float, norm: str, dim: int, slack: float) -> float:
    """The largest distance accepted as inside the ball of radius eps (an l2 norm sums ``dim``
    entries, each rounded by up to ``slack``)."""
    return eps * (1 + RADIUS_SLACK) + slack * (dim**0.5 if norm == "l2" else 1)


def _distance(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    compute = accumulate_dtype(x_adv.dtype) if x_adv.is_floating_point() else torch.float32
    delta = (x_adv.detach().to(compute) - x.detach().to(compute)).flatten(1)
    return perturbation_norm(delta, norm)


def inside_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Per row [B] bool: x_adv is finite, in [0, 1] and within ``eps`` of x in ``norm`` ("linf" |
    "l2"), up to the rounding slack of x_adv's dtype (``box_slack``)."""
    slack = box_slack(x_adv.dtype)
    flat = x_adv.detach().flatten(1)
    in_box = (flat.amin(1) >= -slack) & (flat.amax(1) <= 1 + slack)
    near = _distance(x_adv, x, norm) <= _distance_bound(eps, norm, flat.shape[1], slack)
    return near & in_box & torch.isfinite(flat).all(1)


def attack_ball(attack) -> tuple[str, float] | None:
    """(norm, eps) of an attack that exposes them (fastrob's and torchattacks' attack objects have
    ``eps``; the norm is ``norm`` or, for torchattacks' classes, the class's: PGDL2 is l2, PGD and
    FGSM linf), or None when its ball is unknown (a plain function)."""
    eps = getattr(attack, "eps", None)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return None
    norm = getattr(attack, "norm", None)
    if isinstance(norm, str):
        norm = norm.lower()
    elif type(attack).__module__.split(".")[0] == "torchattacks":
        norm = _TORCHATTACKS_NORMS.get(type(attack).__name__)
    return (norm, float(eps)) if norm in NORMS else None


def check_attack_output(x_adv, x: torch.Tensor, ball: tuple[str, float] | None) -> None:
    """An attack's output must be a tensor of x's shape, finite, in [0, 1] and, when the attack's
    ball is known (``attack_ball``), within eps of x: otherwise the accuracy on it means nothing."""
    if not isinstance(x_adv, torch.Tensor):
        raise TypeError(f"attack(x, y) must return a tensor of adversarial images, got {type(x_adv).__name__}")
    if x_adv.shape != x.shape:
        raise ValueError(
            f"attack(x, y) must return images of the shape of x {tuple(x.shape)}, got {tuple(x_adv.shape)}"
        )
    n_bad = int((~torch.isfinite(x_adv)).flatten(1).any(1).sum())
    if n_bad:
        raise ValueError(f"attack(x, y) returned non-finite (NaN or inf) images for {n_bad} of {len(x)} samples")
    slack = box_slack(x_adv.dtype)
    low, high = float(x_adv.min()), float(x_adv.max())
    if low < -slack or high > 1 + slack:
        raise ValueError(f"attack(x, y) returned images outside [0, 1] (values in [{low:.4g}, {high:.4g}])")
    if ball is not None:
        norm, eps = ball
        if not bool(inside_ball(x_adv, x, eps, norm).all()):
            worst = float(_distance(x_adv, x, norm).max())
            raise ValueError(
                f"attack(x, y) returned images outside its {norm} ball of eps={eps:g} (largest distance {worst:.4g})"
            )
