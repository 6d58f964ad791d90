"""The functional PGD attack ``pgd`` and TRADES' inner maximisation ``trades_perturb``: a loss of the
logits (``fastrob.attacks.losses``) turned into the engine's per-sample objective.

For each sample b with label y_b PGD maximises
  J(x') = l(f(x'), y)            (untargeted; y are the true labels)
  J(x') = -l(f(x'), t)           (targeted;   t are the target labels)
over x' in B(x_b, eps_b) ∩ [0, 1] with the loop of ``fastrob.attacks.engine``; an iterate fools the
model when its argmax leaves y (untargeted) or reaches t (targeted).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastrob._checks import check_generator, check_int, check_logits, per_sample_value
from fastrob.attacks.config import check_amp, check_loss, check_norm, check_random_start
from fastrob.attacks.engine import Evaluation, ascend
from fastrob.attacks.losses import LossFn, needs_clean_probabilities, per_sample_loss
from fastrob.attacks.state import amp_forward, attack_context, check_attack_inputs
from fastrob.distributed import unwrap
from fastrob.ops._common import accumulate_dtype
from fastrob.ops.pgd_step import fit_into_ball


def fooled_by(logits: torch.Tensor, labels: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Whether each row counts as fooled: argmax at the target (targeted), or off the label."""
    pred = logits.argmax(1)
    return pred == labels if targeted else pred != labels


class LossObjective:
    """The engine objective of a logit loss: J = ±l(forward(x'), labels[rows]) per sample. The
    labels (and TRADES' clean probabilities) are the tensors a captured CUDA graph reads."""

    def __init__(
        self, loss, labels: torch.Tensor, p_clean: torch.Tensor | None, targeted: bool, forward: Callable, amp
    ):
        self.loss, self.labels, self.p_clean, self.targeted, self.forward, self.amp = (
            loss,
            labels,
            p_clean,
            targeted,
            forward,
            amp,
        )
        self.checked = False
        self.report_fooled = True  # False: the caller never early-stops nor compares restarts

    def __call__(self, model, x_adv, rows):
        logits = self.forward(x_adv)
        # rows as long as the batch are the batch in order (no restart copies, nothing dropped)
        labels = self.labels if len(rows) == len(self.labels) else self.labels[rows]
        if not self.checked:  # the label range check synchronises with the device: once
            check_logits(logits, x_adv.shape[0], labels)
            self.checked = True
        p = self.p_clean if self.p_clean is None or len(rows) == len(self.labels) else self.p_clean[rows]
        value = per_sample_loss(self.loss, logits, labels, p, self.targeted)
        fooled = fooled_by(logits.detach(), labels, self.targeted) if self.report_fooled else None
        return Evaluation(value, fooled, None, logits)

    def graph_key(self):
        return (self.loss, self.targeted, self.amp, self.p_clean is not None, tuple(self.labels.shape))

    def static_tensors(self):
        return [t for t in (self.labels, self.p_clean) if t is not None]


