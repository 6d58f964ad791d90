"""The gradient-masking checks' definitions and thresholds, and the cheap ones on one batch.

The checks are defined in ``fastrob.metrics.masking`` (its docstring), whose ``masking_report`` runs
all seven. They live here, below both the report and ``fastrob.attacks.autoattack``, because
AutoAttack's "fast" version runs the cheap ones as its guard: it skips its black-box stages only when
none of them is suspicious.

The cheap checks (``CHEAP_CHECKS``) need no Square and no long attack: ``probabilities`` and
``randomized`` (two forwards), ``zero_gradients`` (one backward) and ``large_eps`` (the gradient
attacks at a radius that reaches a gray image; on an honest model they succeed within a few steps
and each point leaves the attack as soon as it is broken). ``cheap_checks`` runs them on the
samples given, all of them, with the report's definitions and thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastrob.attacks.apgd import apgd
from fastrob.attacks.config import check_norm
from fastrob.attacks.state import attack_context

# Checks that count samples need MIN_COUNT of them as well as the threshold: on a small n one or two
# near-boundary points that a random search happens to break are noise, not masking.
MIN_COUNT = 3
THRESHOLDS = {
    "black_box": 0.02,
    "large_eps": 0.05,
    "convergence": 0.05,
    "zero_gradients": 0.05,
    "randomized": 0.0,
    "probabilities": 0.5,
    "ce_vs_dlr": 0.10,
}
DESCRIPTIONS = {
    "black_box": "fraction broken by Square but by no gradient attack",
    "large_eps": "robust accuracy at a radius that reaches a gray image",
    "convergence": "robust accuracy drop under a stronger gradient attack",
    "zero_gradients": "fraction of clean points with zero / non-finite CE input gradient",
    "randomized": "fraction of samples whose two forwards differ",
    "probabilities": "fraction of output rows that are probability vectors",
    "ce_vs_dlr": "|robust accuracy CE - DLR|",
}
CHEAP_CHECKS = ("probabilities", "randomized", "zero_gradients", "large_eps")


@dataclass
class MaskingCheck:
    """One check: its ``value``, the ``threshold`` above which it is suspicious (None: not run)."""

    name: str
    value: float | None
    threshold: float
    description: str
    count: int | None = None  # the samples behind ``value``, for the checks that count attacked samples

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "n/a"
        enough = self.count is None or self.count >= MIN_COUNT
        return "suspicious" if self.value > self.threshold and enough else "ok"

    def as_dict(self) -> dict:
        return {
            "value": self.value,
            "threshold": self.threshold,
            "verdict": self.verdict,
            "count": self.count,
            "description": self.description,
        }


def check_classifier_logits(logits: torch.Tensor) -> None:
    """The clean logits [B, C] the checks start from must be finite, with at least 2 classes."""
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("model returned non-finite logits on the clean data")
    if logits.shape[1] < 2:  # one class: nothing to attack, every check would be noise
        raise ValueError(
            f"model must return at least 2 logits per sample (a classifier) for the masking checks, "
            f"got {logits.shape[1]}"
        )


def gradient_losses(n_classes: int) -> tuple[str, ...]:
    """The gradient attacks' losses: CE and DLR, or CE alone below 3 classes (DLR needs 3)."""
    return ("ce", "dlr") if n_classes >= 3 else ("ce",)


def gradient_attack_fooled(model, x, y, *, eps, norm, loss, steps, restarts, seed, model_training=False):
    """Whether APGD with ``loss`` ("ce" | "dlr") breaks each sample of (x, y)."""
    _, fooled = apgd(
        model,
        x,
        y,
        eps=eps,
        norm=norm,
        steps=steps,
        n_restarts=restarts,
        loss=loss,
        seed=seed,
        model_training=model_training,
        return_fooled=True,
    )
    return fooled


def fooled_by_any(attack, idx, losses, **kwargs) -> torch.Tensor:
    """Whether a gradient attack breaks each sample of ``idx``: ``attack(part, loss=loss, **kwargs)``
    (a fooled mask over ``part``) with each of ``losses`` in turn, each on what the earlier left."""
    fooled = torch.zeros(len(idx), dtype=torch.bool, device=idx.device)
    for loss in losses:
        rest = (~fooled).nonzero().squeeze(1)
        if len(rest):
            fooled[rest] = attack(idx[rest], loss=loss, **kwargs)
    return fooled


