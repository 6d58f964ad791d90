"""Difference-of-logits-ratio (DLR) losses of Croce & Hein (2020), per sample.

With the logits z sorted in decreasing order z_π1 >= z_π2 >= ...:
  DLR(z, y)     = -(z_y - max_{i≠y} z_i) / (z_π1 - z_π3 + 1e-12)
  DLR_T(z, y, t) = -(z_y - z_t)          / (z_π1 - (z_π3 + z_π4)/2 + 1e-12)
Both are invariant to shifting and (positive) scaling of the logits, so an attack ascending them
is not fooled by a model that rescales its logits to flatten the cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Untargeted DLR per sample, shape [B]; > 0 exactly when the sample is misclassified. Needs C >= 3."""
    logits = _upcast(logits)
    if logits.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got logits of shape {tuple(logits.shape)}")
    top = logits.topk(3, dim=1).values
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(1)
    return -(true - other) / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_dlr_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Targeted DLR per sample, shape [B]: grows as z_t overtakes z_y. Needs C >= 4."""
    logits = _upcast(logits)
    if logits.shape[1] < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, got logits of shape {tuple(logits.shape)}")
    top = logits.topk(4, dim=1).values
    true = logits.gather(1, labels[:, None]).squeeze(1)
    target = logits.gather(1, targets[:, None]).squeeze(1)
    return -(true - target) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)
