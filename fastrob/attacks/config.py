"""The attack settings every caller shares, validated in one place: the norms, the random starts,
the default step size, and ``AttackConfig`` (eps, alpha, steps, norm, random start, restarts, loss)
which the regularizers, the metrics, the trainer and the CLI build their attacks from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastrob._checks import check_float, check_int
from fastrob.attacks.losses import LOSSES
from fastrob.ops.pgd_step import NORMS

# Random starts: True (the norm's torchattacks start), False (x itself), and the named kinds.
START_KINDS = ("uniform", "normal", "trades")
STARTS = (True, False) + START_KINDS

# Madry et al.'s step size rule: alpha = ALPHA_FACTOR·eps/steps, so that ``steps`` steps can
# cross the ball 2.5 times (and reach its boundary from anywhere inside).
ALPHA_FACTOR = 2.5


def default_alpha(eps, steps: int, factor: float = ALPHA_FACTOR):
    """The default step size factor·eps/steps (eps a float or a per-sample tensor; steps 0 counts as 1)."""
    return factor * eps / max(steps, 1)


def check_norm(norm, name: str = "norm") -> str:
    """norm must be one of ``NORMS`` ("linf", "l2")."""
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"{name} must be one of {NORMS}, got {norm!r}")
    return norm


# torchattacks spells the norms "Linf" and "L2" (APGD, FAB, Square, AutoAttack); fastrob's own
# functions take the lower-case names; the evaluation attacks accept both
_NORM_SPELLINGS = {"Linf": "linf", "L2": "l2", "linf": "linf", "l2": "l2"}


def torchattacks_norm(norm, name: str = "norm") -> str:
    """norm as torchattacks or fastrob spells it ("Linf" / "linf", "L2" / "l2"), as one of ``NORMS``."""
    if not isinstance(norm, str) or norm not in _NORM_SPELLINGS:
        raise ValueError(f"{name} must be 'Linf' or 'L2' (or {NORMS}), got {norm!r}")
    return _NORM_SPELLINGS[norm]


# Mixed precision of the model's forward and backward during an attack: None (the model's own
# dtype) or "bf16" (bfloat16 autocast; the losses upcast the logits, the step stays float32)
AMP_MODES = (None, "bf16")


def check_amp(amp, name: str = "amp"):
    """amp must be one of ``AMP_MODES``."""
    if not (amp is None or (isinstance(amp, str) and amp in AMP_MODES)):
        raise ValueError(f"{name} must be None or 'bf16', got {amp!r}")
    return amp


def check_random_start(value, allowed=STARTS, name: str = "random_start"):
    """A random start among ``allowed``: True and False by identity (1 and 0.0 are not starts),
    the kinds by string equality."""
    if value is True or value is False:
        if value in allowed:
            return value
    elif isinstance(value, str) and value in allowed:
        return value
    raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def check_loss(loss, name: str = "loss"):
    """A loss name of ``LOSSES`` or a callable (logits [B, C], labels [B]) -> per-sample losses [B]."""
    if callable(loss) or (isinstance(loss, str) and loss in LOSSES):
        return loss
    raise ValueError(f"{name} must be one of {tuple(LOSSES)} or a callable (logits, labels) -> [B], got {loss!r}")


@dataclass(frozen=True)
class AttackConfig:
    """One PGD adversary: radius ``eps`` (>= 0), step ``alpha`` (None: ``default_alpha``), ``steps``
    (>= 0), ``norm``, ``random_start``, ``restarts`` (>= 1) and ``loss`` (see ``fastrob.attacks.pgd``).
    Every value is checked on construction; the error names the field and what it expected."""

    eps: float = 8 / 255
    alpha: float | None = None
    steps: int = 10
    norm: str = "linf"
    random_start: bool | str = True
    restarts: int = 1
    loss: str | Callable = "ce"

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: the checked values replace the given ones
        set_(self, "eps", check_float("eps", self.eps, min_value=0.0))
        if self.alpha is not None:
            set_(self, "alpha", check_float("alpha", self.alpha, min_value=0.0))
        set_(self, "steps", check_int("steps", self.steps, 0))
        check_norm(self.norm)
        check_random_start(self.random_start)
        set_(self, "restarts", check_int("restarts", self.restarts, 1))
        check_loss(self.loss)

    @property
    def step_size(self) -> float:
        """alpha, or the default rule's 2.5·eps/steps when alpha is None."""
        return default_alpha(self.eps, self.steps) if self.alpha is None else self.alpha

    def scaled(self, s: float) -> AttackConfig:
        """The same adversary with eps and the step size scaled by s (an eps warm-up)."""
        eps = self.eps * s
        alpha = default_alpha(eps, self.steps) if self.alpha is None else self.alpha * s
        return AttackConfig(
            eps=eps,
            alpha=alpha,
            steps=self.steps,
            norm=self.norm,
            random_start=self.random_start,
            restarts=self.restarts,
            loss=self.loss,
        )

    def pgd_kwargs(self) -> dict:
        """The keyword arguments of ``fastrob.attacks.pgd`` for this adversary."""
        return dict(
            eps=self.eps,
            alpha=self.step_size,
            steps=self.steps,
            norm=self.norm,
            random_start=self.random_start,
            restarts=self.restarts,
            loss=self.loss,
        )