def pgd(
    model,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    eps=8 / 255,
    alpha=2 / 255,
    steps: int = 10,
    norm: str = "linf",
    random_start: bool | str = True,
    restarts: int = 1,
    loss: str | LossFn = "ce",
    targeted: bool = False,
    robust_only: bool = False,
    early_stop: bool | None = None,
    backend: str = "auto",
    amp: str | None = None,
    cuda_graph: bool = False,
    clamp_input: bool = False,
    model_training: bool | Callable = False,
    generator: torch.Generator | None = None,
    return_fooled: bool = False,
    restart_mode: str = "auto",
    graph_cache: dict | None = None,
):
    """Projected gradient descent on the input (see the module docstring and ``fastrob.attacks.engine``).

    Args:
        model: maps x [B, ...] to logits [B, C].
        x: clean inputs in [0, 1] (NCHW images or any shape with the batch first).
        y: labels [B] (target labels when ``targeted``); None: the model's own predictions.
        eps, alpha: radius and step size, floats or per-sample [B] tensors, >= 0.
        steps: number of steps (0 returns the start).
        norm: "linf" or "l2".
        random_start: True (Linf uniform, L2 torchattacks' Gaussian·U(0,1) radius), False (start
            at x), "uniform", "normal", or "trades" (x + 0.001·N(0,1)).
        restarts: R random starts; per sample the result is a restart that fools the model if one
            does, else the one with the highest J. Restart 0 draws the same start a single run
            draws, so restarts are never weaker than one run.
        loss: "ce", "margin" (max_{j≠y} z_j - z_y), "kl" (KL(f(x) ‖ f(x')), TRADES) or a callable
            (logits [B, C], labels [B]) -> per-sample losses [B].
        targeted: descend the loss towards the labels ``y`` instead of ascending it away from them.
        early_stop: keep, per sample, the first iterate (in step order, then restart order; restart
            order first when the restarts run one after the other) that fools the model instead of
            the last one. Default: ``robust_only``; False reproduces torchattacks exactly.
        robust_only: early stop, and also drop fooled samples from all later steps and restarts (the
            batch shrinks), so a weak model costs a fraction of a full attack. Same result as
            ``early_stop=True`` without dropping, because the samples' steps are independent (so
            nothing is dropped while a BatchNorm layer runs in train mode).
        backend: backend of the fused step ("auto" | "torch" | "triton" | "cuda").
        amp: None or "bf16": run the model's forward and backward under bfloat16 autocast (the step
            and the loss stay float32).
        cuda_graph: capture the step loop as one CUDA graph (CUDA tensors, fixed shapes, no early
            stop); falls back to eager execution, with one warning, when it cannot.
        clamp_input: clamp x into [0, 1] instead of raising for values outside.
        model_training: the model's mode during the attack (False: eval); see ``attack_context``.
        generator: torch.Generator for the random starts (default: the global RNG, as torchattacks).
        return_fooled: also return a [B] bool tensor: whether the returned input fools the model.
        restart_mode: "auto" (the faster on the device, ``engine.restart_mode_for``), "batch" (one
            batch of R·B) or "loop" (one restart after the other).
        graph_cache: a dict the caller owns (e.g. an attack object) that keeps the captured CUDA
            graphs of ``cuda_graph``, so that later calls of the same shapes replay them.

    Returns:
        x_adv (x's shape and dtype, no grad), or (x_adv, fooled) with ``return_fooled``.
    """
    check_attack_inputs(model, x, y, clamp_input, name="pgd")
    check_generator(generator, x.device)
    # Under DDP the attack runs the wrapped module: a DDP forward would prepare the reducer and
    # broadcast buffers, a collective that ranks attacking different numbers of steps would hang in.
    model = unwrap(model)
    steps = check_int("steps", steps, 0)
    restarts = check_int("restarts", restarts, 1)
    check_norm(norm)
    check_loss(loss)
    if needs_clean_probabilities(loss) and targeted:
        raise ValueError("loss='kl' has no target: use targeted=False with it")
    check_random_start(random_start)
    check_amp(amp)
    if early_stop is None:
        early_stop = robust_only
    elif robust_only and not early_stop:
        raise ValueError("robust_only=True drops fooled samples, so it needs early_stop=True (or None)")
    batch = x.shape[0]
    x = torch.clamp(x, 0, 1).detach() if clamp_input else x.detach()
    compute = accumulate_dtype(x.dtype)
    eps = per_sample_value("eps", eps, batch, x.device, dtype=compute)
    alpha = per_sample_value("alpha", alpha, batch, x.device, dtype=compute)
    forward = amp_forward(model, amp, x.device.type)

    with attack_context(model, model_training):
        clean_logits = None
        if y is None or needs_clean_probabilities(loss):
            with torch.no_grad():
                clean_logits = forward(x)
            check_logits(clean_logits, batch, None, where="clean inputs")
        if y is None:
            if targeted:
                raise ValueError("targeted=True needs target labels y")
            y = clean_logits.argmax(1)
        y = y.to(device=x.device, dtype=torch.long)
        p_clean = F.softmax(clean_logits.float(), dim=1) if needs_clean_probabilities(loss) else None
        objective = LossObjective(loss, y, p_clean, targeted, forward, amp)
        objective.report_fooled = early_stop or restarts > 1
        # BatchNorm in train mode couples the samples of a batch: then nothing is dropped
        robust_only = robust_only and not _batch_coupled(model)
        result = ascend(
            model,
            x,
            objective,
            eps=eps,
            alpha=alpha,
            steps=steps,
            norm=norm,
            start=random_start,
            restarts=restarts,
            early_stop=early_stop,
            robust_only=robust_only,
            backend=backend,
            generator=generator,
            model_training=model_training,
            restart_mode=restart_mode,
            cuda_graph=cuda_graph,
            graph_cache=graph_cache,
            need_final=False,
        )
        out = result.x_adv.clamp_(0, 1)  # a no-op except for an unstepped "trades" start
        out = fit_into_ball(out, x, eps, norm)  # float16/bfloat16 rounding
        if return_fooled:
            with torch.no_grad():
                logits = forward(out)
            check_logits(logits, batch, where="the attack's result")
            return out, fooled_by(logits, y, targeted)
        return out


def _batch_coupled(model) -> bool:
    return isinstance(model, torch.nn.Module) and any(
        m.training for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    )


def trades_perturb(
    model,
    x,
    *,
    eps=0.031,
    alpha=0.007,
    steps=10,
    norm="linf",
    backend="auto",
    amp=None,
    generator=None,
    clamp_input=False,
):
    """TRADES' adversary: x' ≈ argmax_{x' ∈ B(x, eps) ∩ [0,1]} KL(f(x) ‖ f(x')), by ``steps``
    sign steps from x + 0.001·N(0, 1), with the model in eval mode (Zhang et al. 2019)."""
    return pgd(
        model,
        x,
        None,
        eps=eps,
        alpha=alpha,
        steps=steps,
        norm=norm,
        random_start="trades",
        loss="kl",
        backend=backend,
        amp=amp,
        generator=generator,
        clamp_input=clamp_input,
    )
