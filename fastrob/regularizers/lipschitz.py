"""The Lipschitz-inspired input-gradient penalty of Woods, Chen & Teuscher (Nature MI 2019), with
their adaptive weight psi (Woods et al. 2019; docs/methods.md#adversarial-explanations)."""

from __future__ import annotations

import math

import torch

from fastrob import functional as Fn
from fastrob._checks import check_float, check_positive
from fastrob.compiled import eager_for_double_backward
from fastrob.distributed import all_reduce_sum, is_ddp, is_distributed, unwrap, world_size
from fastrob.objective import Objective
from fastrob.regularizers.input_gradient import check_backend
from fastrob.routing import twice_differentiable


def lipschitz_outputs(
    logits: torch.Tensor, y: torch.Tensor, zeta: float = 0.2, generator: torch.Generator | None = None
) -> torch.Tensor:
    """s_b per sample, the output whose input gradient the penalty smooths (Woods et al.'s "tandem"
    choice, K = 1):
        s_b = z_{b, c_b}                       with probability 1 - zeta, c_b uniform over the C classes,
        s_b = z_{b, y_b} - max_{j != y_b} z_bj with probability zeta (the margin).
    Draw order (so that a seeded ``generator`` reproduces it): c = randint(0, C, [B]) first, then
    u = rand([B]) and the margin where u < zeta; both on the logits' device. Returns [B] in the
    logits' dtype (float32 at least), differentiable.
    """
    rows, classes = logits.shape
    c = torch.randint(0, classes, (rows,), device=logits.device, generator=generator)
    use_margin = torch.rand(rows, device=logits.device, generator=generator) < zeta
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    fair = logits.gather(1, c[:, None])[:, 0]
    if not bool(use_margin.any()):
        return fair
    true = logits.gather(1, y[:, None])[:, 0]
    other = logits.masked_fill(torch.nn.functional.one_hot(y, classes).bool(), float("-inf")).amax(1)
    return torch.where(use_margin, true - other, fair)


