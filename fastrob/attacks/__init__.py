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
