"""Attacks: batched PGD (Linf / L2), FGSM and TRADES' inner maximisation, with torchattacks'
class interface (``PGD``, ``PGDL2``, ``FGSM``) over the functional engine ``pgd``."""

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

__all__ = ["Attack", "FGSM", "PGD", "PGDL2", "attack_context", "kl_loss", "margin_loss", "pgd", "trades_perturb"]
