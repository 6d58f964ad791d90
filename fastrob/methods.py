"""The training methods of ``fastrob train --method``: one registry entry per method, holding
everything the trainer and the CLI need to know about it (how to build its objective, its default
regularizer weight, its display name, its help text).

``fastrob.trainer.describe`` and ``fastrob.trainer.build_objective``, ``TrainConfig.check`` and the
CLI's ``--method`` choices and help all read ``REGISTRY``; adding a method is adding one entry here.
Formulas, defaults and papers: docs/methods.md.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fastrob import regularizers
from fastrob.attacks.config import default_alpha
from fastrob.objective import Objective

if TYPE_CHECKING:  # the trainer imports this module; the config is only an annotation here
    from fastrob.trainer import TrainConfig


@dataclass(frozen=True)
class Method:
    """One training method.

    name: the ``--method`` value and ``TrainConfig.method``.
    display: the short name ``describe`` starts with, e.g. "PGD-AT".
    help: one line for the CLI's help.
    build(config, model, lam, steps_per_epoch) -> objective(model, x, y) -> Objective; ``lam`` is
        ``config.lam`` or, when that is None, ``default_lam``.
    details(config, lam) -> the parameters ``describe`` prints after the display name ("" for none).
    default_lam: the regularizer weight used when ``--lam`` is not given (None: the method has no
        lam, or, for lipschitz, None means an adaptive psi).
    attack: whether eps/alpha/attack_steps/norm configure an attack inside the method.
    warmup: whether the method takes the eps warm-up schedule ``TrainConfig.warmup``.
    """

    name: str
    display: str
    help: str
    build: Callable[..., Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], Objective]]
    details: Callable[[TrainConfig, float | None], str]
    default_lam: float | None = None
    attack: bool = False
    warmup: bool = False

    def describe(self, config: TrainConfig) -> str:
        details = self.details(config, self.lam(config))
        return f"{self.display} {details}" if details else self.display

    def lam(self, config: TrainConfig) -> float | None:
        return self.default_lam if config.lam is None else config.lam


def attack_alpha(config: TrainConfig) -> float:
    """The attack step: ``config.alpha``, or the attacks' default rule (``fastrob.attacks.default_alpha``)."""
    return config.alpha if config.alpha is not None else default_alpha(config.eps, config.attack_steps)


# ---- what ``describe`` prints after the display name ----


def _no_details(config, lam) -> str:
    return ""


def _attack_details(config, lam) -> str:
    return f"{config.norm} eps={config.eps:g}"


def _trades_details(config, lam) -> str:
    return f"b={config.beta:g} {_attack_details(config, lam)}"


def _lam_details(config, lam) -> str:
    return f"lam={lam:g}"


def _lam_attack_details(config, lam) -> str:
    return f"lam={lam:g} {_attack_details(config, lam)}"


def _jsigr_details(config, lam) -> str:
    linear = ",linear" if config.saliency_estimate == "linear" else ""
    return f"lam={lam:g},{config.lam_saliency:g}{linear}"


def _psi_details(config, lam) -> str:
    return "psi=adaptive" if lam is None else f"psi={lam:g}"


# ---- the objective builders: build(config, model, lam, steps_per_epoch) ----


def _plain(config, model, lam, steps_per_epoch):
    def plain(model, x, y):
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        return Objective(loss=ce, ce=ce, penalty=ce.new_zeros(()), logits=logits)

    return plain


def _adversarial(config, model, lam, steps_per_epoch):
    from fastrob import attacks
    from fastrob.adversarial_training import adversarial_loss

    cls = attacks.PGD if config.norm == "linf" else attacks.PGDL2
    attack = cls(model, eps=config.eps, alpha=attack_alpha(config), steps=config.attack_steps, random_start=True)
    return lambda model, x, y: adversarial_loss(model, x, y, attack, kind=config.method, beta=config.beta)


def _interpretation(config, model, lam, steps_per_epoch):
    from fastrob import distributed, interpret

    # CAM for the cnn (its GAP head), input-gradient saliency for the others
    warmup = None if config.warmup is None else tuple(round(w * steps_per_epoch) for w in config.warmup)
    return regularizers.InterpretationRegularizer(
        config.method,
        lam=lam,
        eps=config.eps,
        alpha=attack_alpha(config),
        steps=config.attack_steps,
        norm=config.norm,
        warmup=warmup,
        map=interpret.default_map(distributed.unwrap(model)),
    )


def _sns(config, model, lam, steps_per_epoch):
    return regularizers.SNSRegularizer(
        eps=config.eps, alpha=attack_alpha(config), steps=config.attack_steps, norm=config.norm, lam=lam
    )


