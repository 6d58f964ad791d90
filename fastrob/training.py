"""Deprecated alias of ``fastrob.adversarial_training`` (renamed so that it is not confused with
``fastrob.trainer``, the ``fastrob train`` loop); import from there."""

import warnings

from fastrob.adversarial_training import KINDS, adversarial_loss

__all__ = ["KINDS", "adversarial_loss"]

warnings.warn(
    "fastrob.training is deprecated: import adversarial_loss from fastrob.adversarial_training (or "
    "fastrob.adversarial_loss)",
    DeprecationWarning,
    stacklevel=2,
)
