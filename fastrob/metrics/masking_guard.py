"""The gradient-masking report's cheap checks (``fastrob.metrics.masking``) on one batch: the guard of
AutoAttack's "fast" version (``fastrob.attacks.autoattack``), which skips the black-box stages only
when none of them is suspicious.

The cheap checks are those that need no Square and no long attack: ``probabilities`` and
``randomized`` (two forwards), ``zero_gradients`` (one backward) and ``large_eps`` (the gradient
attacks at a radius that reaches a gray image; on an honest model they succeed within a few steps
and each point leaves the attack as soon as it is broken). Their definitions and thresholds are the
report's; they run on the samples given, all of them.
"""

from __future__ import annotations

import torch

from fastrob.attacks import attack_context, check_norm
from fastrob.metrics.masking import (
    DESCRIPTIONS,
    THRESHOLDS,
    MaskingCheck,
    _gradient_attack,
    _probability_fraction,
    _randomized_fraction,
    _zero_gradient_fraction,
    default_large_eps,
    fooled_by_any,
)

CHEAP_CHECKS = ("probabilities", "randomized", "zero_gradients", "large_eps")


def cheap_checks(model, x, y, norm: str = "linf", *, steps: int = 25, seed: int = 0) -> list[MaskingCheck]:
    """The checks ``CHEAP_CHECKS`` (module docstring) for ``model`` on the batch (x, y)."""
    check_norm(norm)
    with attack_context(model), torch.no_grad():
        logits = model(x)
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("model returned non-finite logits on the clean data")
    alive = (logits.argmax(1) == y).nonzero().squeeze(1)

    def attack(idx, **kwargs):
        return _gradient_attack(model, x[idx], y[idx], norm=norm, seed=seed, **kwargs)

    losses = ("ce", "dlr") if logits.shape[1] >= 3 else ("ce",)  # DLR needs 3 classes
    large = fooled_by_any(attack, alive, losses, eps=default_large_eps(norm, x), steps=steps, restarts=1)
    values = {
        "probabilities": _probability_fraction(logits),
        "randomized": _randomized_fraction(model, x),
        "zero_gradients": _zero_gradient_fraction(model, x[alive], y[alive], len(y)) if len(alive) else None,
        "large_eps": float((~large).sum()) / len(y),
    }
    return [MaskingCheck(name, value, THRESHOLDS[name], DESCRIPTIONS[name]) for name, value in values.items()]