def default_large_eps(norm: str, x) -> float:
    """The large-eps check's radius: one that reaches a uniform gray image (0.5 Linf, 0.5·√D L2)."""
    return 0.5 if norm == "linf" else 0.5 * math.sqrt(x[0].numel())


def large_eps_fraction(attack, alive, losses, *, eps, steps, total) -> float:
    """The ``large_eps`` check: the fraction of the ``total`` samples that the gradient attacks
    (``attack`` as in ``fooled_by_any``) leave robust at the large radius ``eps``, among ``alive``."""
    large = fooled_by_any(attack, alive, losses, eps=eps, steps=steps, restarts=1)
    return float((~large).sum()) / total


def probability_fraction(logits) -> float:
    """Fraction of the rows of ``logits`` that are probability vectors (non-negative, summing to 1)."""
    rows_are_probabilities = (logits.min(1).values >= -1e-6) & ((logits.sum(1) - 1).abs() <= 1e-4)
    return float(rows_are_probabilities.float().mean())


def randomized_fraction(model, x, model_training: bool | Callable = False) -> float:
    """Fraction of (up to 64) samples whose logits differ between two forwards in the attacks' mode
    (``model_training``, see ``attack_context``; False: eval)."""
    with attack_context(model, model_training), torch.no_grad():
        probe = x[:64]
        first, second = model(probe).float(), model(probe).float()
    scale = 1e-5 * (1 + first.abs().amax(1))
    return float(((first - second).abs().amax(1) > scale).float().mean())


def zero_gradient_fraction(model, x, y, batch_size, model_training: bool | Callable = False) -> float:
    """Fraction of samples whose input gradient of CE(model(x), y) is all zero or has a non-finite entry."""
    bad = 0
    with attack_context(model, model_training):
        for i in range(0, len(y), batch_size):
            inp = x[i : i + batch_size].detach().requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(model(inp).float(), y[i : i + batch_size], reduction="sum")
                grad = torch.autograd.grad(loss, inp)[0].flatten(1)
            bad += int(((grad == 0).all(1) | ~torch.isfinite(grad).all(1)).sum())
    return bad / len(y)


def forward_checks(model, x, y, logits, alive, batch_size, model_training: bool | Callable = False) -> dict:
    """{"probabilities", "randomized", "zero_gradients"}: the checks that need no attack, on the clean
    ``logits`` of (x, y); ``zero_gradients`` looks at the correctly classified ``alive`` (None: none)."""
    values = {
        "probabilities": probability_fraction(logits),
        "randomized": randomized_fraction(model, x, model_training),
    }
    values["zero_gradients"] = (
        zero_gradient_fraction(model, x[alive], y[alive], batch_size, model_training) if len(alive) else None
    )
    return values


def cheap_checks(
    model, x, y, norm: str = "linf", *, steps: int = 25, seed: int = 0, model_training: bool | Callable = False
) -> list[MaskingCheck]:
    """The checks ``CHEAP_CHECKS`` (module docstring) for ``model`` on the batch (x, y), every forward
    and attack with the model in the mode ``model_training`` (see ``attack_context``; False: eval)."""
    check_norm(norm)
    with attack_context(model, model_training), torch.no_grad():
        logits = model(x)
    check_classifier_logits(logits)
    alive = (logits.argmax(1) == y).nonzero().squeeze(1)

    def attack(idx, **kwargs):
        return gradient_attack_fooled(
            model, x[idx], y[idx], norm=norm, seed=seed, model_training=model_training, **kwargs
        )

    losses = gradient_losses(logits.shape[1])
    large = large_eps_fraction(attack, alive, losses, eps=default_large_eps(norm, x), steps=steps, total=len(y))
    values = forward_checks(model, x, y, logits, alive, len(y), model_training)
    values["large_eps"] = large
    return [MaskingCheck(name, value, THRESHOLDS[name], DESCRIPTIONS[name]) for name, value in values.items()]
