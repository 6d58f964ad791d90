"""Attacks: one engine (``engine.ascend``) that every attack, metric and regularizer ascending an
objective over the input runs; on it PGD (Linf / L2), FGSM and TRADES' inner maximisation
(``projected_gradient``), torchattacks' class interface (``torchattacks_compat``: ``PGD``, ``PGDL2``,
``FGSM``), the interpretability sneaking attack ``isa`` (Boopathy et al. 2020) and
``adversarial_explanation`` (Woods et al. 2019).

The evaluation attacks (Croce & Hein 2020; Andriushchenko et al. 2020), with torchattacks' classes'
arguments: ``APGD`` and ``APGDT`` (``apgd``), ``FAB``, ``Square`` (``square``) and ``AutoAttack``.

Modules, one job each: ``config`` (the validated settings and the default step rule), ``losses``
(CE, margin, KL, DLR), ``starts`` (random starts and the attacks' generator), ``state`` (model
modes, bf16 autocast and input checks), ``engine`` (the loop), ``graph`` (its CUDA-graph capture);
docs/design.md has the whole table."""

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
from fastrob.attacks.losses import LOSSES, dlr_loss, kl_loss, margin_loss, targeted_dlr_loss
from fastrob.attacks.projected_gradient import pgd, trades_perturb
from fastrob.attacks.state import attack_context
from fastrob.attacks.torchattacks_compat import FGSM, PGD, PGDL2, Attack

__all__ = [
    "ALPHA_FACTOR",
    "AscentResult",
    "Attack",
    "AttackConfig",
    "Evaluation",
    "FGSM",
    "ISAResult",
    "LOSSES",
    "NORMS",
    "PGD",
    "PGDL2",
    "STARTS",
    "adversarial_explanation",
    "ascend",
    "attack_context",
    "check_norm",
    "check_random_start",
    "default_alpha",
    "isa",
    "kl_loss",
    "margin_loss",
    "pgd",
    "trades_perturb",
]


# after the engine: these import fastrob.metrics, whose modules run the attacks above
from fastrob.attacks.explanation import adversarial_explanation  # noqa: E402

# FAB (Croce & Hein 2020)
from fastrob.attacks.fab import FAB  # noqa: E402
from fastrob.attacks.isa import ISAResult, isa  # noqa: E402

__all__ += ["FAB"]

# AutoAttack's parts (Croce & Hein 2020; Andriushchenko et al. 2020)
from fastrob.attacks.apgd import APGD, APGDT, apgd  # noqa: E402
from fastrob.attacks.autoattack import AutoAttack, AutoAttackRecord  # noqa: E402
from fastrob.attacks.square import Square, square  # noqa: E402

__all__ += [
    "APGD",
    "APGDT",
    "AutoAttack",
    "AutoAttackRecord",
    "Square",
    "apgd",
    "dlr_loss",
    "square",
    "targeted_dlr_loss",
]