class LipschitzRegularizer:
    """loss = mean_b CE_b + psi * penalty,  penalty = mean over samples and input elements of |ds/dx|^z.

    ds/dx is the gradient of sum_b s_b with respect to the batch (``lipschitz_outputs``: a random
    class's logit, or with probability zeta the margin z_y - max_{j != y} z_j), computed with
    ``create_graph=True`` so that the penalty's parameter gradient is exact double backprop. Row b is
    ds_b/dx_b when samples do not interact (no BatchNorm in train mode); with train-mode BatchNorm
    it also carries the terms through the batch statistics, like every input-gradient penalty here
    (``fastrob.functional``). For z = 2 the reduction runs through the fused ``sqnorm`` op, and the
    cross-entropy through the fused ``cross_entropy`` op (``backend``); the activations' first and
    second derivatives run through ``bias_act`` when the model uses ``fastrob.nn.BiasAct`` (e.g.
    ``fastrob.models`` with ``activation_name="half_huber"``, the activation Woods et al. pair with
    this penalty).

    Adaptive psi (``psi=None``, the default): psi = psi0 * exp(k_psi * R) with R = 0 at the start
    and, after every call, from that batch's mean cross-entropy L_class,
        R <- max(0, R + clip(-ln(L_class / target_loss), -eps_worse, +eps_better)).
    While the classifier is better than the target loss (L_class < target_loss) R grows fast (up
    to eps_better per batch), so the penalty weight rises; when it is worse R shrinks slowly (by at
    most eps_worse). A call uses the psi of the state before its own update (``self.psi`` is the psi
    the next call will use); the authors' code updates R from the batch's loss before weighting
    that batch, which is the same sequence shifted by one batch. A batch whose cross-entropy is not
    finite leaves R unchanged; L_class = 0 counts as +eps_better. ``state_dict()`` /
    ``load_state_dict()`` carry R, so a resumed run continues the same psi sequence. A fixed
    ``psi`` disables the adaptation, and so does a call with the model in eval mode (a validation
    loss does not move psi). Called with a DistributedDataParallel model, R is updated from
    the mean CE over the ranks, so every rank keeps the same psi.

    Args:
        psi: a fixed penalty weight >= 0, or None for the adaptive weight (default).
        psi0: the adaptive weight's starting value, > 0 (default 220).
        k_psi: its growth rate per unit of R, >= 0 (default 0.02; the authors' docstring and code
            disagree, fastrob uses 0.02, docs/methods.md#adversarial-explanations).
        z: the exponent of |ds/dx|, > 0 (default 2).
        zeta: the probability of the margin output, in [0, 1] (default 0.2).
        target_loss: L_target, > 0 (default 1.5).
        eps_better, eps_worse: the clip bounds of one batch's change of R, >= 0 (defaults 1, 0.01).
        generator: torch.Generator on the model's device for the output choice (default: the
            global RNG).
        backend: "auto" | "torch" | "triton" | "cuda", for the cross-entropy and the z = 2
            reduction (``check_backend``).
    """

    def __init__(
        self,
        psi: float | None = None,
        psi0: float = 220.0,
        k_psi: float = 0.02,
        z: float = 2.0,
        zeta: float = 0.2,
        target_loss: float = 1.5,
        eps_better: float = 1.0,
        eps_worse: float = 0.01,
        generator: torch.Generator | None = None,
        backend: str = "auto",
    ):
        self.fixed_psi = None if psi is None else check_float("psi", psi, min_value=0.0)
        self.psi0 = check_positive("psi0", psi0)
        self.k_psi = check_float("k_psi", k_psi, min_value=0.0)
        self.z = check_positive("z", z)
        self.zeta = check_float("zeta", zeta, min_value=0.0)
        if self.zeta > 1:
            raise ValueError(f"zeta must be a probability in [0, 1], got {zeta}")
        self.target_loss = check_positive("target_loss", target_loss)
        self.eps_better = check_float("eps_better", eps_better, min_value=0.0)
        self.eps_worse = check_float("eps_worse", eps_worse, min_value=0.0)
        self.generator = generator
        self.backend = check_backend(backend, "LipschitzRegularizer")
        self.R = 0.0

    def __repr__(self):
        psi = (
            f"psi={self.fixed_psi}"
            if self.fixed_psi is not None
            else (f"psi=adaptive(psi0={self.psi0}, k_psi={self.k_psi}, target_loss={self.target_loss}, R={self.R:.4g})")
        )
        return f"LipschitzRegularizer({psi}, z={self.z}, zeta={self.zeta}, backend={self.backend!r})"

    @property
    def adaptive(self) -> bool:
        return self.fixed_psi is None

    @property
    def psi(self) -> float:
        """The penalty weight the next call uses."""
        if self.fixed_psi is not None:
            return self.fixed_psi
        return self.psi0 * math.exp(self.k_psi * self.R)

    def update(self, class_loss: float) -> None:
        """One step of the adaptive rule from a batch's mean cross-entropy (called by ``__call__``)."""
        if not math.isfinite(class_loss) or class_loss < 0:
            return
        change = self.eps_better if class_loss == 0 else -math.log(class_loss / self.target_loss)
        self.R = max(0.0, self.R + min(self.eps_better, max(-self.eps_worse, change)))

    def state_dict(self) -> dict:
        return {"R": self.R}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "R" not in state:
            raise ValueError(f"state must be a dict with key 'R' (from state_dict()), got {state!r}")
        value = state["R"]
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()  # a checkpoint may hold R as a 0-dim tensor
        self.R = check_float("state['R']", value, min_value=0.0)

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor) -> Objective:
        x, y = Fn.check_inputs(model, x, y)
        model = eager_for_double_backward(model, "LipschitzRegularizer")
        # Under DDP the input gradient is taken on the wrapped module's output (Fn.forward_pair)
        with twice_differentiable(self.backend):  # the penalty differentiates a backward
            logits, inner = Fn.forward_pair(model, x, y)
        ce = Fn.per_sample_cross_entropy(logits, y, self.backend).mean()
        s = lipschitz_outputs(inner, y, self.zeta, self.generator)
        g = Fn.input_grad(s.sum(), x, create_graph=True)
        penalty = self.gradient_penalty(g)
        psi = self.psi
        if self.adaptive and unwrap(model).training:  # a validation call (eval mode) leaves psi alone
            class_loss = float(ce.detach())
            if is_ddp(model) and is_distributed():
                # every rank must keep the same psi: update it from the global batch's CE (the mean
                # of the ranks' means, exact for equal shards), one all-reduce per step
                class_loss = float(all_reduce_sum(class_loss)) / world_size()
            self.update(class_loss)
        return Objective(ce + psi * penalty, ce, penalty, logits)

    def gradient_penalty(self, g: torch.Tensor) -> torch.Tensor:
        """mean of |g|^z over every element of the [B, ...] gradient (float32 at least)."""
        if self.z == 2:
            # mean of g^2 = mean_b ||g_b||^2 / d: the fused sqnorm on a GPU
            return Fn.gradient_norm_penalty(g, "l2", backend=self.backend) / g.flatten(1).shape[1]
        if g.dtype in (torch.float16, torch.bfloat16):
            g = g.float()
        return g.abs().pow(self.z).mean()
