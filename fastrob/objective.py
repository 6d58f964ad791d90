"""The value every regularizer and adversarial-training loss returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Objective:
    """A training objective and its parts; call ``loss.backward()`` to train.

    loss:    the whole objective (mean cross-entropy + weighted penalty), a scalar with grad.
    ce:      the mean cross-entropy part, a scalar.
    penalty: the unweighted penalty (0 where the method has none), a scalar.
    logits:  the logits of the forward pass the objective used, [B, C].
    """

    loss: torch.Tensor
    ce: torch.Tensor
    penalty: torch.Tensor
    logits: torch.Tensor
