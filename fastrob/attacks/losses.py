"""The per-sample losses l(z, y) that the attacks ascend (z the logits [B, C]); each returns shape [B].

``LOSSES`` maps a loss name to its function (what PGD's ``loss`` accepts); a new loss is one
function here and one entry in ``LOSSES``. The difference-of-logits-ratio losses of Croce & Hein
(2020), with the logits sorted in decreasing order z_π1 >= z_π2 >= ...:
  DLR(z, y)      = -(z_y - max_{i≠y} z_i) / (z_π1 - z_π3 + ε)
  DLR_T(z, y, t) = -(z_y - z_t)          / (z_π1 - (z_π3 + z_π4)/2 + ε)
(ε = ``numerics.DIVISION_EPS`` = 1e-12) are invariant to shifting and (positive) scaling of the
logits, so an attack ascending them is not fooled by a model that rescales its logits to flatten
the cross-entropy. DLR_T takes a target per sample besides the label, so it is a function of its
own (APGD-T's), not an entry of ``LOSSES``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastrob.attacks.numerics import DIVISION_EPS

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


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Untargeted DLR per sample (module docstring); > 0 exactly when the sample is misclassified. Needs C >= 3."""
    logits = _upcast(logits)
    if logits.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got logits of shape {tuple(logits.shape)}")
    top = logits.topk(3, dim=1).values
    return margin_loss(logits, labels) / (top[:, 0] - top[:, 2] + DIVISION_EPS)


def targeted_dlr_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Targeted DLR per sample (module docstring): grows as z_t overtakes z_y. Needs C >= 4."""
    logits = _upcast(logits)
    if logits.shape[1] < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, got logits of shape {tuple(logits.shape)}")
    top = logits.topk(4, dim=1).values
    true = logits.gather(1, labels[:, None]).squeeze(1)
    target = logits.gather(1, targets[:, None]).squeeze(1)
    return -(true - target) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + DIVISION_EPS)


# name -> (function, what it compares the logits with: "labels" or "clean probabilities")
LOSSES: dict[str, tuple[LossFn, str]] = {
    "ce": (cross_entropy_loss, "labels"),
    "margin": (margin_loss, "labels"),
    "kl": (kl_loss, "clean probabilities"),
    "dlr": (dlr_loss, "labels"),
}


def needs_clean_probabilities(loss) -> bool:
    return isinstance(loss, str) and LOSSES[loss][1] == "clean probabilities"


def per_sample_loss(
    loss, logits: torch.Tensor, labels: torch.Tensor, p_clean: torch.Tensor | None, targeted: bool
) -> torch.Tensor:
    """J per sample, the quantity PGD ascends: l(z, y), or -l(z, t) when targeted. Half-precision
    logits (autocast) are upcast to float32; a callable loss must return one value per sample."""
    logits = _upcast(logits)
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
