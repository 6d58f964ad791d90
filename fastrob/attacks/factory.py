"""The attacks the metrics and ``fastrob eval`` build by name (``make_attack``), and the short
name of any attack a result came from (``describe_attack``)."""

from __future__ import annotations

import torch

from fastrob.attacks.apgd import APGD
from fastrob.attacks.autoattack import AutoAttack
from fastrob.attacks.ball import attack_ball
from fastrob.attacks.config import check_norm, default_alpha
from fastrob.attacks.torchattacks_compat import PGD, PGDL2, Attack

# the attacks built by name (``make_attack``, ``accuracy_curve(attack=...)``, ``fastrob eval --attack``)
ATTACKS = ("autoattack", "autoattack-fast", "apgd", "pgd")


def make_attack(
    name: str,
    model,
    eps: float,
    norm: str = "linf",
    *,
    steps: int = 20,
    restarts: int = 1,
    n_queries: int = 5000,
    version: str = "standard",
    n_classes: int = 10,
    seed: int = 0,
    quiet: bool = True,
):
    """The attack object ``name`` at radius ``eps``:

    - "pgd": PGD (``fastrob.PGD`` / ``PGDL2``), ``steps`` steps of 2.5·eps/steps, ``restarts`` random starts;
    - "apgd": APGD-CE (Croce & Hein 2020) with ``steps`` iterations and ``restarts`` restarts;
    - "autoattack": AutoAttack ``version`` with ``steps`` iterations for APGD-CE, APGD-T and FAB-T and
      ``n_queries`` for Square (the paper's "standard" is steps=100, n_queries=5000);
    - "autoattack-fast": AutoAttack's "fast" version with those settings (docs/autoattack-fast.md).
    """
    check_norm(norm)
    if name == "pgd":
        attack = (PGD if norm == "linf" else PGDL2)(
            model, eps=eps, alpha=default_alpha(eps, steps), steps=steps, restarts=restarts
        )
        # random starts from a generator of their own on the model's device
        attack.generator = torch.Generator(device=attack.device or "cpu").manual_seed(seed)
        return attack
    upper = "Linf" if norm == "linf" else "L2"
    if name == "apgd":
        return APGD(model, norm=upper, eps=eps, steps=steps, n_restarts=restarts, seed=seed, loss="ce")
    if name in ("autoattack", "autoattack-fast"):
        return AutoAttack(
            model,
            norm=upper,
            eps=eps,
            version="fast" if name == "autoattack-fast" else version,
            n_classes=n_classes,
            seed=seed,
            steps=steps,
            n_queries=n_queries,
            quiet=quiet,
        )
    raise ValueError(f"attack must be one of {ATTACKS}, got {name!r}")


def describe_attack(attack) -> str:
    """A short name of ``attack`` with its settings, e.g. "AutoAttack(standard, Linf, eps=0.1)" or
    "PGD-20(linf, eps=0.1, alpha=0.0125)": fastrob's attacks describe themselves (``describe()``),
    another attack object with a known ball (``attack_ball``) gives its class and ball, a plain
    function its name."""
    if isinstance(attack, Attack):
        return attack.describe()
    ball = attack_ball(attack)
    if ball is not None:
        return f"{type(attack).__name__}({ball[0]}, eps={ball[1]:g})"
    return getattr(attack, "__name__", type(attack).__name__)
