"""Attacks: one engine (``engine.ascend``) that every attack, metric and regularizer ascending an
objective over the input runs; on it PGD (Linf / L2), FGSM and TRADES' inner maximisation
(``projected_gradient``), torchattacks' class interface (``torchattacks_compat``: ``PGD``, ``PGDL2``,
``FGSM``), the interpretability sneaking attack ``isa`` (Boopathy et al. 2020) and
``adversarial_explanation`` (Woods et al. 2019).

The evaluation attacks (Croce & Hein 2020; Andriushchenko et al. 2020), with torchattacks' classes'
arguments: ``APGD`` and ``APGDT`` (``apgd``), ``FAB``, ``Square`` (``square``) and ``AutoAttack``;
``MALTAPGDT`` and ``malt_targets`` (``malt``: MALT's targeting, Melamed et al. 2024) for its "fast" version.

Modules, one job each: ``config`` (the validated settings and the default step rule), ``losses``
(CE, margin, KL, DLR), ``starts`` (random starts and the attacks' generator), ``state`` (model
modes, bf16 autocast and input checks), ``engine`` (the loop), ``graph`` (its CUDA-graph capture),
``ball`` (the eps-ball and box an output must respect), ``masking_checks`` (the gradient-masking checks'
definitions and the cheap ones, AutoAttack's "fast" guard), ``factory`` (the attacks built by name and
their descriptions); docs/design.md has the whole table."""

from fastrob.attacks.apgd import APGD, APGDT, apgd
from fastrob.attacks.autoattack import AutoAttack, AutoAttackRecord
from fastrob.attacks.ball import attack_ball, check_attack_output, inside_ball
from fastrob.attacks.config import (
    ALPHA_FACTOR,
    NORMS,
    STARTS,
    AttackConfig,
    check_norm,
    check_random_start,
    default_alpha,
)
from fastrob.attacks.engine import AscentResult, Evaluation, ascend
from fastrob.attacks.explanation import adversarial_explanation
from fastrob.attacks.fab import FAB
from fastrob.attacks.factory import ATTACKS, describe_attack, make_attack
from fastrob.attacks.isa import ISAResult, isa
from fastrob.attacks.losses import LOSSES, dlr_loss, kl_loss, margin_loss, targeted_dlr_loss
from fastrob.attacks.malt import MALTAPGDT, malt_targets
from fastrob.attacks.projected_gradient import pgd, trades_perturb
from fastrob.attacks.square import Square, square
from fastrob.attacks.state import attack_context
from fastrob.attacks.torchattacks_compat import FGSM, PGD, PGDL2, Attack

__all__ = [
    "ALPHA_FACTOR",
    "APGD",
    "APGDT",
    "ATTACKS",
    "AscentResult",
    "Attack",
    "AttackConfig",
    "AutoAttack",
    "AutoAttackRecord",
    "Evaluation",
    "FAB",
    "FGSM",
    "ISAResult",
    "LOSSES",
    "MALTAPGDT",
    "NORMS",
    "PGD",
    "PGDL2",
    "STARTS",
    "Square",
    "adversarial_explanation",
    "apgd",
    "ascend",
    "attack_ball",
    "attack_context",
    "check_attack_output",
    "check_norm",
    "check_random_start",
    "default_alpha",
    "describe_attack",
    "dlr_loss",
    "inside_ball",
    "isa",
    "kl_loss",
    "make_attack",
    "malt_targets",
    "margin_loss",
    "pgd",
    "square",
    "targeted_dlr_loss",
    "trades_perturb",
]
