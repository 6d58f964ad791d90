"""The interpretation discrepancy D of Boopathy et al. (ICML 2020) between two sets of
interpretation maps (``fastrob.interpret``): how much an input's maps change under a perturbation,
per sample. The attack ``fastrob.attacks.isa``, the regularizer ``InterpretationRegularizer`` and
the metric ``fastrob.metrics.interpretation_discrepancy`` use it."""

from __future__ import annotations

import torch

from fastrob._checks import check_labels, check_tensor

KINDS = ("2class", "1class")


def discrepancy(
    maps_clean: torch.Tensor,
    maps_adv: torch.Tensor,
    y: torch.Tensor,
    logits_adv: torch.Tensor | None = None,
    kind: str = "2class",
) -> torch.Tensor:
    """The l1 interpretation discrepancy per sample, [B] (docs/methods.md#interpretation-aware-training):
        1-class:  D1(x, x') = ||I_y(x') - I_y(x)||_1
        2-class:  D2(x, x') = D1 + sum_{c != y} p~_c(x') ||I_c(x') - I_c(x)||_1,
    p~ = softmax(z(x')) restricted to the classes c != y and renormalised, i.e. the softmax of the
    logits with z_y left out. The l1 norm sums over every element of a map (not a mean).

    Differentiable in both maps and in ``logits_adv`` (p~ included), so it can be maximised by an
    attack and minimised in training.

    Args:
        maps_clean, maps_adv: I(x) and I(x'), [B, C, ...] for all C classes (``classes=None`` in
            ``fastrob.interpret``). For kind="1class" they may also be [B, 1, ...], the maps of
            class y only.
        y: the labels [B].
        logits_adv: z(x') [B, C]; needed for kind="2class".
        kind: "2class" (the paper's default) or "1class".
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    check_tensor("maps_clean", maps_clean, min_dim=2)
    check_tensor("maps_adv", maps_adv, min_dim=2)
    if maps_clean.shape != maps_adv.shape:
        raise ValueError(
            f"maps_adv must have the shape of maps_clean {tuple(maps_clean.shape)}, got {tuple(maps_adv.shape)}"
        )
    batch, k = maps_clean.shape[:2]
    y = check_labels(y, batch).to(maps_clean.device)
    if maps_adv.dtype in (torch.float16, torch.bfloat16) or maps_clean.dtype in (torch.float16, torch.bfloat16):
        # autocast maps: sums of many half-precision terms lose too much
        maps_clean, maps_adv = maps_clean.float(), maps_adv.float()
    diff = (maps_adv - maps_clean).flatten(2).abs().sum(2)  # [B, K]: ||I_c(x') - I_c(x)||_1
    if kind == "1class" and k == 1:
        return diff[:, 0]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
        raise ValueError(
            f"y must hold labels in [0, {k}) for maps of {k} classes, got values in [{int(y.min())}, {int(y.max())}]"
        )
    d1 = diff.gather(1, y[:, None]).squeeze(1)
    if kind == "1class":
        return d1
    if logits_adv is None:
        raise ValueError("kind='2class' needs logits_adv, the logits of the perturbed inputs [B, C]")
    check_tensor("logits_adv", logits_adv, min_dim=2)
    if logits_adv.shape != (batch, k):
        raise ValueError(
            f"logits_adv must have shape [B, C] = ({batch}, {k}) (the maps' classes), got {tuple(logits_adv.shape)}"
        )
    if k < 2:
        return d1
    # p~: the softmax over c != y (the y entry masked to -inf gets weight 0)
    mask = torch.zeros_like(diff, dtype=torch.bool).scatter_(1, y[:, None], True)
    z = logits_adv.float() if logits_adv.dtype in (torch.float16, torch.bfloat16) else logits_adv
    p_other = torch.softmax(z.masked_fill(mask, float("-inf")), dim=1).to(diff.dtype)
    return d1 + (p_other * diff.masked_fill(mask, 0.0)).sum(1)
