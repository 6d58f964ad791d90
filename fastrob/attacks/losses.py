"""The per-sample losses l(z, y) that PGD ascends (z the logits [B, C]); each returns shape [B].

``LOSSES`` maps a loss name to its function; a new loss (e.g. the DLR loss of Croce & Hein 2020)
is one function here and one entry in ``LOSSES``."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log softmax(z)_y per sample."""
    return F.cross_entropy(logits, labels, reduction="none")


def margin_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin max_{j≠y} z_j - z_y per sample (> 0 exactly when misclassified)."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


def kl_loss(logits: torch.Tensor, p_clean: torch.Tensor) -> torch.Tensor:
    """KL(p_clean ‖ softmax(logits)) per sample: TRADES' inner objective (p_clean [B, C] in place of labels)."""
    log_p = F.log_softmax(logits, dim=1)
    return (torch.xlogy(p_clean, p_clean) - p_clean * log_p).sum(1)


# name -> (function, what it compares the logits with: "labels" or "clean probabilities")
LOSSES: dict[str, tuple[LossFn, str]] = {
    "ce": (cross_entropy_loss, "labels"),
    "margin": (margin_loss, "labels"),
    "kl": (kl_loss, "clean probabilities"),
}


def needs_clean_probabilities(loss) -> bool:
    return isinstance(loss, str) and LOSSES[loss][1] == "clean probabilities"


def per_sample_loss(loss, logits: torch.Tensor, labels: torch.Tensor, p_clean: Optional[torch.Tensor],
                    targeted: bool) -> torch.Tensor:
    """J per sample, the quantity PGD ascends: l(z, y), or -l(z, t) when targeted. Half-precision
    logits (autocast) are upcast to float32; a callable loss must return one value per sample."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if isinstance(loss, str):
        fn, reference = LOSSES[loss]
        value = fn(logits, p_clean if reference == "clean probabilities" else labels)
    else:
        value = loss(logits, labels)
        if not isinstance(value, torch.Tensor) or value.shape != (logits.shape[0],):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"loss must return one value per sample, shape ({logits.shape[0]},), got {got}")
        value = value.float()
    return -value if targeted else value
