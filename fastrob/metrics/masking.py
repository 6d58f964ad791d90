"""A gradient-masking report: the checks the literature asks for before a robust accuracy measured by
gradient attacks is believed (Athalye et al. 2018; Carlini et al. 2019, "On evaluating adversarial
robustness"; Croce & Hein 2020).

``masking_report(model, data, eps, norm)`` runs seven checks on up to ``n`` samples, each giving a
number, the threshold it is compared with and a verdict ("ok" or "suspicious"); the report is
suspicious when any check is. The gradient attacks are APGD with the cross-entropy (CE) and with
the scale-invariant DLR loss (``fastrob.attacks.apgd``; PGD with the CE and the margin loss where
APGD is missing), the black-box attack is Square (``fastrob.attacks.square``).

1. ``black_box``: the fraction of the samples that Square breaks although both gradient attacks
   failed on them. Square sees only scores, so on a model with honest gradients it is weaker than
   APGD; a gradient attack beaten by a score-based search is not following the loss. Suspicious
   above 2% (honest digits models: 0-0.7%, single near-boundary points a random search happens on).
2. ``large_eps``: robust accuracy under the gradient attacks at a radius where every image can be
   moved to a uniform gray one (Linf 0.5; L2 0.5·√D, which contains that Linf ball), so that an
   attack that works leaves (almost) nothing robust. Suspicious above 5%.
3. ``convergence``: how much a stronger run (``strong_factor`` times the iterations, 2 restarts)
   lowers the robust accuracy of the base gradient attacks. A converged attack changes little;
   a large drop says the base numbers are not a bound yet. Suspicious above 5 points (honest digits
   models: 0-2.7; PGD-20 is 1.6-2.9 points above AutoAttack on them, the scale of honest slack).
4. ``zero_gradients``: the fraction of clean, correctly classified samples whose input gradient
   of the CE loss is exactly zero or not finite. Float32 CE gradients vanish only when the logit
   gap exceeds ~100 or a layer has no gradient (rounding, thresholds): the attacks then cannot
   move. Suspicious above 5%.
5. ``randomized``: the fraction of samples whose logits differ between two forwards of the same
   input in eval mode (beyond 1e-5 relative, which nondeterministic kernels stay under). A
   randomized model needs expectation over transformation (AutoAttack's "rand" version).
   Suspicious above 0.
6. ``probabilities``: the fraction of output rows that are non-negative and sum to 1 (within 1e-4):
   a model returning probabilities rather than logits, whose CE is computed on the wrong quantity and
   saturates. Suspicious above 50%.
7. ``ce_vs_dlr``: |robust accuracy under APGD-CE - under APGD-DLR|. DLR is invariant to shifting and
   scaling the logits, so a strong disagreement points at logits that flatten the CE (a scaled or
   saturated head). Suspicious above 10 points (honest digits models: 0-2.7).

Checks 1, 3 and 7 count samples, and are suspicious only when at least ``MIN_COUNT`` = 3 samples are
behind the number: on a small n one or two near-boundary points are noise, not masking. All
fractions are of the n samples read. The honest-model ranges quoted above were measured on digits CNNs
(plain, PGD-trained, input-gradient penalty; n = 150, Linf 0.1 and L2 1.0); the planted kinds
(softmax output, rounding input layer, noisy logits, logits scaled by 1000) score 0.3-1.0 on their checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastrob._checks import check_float, check_int, check_positive
from fastrob._progress import progress
from fastrob.attacks import check_norm, square
from fastrob.attacks.masking_checks import (
    DESCRIPTIONS,
    MIN_COUNT,
    THRESHOLDS,
    MaskingCheck,
    check_classifier_logits,
    default_large_eps,
    fooled_by_any,
    forward_checks,
    gradient_attack_fooled,
    gradient_losses,
    large_eps_fraction,
)
from fastrob.attacks.state import check_attack_inputs
from fastrob.distributed import unwrap
from fastrob.metrics._common import batches, clean_logits, model_device

# the checks' definitions and thresholds live in fastrob.attacks.masking_checks, where AutoAttack's
# "fast" version runs the cheap ones; the report re-exports them
__all__ = ["DESCRIPTIONS", "MIN_COUNT", "THRESHOLDS", "MaskingCheck", "MaskingReport", "masking_report"]


@dataclass
class MaskingReport:
    """The checks (in the module docstring's order), the settings and the accuracies seen on the way:
    ``robust_accuracy`` is under all the attacks the report ran at ``eps`` together."""

    checks: list[MaskingCheck]
    eps: float
    norm: str
    n: int
    clean_accuracy: float
    robust_accuracy: float
    attacks: str
    robust: torch.Tensor = field(repr=False)

    @property
    def verdict(self) -> str:
        return "suspicious" if any(c.verdict == "suspicious" for c in self.checks) else "ok"

    @property
    def suspicious(self) -> list[str]:
        return [c.name for c in self.checks if c.verdict == "suspicious"]

    def __getitem__(self, name: str) -> MaskingCheck:
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(f"no check named {name!r}; the checks are {[c.name for c in self.checks]}")

    def as_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "eps": self.eps,
            "norm": self.norm,
            "n": self.n,
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": self.robust_accuracy,
            "attacks": self.attacks,
            "checks": {c.name: c.as_dict() for c in self.checks},
        }

    def table(self) -> str:
        lines = [
            f"gradient-masking report ({self.norm} eps={self.eps:g}, n={self.n}, {self.attacks}): {self.verdict}",
            f"{'check':<16}{'value':>9}{'limit':>9}  {'verdict':<11}what",
        ]
        for c in self.checks:
            value = "-" if c.value is None else f"{c.value:.4f}"
            lines.append(f"{c.name:<16}{value:>9}{c.threshold:>9.4f}  {c.verdict:<11}{c.description}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ----------------------------------------------------------------------------------------------
# the attacks the checks use: APGD (CE and DLR) and Square

# the attacks the report names as its own
ATTACK_NAMES = "APGD-CE/DLR, Square"


def _square(model, x, y, *, eps, norm, n_queries, seed):
    """Whether Square breaks each sample (NCHW x; see ``_square_available``)."""
    _, fooled = square(model, x, y, eps=eps, norm=norm, n_queries=n_queries, seed=seed, return_fooled=True)
    return fooled


# ----------------------------------------------------------------------------------------------
# the report


def masking_report(
    model,
    data,
    eps: float,
    norm: str = "linf",
    *,
    n: int | None = 500,
    steps: int = 25,
    strong_factor: int = 4,
    n_queries: int = 1000,
    large_eps: float | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device=None,
    quiet: bool = False,
) -> MaskingReport:
    """The gradient-masking checks (module docstring) for ``model`` on up to ``n`` samples of ``data``.

    Args:
        model: maps x [B, ...] in [0, 1] to logits [B, C].
        data: a pair (x, y) or a DataLoader of (x, y) batches.
        eps: the radius whose robust accuracy is in question; norm: "linf" or "l2".
        n: samples read (None: all).
        steps: iterations of the base gradient attacks; the convergence check runs
            ``strong_factor`` times as many, with 2 restarts.
        n_queries: Square's query budget.
        large_eps: the radius of the large-eps check (None: 0.5 Linf, 0.5·√D L2); one given must
            be larger than eps.
        seed: seeds every attack; batch_size: samples per attack call; quiet: no progress bar.
    """
    eps = check_positive("eps", eps)
    check_norm(norm)
    if n is not None:
        n = check_int("n", n, 1)
    steps = check_int("steps", steps, 1)
    strong_factor = check_int("strong_factor", strong_factor, 1)
    n_queries = check_int("n_queries", n_queries, 1)
    seed = check_int("seed", seed, 0)
    batch_size = check_int("batch_size", batch_size, 1)
    model = unwrap(model)
    device = model_device(model, device)
    parts = list(batches(data, batch_size, device, desc="masking report: data", quiet=True, limit=n))
    if not parts:
        raise ValueError("data holds no samples")
    x = torch.cat([p[0] for p in parts])
    y = torch.cat([p[1] for p in parts])
    check_attack_inputs(model, x, y, clamp_input=None, name="masking_report")
    if large_eps is None:
        large_eps = default_large_eps(norm, x)
    else:  # at a radius no larger than eps the attacks fail as at eps: a false "suspicious"
        large_eps = check_float("large_eps", large_eps, min_value=0.0)
        if large_eps <= eps:
            raise ValueError(f"large_eps must be larger than eps = {eps:g}, got {large_eps:g}")
    total = len(y)

    def chunks(idx):
        return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]

    def attack(idx, **kwargs):
        """Fooled mask over ``idx`` (indices into x) under the gradient attack ``kwargs``."""
        fooled = torch.zeros(len(idx), dtype=torch.bool, device=device)
        for k, part in enumerate(chunks(idx)):
            sl = slice(k * batch_size, k * batch_size + len(part))
            fooled[sl] = gradient_attack_fooled(model, x[part], y[part], norm=norm, seed=seed, **kwargs)
        return fooled

    stages = progress(total=7, desc="masking report", unit="checks", disable=quiet)
    checks = {}

    def done(name, value, count=None):
        checks[name] = MaskingCheck(
            name, None if value is None else float(value), THRESHOLDS[name], DESCRIPTIONS[name], count
        )
        stages.set_postfix_str(name)
        stages.update(1)

    try:
        logits = torch.cat([clean_logits(model, x[i], y[i]) for i in chunks(torch.arange(total, device=device))])
        check_classifier_logits(logits)
        correct = logits.argmax(1) == y
        alive = correct.nonzero().squeeze(1)
        for name, value in forward_checks(model, x, y, logits, alive, batch_size).items():
            done(name, value)

        losses = gradient_losses(logits.shape[1])
        fooled = [attack(alive, eps=eps, loss=loss, steps=steps, restarts=1) for loss in losses]
        gap = abs(int(fooled[0].sum()) - int(fooled[-1].sum()))
        done("ce_vs_dlr", gap / total if len(losses) == 2 else None, gap)
        survivors = alive[~torch.stack(fooled).any(0)]

        square_runs = _square_available(x)
        fooled_sq = torch.zeros(len(survivors), dtype=torch.bool, device=device)
        if square_runs and len(survivors):
            fooled_sq = torch.cat(
                [
                    _square(model, x[p], y[p], eps=eps, norm=norm, n_queries=n_queries, seed=seed)
                    for p in chunks(survivors)
                ]
            )
        done("black_box", int(fooled_sq.sum()) / total if square_runs else None, int(fooled_sq.sum()))

        strong = fooled_by_any(attack, survivors, losses, eps=eps, steps=steps * strong_factor, restarts=2)
        done("convergence", int(strong.sum()) / total, int(strong.sum()))

        done("large_eps", large_eps_fraction(attack, alive, losses, eps=large_eps, steps=steps, total=total))
    finally:
        stages.close()

    robust = torch.zeros(total, dtype=torch.bool, device=device)
    robust[survivors[~(strong | fooled_sq)]] = True
    order = ("black_box", "large_eps", "convergence", "zero_gradients", "randomized", "probabilities", "ce_vs_dlr")
    return MaskingReport(
        [checks[k] for k in order],
        eps,
        norm,
        total,
        float(correct.float().mean()),
        float(robust.float().mean()),
        ATTACK_NAMES,
        robust.cpu(),
    )


def _square_available(x) -> bool:
    """x is NCHW, as Square needs."""
    return x.dim() == 4
