"""Adversarial explanations (Woods, Chen & Teuscher, Nature MI 2019; docs/methods.md#adversarial-explanations): move
an input a small RMSE distance toward a target class, so that the change shows what the model
needs to see for that class. On a robust model the change looks like the class's features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastrob._checks import check_int, check_logits, check_positive
from fastrob._progress import progress
from fastrob.attacks.numerics import RMS_EPS
from fastrob.attacks.state import attack_context, check_attack_inputs
from fastrob.distributed import unwrap


def rmse(delta: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square of a [B, ...] perturbation: ||delta_b||_2 / sqrt(d)."""
    return delta.flatten(1).pow(2).mean(1).sqrt()


def step_sizes(rho: float, overshoot: float, steps: int) -> list[float]:
    """The linearly decaying step sizes a_k = rho * overshoot * (T - k) / (T (T + 1) / 2),
    k = 0..T-1, which sum to rho * overshoot."""
    total = rho * overshoot
    return [total * (steps - k) / (steps * (steps + 1) / 2) for k in range(steps)]


def adversarial_explanation(
    model,
    x: torch.Tensor,
    target,
    rho: float = 0.1,
    overshoot: float = 5.0,
    steps: int = 35,
    *,
    project: bool = True,
    quiet: bool = True,
) -> torch.Tensor:
    """Woods et al.'s explanation of ``target`` for each input: x_expl = clamp(x + delta, 0, 1).

    With delta_0 = 0 and a_k the step sizes of ``step_sizes`` (T = ``steps``, summing to
    rho * overshoot), for k = 0..T-1, per sample:
        if RMSE(delta_k) < rho:  v = -∇_x CE(f(x + delta_k), target)   (descend toward the target)
        else:                    v = -delta_k                           (step back toward x)
        delta_{k+1} = clamp(x + delta_k + a_k v / (RMS(v) + 1e-8), 0, 1) - x
    (the authors' code, cleaned-up CIFAR reproduction, without its optional momentum; their code
    does not clamp to [0, 1], fastrob does, which never increases |delta| since x is in [0, 1]).
    The gradient is of the summed CE, so samples do not interact (the model runs in eval mode).

    What is guaranteed about the size: a step from inside the ball (RMSE < rho) adds at most a_k
    to the RMSE, a step from outside (RMSE >= rho) maps it to |RMSE - a_k|; since a_{k-1} - a_k =
    a_{T-1}, by induction RMSE(delta_{k+1}) <= rho + a_k, so the scheme ends with
    RMSE(delta_T) <= rho + a_{T-1} = rho * (1 + 2 overshoot / (T (T + 1))) (rho * 1.0079 with the
    defaults), and it can end above rho. With ``project=True`` (default) a final projection
    rescales delta_T by rho / RMSE where RMSE > rho (a point of the segment from x to x + delta_T,
    so still in [0, 1]), which guarantees RMSE(x_expl - x) <= rho up to float rounding;
    ``project=False`` returns the paper's iterate.

    The model runs in eval mode with its parameters frozen; every module's mode and every
    parameter's requires_grad are restored afterwards (``attack_context``).

    Args:
        model: maps x [B, ...] to logits [B, C].
        x: inputs in [0, 1], [B, ...].
        target: the class to explain, an int (the same for every sample) or a [B] tensor of labels.
        rho: the RMSE budget, > 0 (default 0.1).
        overshoot: the step sizes sum to rho * overshoot, > 0 (default 5).
        steps: T >= 1 (default 35).
        project: rescale the final perturbation into the RMSE ball (see above).
        quiet: hide the progress bar over the steps.

    Returns:
        x_expl, x's shape and dtype, in [0, 1], no grad.
    """
    check_attack_inputs(model, x, None, clamp_input=None, name="adversarial_explanation")
    model = unwrap(model)  # a DDP model's wrapped module: attacks never communicate
    rho = check_positive("rho", rho)
    overshoot = check_positive("overshoot", overshoot)
    steps = check_int("steps", steps, 1)
    batch = x.shape[0]
    target = check_targets(target, batch, x.device)
    x = x.detach()
    delta = torch.zeros_like(x)
    view = (-1,) + (1,) * (x.dim() - 1)
    with attack_context(model), torch.enable_grad():
        for k, a in enumerate(
            progress(step_sizes(rho, overshoot, steps), desc="explanation", unit="steps", disable=quiet)
        ):
            inp = (x + delta).requires_grad_(True)
            logits = model(inp)
            if k == 0:
                check_logits(logits, batch, target)
            ce = F.cross_entropy(
                logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, target, reduction="none"
            )
            (grad,) = torch.autograd.grad(ce.sum(), inp)
            inside = (rmse(delta) < rho).view(view)
            v = torch.where(inside, -grad.to(x.dtype), -delta)
            v = v / (rmse(v).view(view) + RMS_EPS)
            delta = (x + delta + a * v).clamp_(0, 1) - x
    if project:
        r = rmse(delta)
        scale = torch.where(r > rho, rho / r.clamp_min(torch.finfo(r.dtype).tiny), torch.ones_like(r))
        delta = delta * scale.view(view)
    return (x + delta).clamp_(0, 1)


def check_targets(target, batch: int, device) -> torch.Tensor:
    """target (an int or a [B] or 0-dim integer tensor) as [B] int64 class indices on ``device``."""
    if isinstance(target, bool):
        raise TypeError("target must be an int class index or a [B] tensor of class indices, got bool")
    if isinstance(target, int):
        if target < 0:
            raise ValueError(f"target must be a class index >= 0, got {target}")
        return torch.full((batch,), target, dtype=torch.long, device=device)
    if not isinstance(target, torch.Tensor):
        raise TypeError(
            f"target must be an int class index or a [B] tensor of class indices, got {type(target).__name__}"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if target.dim() == 0:
        target = target.expand(batch)
    if target.shape != (batch,):
        raise ValueError(f"target must be an int or a tensor of shape [batch] = ({batch},), got {tuple(target.shape)}")
    return target.to(device=device, dtype=torch.long)
