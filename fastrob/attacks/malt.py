"""MALT targeting (Melamed, Yehudai & Shamir 2024, "MALT Powers Up Adversarial Attacks"): the
targets of a targeted attack ranked by the linear estimate of the distance to each class boundary
instead of by the classifier's confidence.

For a sample x with label y and logits z, each candidate class t (the ``n_candidates`` classes with
the highest logits after y) scores

    d_t = (z_y - z_t) / ‖∇_x (z_y - z_t)‖_*

the distance from x to the boundary between y and t of the model linearized at x, in the attack's
norm (‖·‖_* is its dual: L1 for Linf, L2 for L2, as in DeepFool and FAB). The targets are the
``n_targets`` candidates with the smallest d_t. MALT rests on the observation that robust networks are
almost linear at the scale of the attack radius, so this estimate orders the reachable classes better
than z_t alone. All candidates' gradients come from one forward and one backward over the batch
stacked ``n_candidates`` times.

``MALTAPGDT`` is APGD-T (``fastrob.attacks.apgd``) on those targets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastrob._checks import check_int, check_logits
from fastrob.attacks.apgd import APGDT, apgd
from fastrob.attacks.config import torchattacks_norm
from fastrob.attacks.state import attack_context, check_attack_inputs


def malt_scores(model, x: torch.Tensor, y: torch.Tensor, candidates: torch.Tensor, norm: str = "Linf"):
    """d_t [B, c] (module docstring) for the candidate classes ``candidates`` [B, c] of each sample."""
    norm = torchattacks_norm(norm)
    batch, c = candidates.shape
    # one stacked pass: row j*B + i is sample i with candidate j, so a single backward of the summed
    # margins gives each row its own input gradient (rows do not interact in eval mode; in train mode
    # BatchNorm's batch statistics couple them, as they couple the samples of any train-mode attack)
    stacked = x.detach().repeat(c, *([1] * (x.dim() - 1))).requires_grad_(True)
    with torch.enable_grad():
        logits = model(stacked)
        check_logits(logits, stacked.shape[0], where="the MALT targeting pass")
        rows = torch.arange(batch * c, device=x.device)
        target = candidates.T.reshape(-1)
        margin = logits[rows, y.repeat(c)] - logits[rows, target]
        (grad,) = torch.autograd.grad(margin.sum(), stacked)
    dual = grad.flatten(1).abs().sum(1) if norm == "linf" else grad.flatten(1).norm(dim=1)
    # a zero gradient puts the boundary infinitely far (never a preferred target), not at NaN
    distance = margin.detach() / dual
    distance = torch.where(dual > 0, distance, torch.full_like(distance, float("inf")))
    return distance.reshape(c, batch).T


def malt_targets(
    model, x, y, n_targets: int, n_candidates: int, norm: str = "Linf", *, model_training: bool | Callable = False
) -> torch.Tensor:
    """The ``n_targets`` MALT targets [B, k] of each sample (module docstring), nearest first;
    k = min(n_targets, n_candidates, classes - 1). ``model_training``: the model's mode during the
    forwards and the backward (False: eval; see ``attack_context``), the attack's own."""
    check_attack_inputs(model, x, y, clamp_input=None, name="malt_targets")
    n_targets = check_int("n_targets", n_targets, 1)
    n_candidates = check_int("n_candidates", n_candidates, 1)
    with attack_context(model, model_training), torch.no_grad():
        clean = model(x)
    check_logits(clean, x.shape[0], y, where="clean inputs")
    y = y.to(device=x.device, dtype=torch.long)
    c = min(n_candidates, clean.shape[1] - 1)
    if c < 1:
        raise ValueError(f"MALT targeting needs at least 2 classes, the model has {clean.shape[1]}")
    candidates = clean.scatter(1, y[:, None], float("-inf")).topk(c, dim=1).indices
    with attack_context(model, model_training):
        scores = malt_scores(model, x, y, candidates, norm)
    order = scores.argsort(dim=1, stable=True)[:, : min(n_targets, c)]
    return candidates.gather(1, order)


class MALTAPGDT(APGDT):
    """APGD-T on the MALT targets: ``n_target_classes`` targets picked among the ``n_candidates``
    most confident classes after the label. APGDT's signature plus ``n_candidates``."""

    options = APGDT.options + ("n_candidates",)

    def __init__(self, model, norm="Linf", eps=8 / 255, steps=10, *, n_target_classes=3, n_candidates=9, **kwargs):
        super().__init__(model, norm, eps, steps, n_target_classes=n_target_classes, **kwargs)
        self.attack, self.n_candidates = "MALT-APGDT", n_candidates

    def _attack(self, model, images, labels, options):
        n_targets, n_candidates = options.pop("n_target_classes"), options.pop("n_candidates")
        norm = options["norm"]
        with attack_context(model, self._training), torch.no_grad():
            y = model(images).argmax(1) if labels is None else labels
        targets = malt_targets(model, images, y, n_targets, n_candidates, norm, model_training=self._training)
        return apgd(model, images, y, targets=targets, model_training=self._training, **options)