def _input_gradient(config, model, lam, steps_per_epoch):
    return regularizers.InputGradientRegularizer(lam=lam)


def _jacobian(config, model, lam, steps_per_epoch):
    return regularizers.JacobianRegularizer(lam=lam)


def _jsigr(config, model, lam, steps_per_epoch):
    return regularizers.JSIGRRegularizer(
        lam_jacobian=lam,
        lam_saliency=config.lam_saliency,
        patch=config.patch,
        saliency_estimate=config.saliency_estimate,
    )


def _lipschitz(config, model, lam, steps_per_epoch):
    return regularizers.LipschitzRegularizer(psi=lam)


def _default_of(cls, parameter: str):
    """The default of ``cls``'s constructor argument ``parameter``: each regularizer owns its default weight."""
    return inspect.signature(cls).parameters[parameter].default


def _interpretation_method(name: str, display: str, help: str) -> Method:
    lam = _default_of(regularizers.InterpretationRegularizer, "lam")
    return Method(name, display, help, _interpretation, _lam_attack_details, default_lam=lam, attack=True, warmup=True)


_ENTRIES = (
    Method("none", "plain", "plain cross-entropy training", _plain, _no_details),
    Method(
        "pgd",
        "PGD-AT",
        "adversarial training on PGD examples (Madry et al. 2018)",
        _adversarial,
        _attack_details,
        attack=True,
    ),
    Method(
        "trades",
        "TRADES",
        "CE + beta * KL(f(x) || f(x')) at the KL-maximizing x' (Zhang et al. 2019)",
        _adversarial,
        _trades_details,
        attack=True,
    ),
    Method(
        "half",
        "half-AT",
        "half of each batch replaced by PGD examples (Woods et al. 2019)",
        _adversarial,
        _attack_details,
        attack=True,
    ),
    Method(
        "input_gradient",
        "input grad",
        "CE + lam * |grad_x CE|^2 (Drucker & LeCun 1992; Ross & Doshi-Velez 2018)",
        _input_gradient,
        _lam_details,
        default_lam=_default_of(regularizers.InputGradientRegularizer, "lam"),
    ),
    Method(
        "jacobian",
        "Jacobian",
        "CE + lam * |d logits / dx|_F^2, random projections (Hoffman et al. 2019)",
        _jacobian,
        _lam_details,
        default_lam=_default_of(regularizers.JacobianRegularizer, "lam"),
    ),
    Method(
        "jsigr",
        "J-SIGR",
        "Jacobian penalty (lam) + input gradient pulled toward a perturbation saliency "
        "(--lam-saliency, --patch, --saliency-estimate; Liu et al. 2024)",
        _jsigr,
        _jsigr_details,
        default_lam=_default_of(regularizers.JSIGRRegularizer, "lam_jacobian"),
    ),
    _interpretation_method(
        "int", "Int", "CE + lam * D(x, x*), x* maximizing the interpretation discrepancy D (Boopathy et al. 2020)"
    ),
    _interpretation_method("int_adv", "Int-Adv", "CE(x*) + lam * D, x* maximizing CE + lam * D (Boopathy et al. 2020)"),
    _interpretation_method("int2", "Int2", "CE + lam * D(x, x*), x* a PGD example on CE (Boopathy et al. 2020)"),
    _interpretation_method("int2_adv", "Int2-Adv", "CE(x*) + lam * D, x* a PGD example on CE (Boopathy et al. 2020)"),
    Method(
        "lipschitz",
        "Lipschitz",
        "CE + psi * mean |ds/dx|^2, psi adaptive unless --lam fixes it (Woods et al. 2019)",
        _lipschitz,
        _psi_details,
    ),
    Method(
        "sns",
        "SNS",
        "PGD-AT + lam * the change of the most sensitive neurons (Zhang, Liu et al. 2019)",
        _sns,
        _lam_attack_details,
        default_lam=_default_of(regularizers.SNSRegularizer, "lam"),
        attack=True,
    ),
)

REGISTRY: dict[str, Method] = {m.name: m for m in _ENTRIES}
NAMES = tuple(REGISTRY)


def get(name: str) -> Method:
    """The registry entry of ``name``; ValueError naming the choices otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"method must be one of {NAMES}, got {name!r}")
    return REGISTRY[name]


def cli_help() -> str:
    """The ``--method`` help: every method with its default lam, generated from the registry."""
    lines = []
    for m in REGISTRY.values():
        lam = "" if m.default_lam is None else f" (default lam {m.default_lam:g})"
        lines.append(f"{m.name}: {m.help}{lam}")
    return "training method (default none); " + "; ".join(lines)
