"""Adversarial training objectives: Madry PGD-AT, TRADES and the half-and-half training of
Woods et al. 2019 (docs/methods.md: PGD-AT, TRADES, half-and-half). The loop that trains with
them is ``fastrob.trainer``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastrob._checks import check_float, check_tensor
from fastrob.attacks.losses import kl_loss
from fastrob.attacks.torchattacks_compat import Attack
from fastrob.distributed import unwrap
from fastrob.objective import Objective

KINDS = ("pgd", "trades", "half")


def adversarial_loss(
    model, x: torch.Tensor, y: torch.Tensor, attack, kind: str = "pgd", beta: float = 6.0
) -> Objective:
    """The adversarial training objective for one batch; call ``.loss.backward()`` to train.

    kind="pgd" (Madry et al. 2018):  L = mean_b CE(f(x'_b), y_b),  x' = attack(x, y).
    kind="trades" (Zhang et al. 2019):
        L = mean_b CE(f(x_b), y_b) + beta · mean_b KL(f(x_b) ‖ f(x'_b)),
        x' ≈ argmax_{x' ∈ B(x, eps)} KL(f(x) ‖ f(x')), found with the attack's eps, alpha, steps and
        norm from x + 0.001·N(0, 1) (a fastrob attack is switched to that loss and start; any
        other callable ``attack(x, y)`` is used as the adversary as it is).
    kind="half" (Woods et al. 2019): the first ⌊B/2⌋ samples are replaced by attack(x, y), the
        rest stay clean, and L = mean CE over the mixed batch.

    Under ``DistributedDataParallel`` pass the DDP model: the attack runs the wrapped module (no
    communication), the loss makes one DDP forward (TRADES' second forward runs the wrapped module)
    and ``.loss.backward()`` reduces the gradients once (docs/distributed.md).

    The attack runs with the model in eval mode (fastrob attacks restore the mode afterwards; use
    ``attack.set_model_training_mode`` to attack in train mode), so adversarial batches never move
    BatchNorm statistics; the forward passes of the loss run in the model's own mode.

    Returns:
        Objective(loss, ce, penalty, logits): ``penalty`` is the mean KL for TRADES and 0 otherwise;
        ``logits`` are those the CE used (adversarial, clean, or the mixed batch).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not callable(attack):
        raise TypeError(f"attack must be callable as attack(x, y) -> x_adv, got {type(attack).__name__}")
    beta = check_float("beta", beta, min_value=0.0)
    check_tensor("x", x, min_dim=2)
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],):
        raise ValueError(
            f"y must be a tensor of labels of shape ({x.shape[0]},), got "
            f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}"
        )

    zero = x.new_zeros(())
    if kind == "pgd":
        logits = model(_adversary(attack, x, y))
        ce = F.cross_entropy(logits, y)
        return Objective(loss=ce, ce=ce, penalty=zero, logits=logits)
    if kind == "half":
        half = x.shape[0] // 2
        mixed = torch.cat([_adversary(attack, x[:half], y[:half]), x[half:]]) if half else x
        logits = model(mixed)
        ce = F.cross_entropy(logits, y)
        return Objective(loss=ce, ce=ce, penalty=zero, logits=logits)
    if isinstance(attack, Attack):
        x_adv = attack(x, None, loss="kl", random_start="trades", restarts=1, robust_only=False, early_stop=False)
    else:
        x_adv = _adversary(attack, x, y)
    logits = model(x)
    ce = F.cross_entropy(logits, y)
    # Under DDP the second forward skips the wrapper: one reducer preparation and one buffer
    # broadcast per step; its graph reaches the same parameters, reduced once by the backward.
    kl = kl_loss(unwrap(model)(x_adv), F.softmax(logits, dim=1)).mean()
    return Objective(loss=ce + beta * kl, ce=ce, penalty=kl, logits=logits)


def _adversary(attack, x, y):
    # The perturbation is data, not part of the graph: no gradient flows back into the attack.
    return attack(x, y).detach()
