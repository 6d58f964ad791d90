"""Attacks: batched PGD (Linf / L2), FGSM and TRADES' inner maximisation, with torchattacks'
class interface (``PGD``, ``PGDL2``, ``FGSM``) over the functional engine ``pgd``; the
interpretability sneaking attack ``isa`` (seed 000) and ``adversarial_explanation`` (seed 001)."""

from fastrob.attacks.explanation import adversarial_explanation
from fastrob.attacks.isa import ISAResult, isa
from fastrob.attacks.pgd import (
    FGSM,
    PGD,
    PGDL2,
    Attack,
    attack_context,
    kl_loss,
    margin_loss,
    pgd,
    trades_perturb,
)

__all__ = ["Attack", "FGSM", "ISAResult", "PGD", "PGDL2", "adversarial_explanation", "attack_context", "isa",
           "kl_loss", "margin_loss", "pgd", "trades_perturb"]

# FAB (issue 14)
from fastrob.attacks.fab import FAB  # noqa: E402

__all__ += ["FAB"]

# AutoAttack's parts (Croce & Hein 2020; Andriushchenko et al. 2020)
from fastrob.attacks.apgd import APGD, APGDT, apgd  # noqa: E402
from fastrob.attacks.autoattack import AutoAttack, AutoAttackRecord  # noqa: E402
from fastrob.attacks.dlr import dlr_loss, targeted_dlr_loss  # noqa: E402
from fastrob.attacks.square import Square, square  # noqa: E402

__all__ += ["APGD", "APGDT", "AutoAttack", "AutoAttackRecord", "Square", "apgd", "dlr_loss", "square",
            "targeted_dlr_loss"]
