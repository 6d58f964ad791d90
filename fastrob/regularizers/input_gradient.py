"""Input-gradient regularization: double backprop (Drucker & LeCun; Ross & Doshi-Velez) and its
finite-difference approximation (Finlay & Oberman 2019)."""

from __future__ import annotations

import contextlib

import torch

from fastrob import _backend
from fastrob import functional as Fn
from fastrob._checks import check_float, check_positive
from fastrob.compiled import eager_for_double_backward
from fastrob.distributed import unwrap
from fastrob.objective import Objective
from fastrob.routing import twice_differentiable

MODES = ("exact", "fd")


def check_backend(backend: str, op: str) -> str:
    """The backend of the fused ops a regularizer runs its cross-entropy (and, for input-gradient
    penalties, the squared-norm reduction) through: "auto" | "torch" | "triton" | "cuda". "auto"
    uses the fused kernels on a GPU and the torch reference on CPU; an explicit fused backend that
    cannot run on the inputs raises when the regularizer is called (fastrob._backend.resolve)."""
    return _backend.check_backend_name(backend)


class InputGradientRegularizer:
    """loss = mean_i CE_i + lam * penalty, penalty = mean_i ||g_i||_2^2 (norm="l2") or
    mean_i ||g_i||_1^2 / d (norm="l1"), g_i = d(sum_j CE_j)/dx_i, d the size of one sample.

    mode="exact" differentiates the penalty exactly, by double backprop.

    mode="fd" is Finlay & Oberman's finite-difference scheme, without double backprop: with
    g_i computed once and detached, and the direction v_i = g_i / ||g_i||_2 (l2) or
    sign(g_i) / sqrt(d) (l1) held constant (v_i = 0 where g_i = 0),
        penalty_fd = mean_i ((CE_i(x + h v) - CE_i(x)) / h)^2.
    For samples that do not interact (no BatchNorm in train mode),
    (CE_i(x + h v) - CE_i(x)) / h = g_i . v_i + O(h), and g_i . v_i = ||g_i||_2 (l2) or
    ||g_i||_1 / sqrt(d) (l1), so penalty_fd = penalty + O(h). Holding v fixed loses nothing in
    the limit for the parameter gradient either: d/dtheta (g . v)^2 with v = g / ||g|| fixed is
    2 g . dg/dtheta = d/dtheta ||g||^2 (an envelope argument; likewise for sign(g) and the l1
    norm), so the fd objective's parameter gradient also tends to the exact one as h -> 0.
    Cost: two forward passes, one backward to the input, then the user's backward through both
    forwards (measured 2.5-2.9x a plain step on CPU, against 2.5-3.7x for exact). The second
    forward replays the first one's random draws (Dropout masks in train mode: the CPU generator
    and the CUDA generator of x's device), so both are forwards of one function.

    The model may be any classifier returning [B, C] logits, in train or eval mode. The extra
    forward of mode="fd" runs in the model's mode on the batch x + h v (so BatchNorm in train mode
    uses that batch's statistics, the finite difference of the batch function) and does not move
    BatchNorm's running statistics: they move once, from the clean forward. With ReLU networks
    (ReLU'' = 0 almost everywhere) the input gradient is constant on each activation region, so the
    exact penalty's parameter gradient never sees how moving a kink would change it; use smooth
    activations (softplus, GELU) for the penalty to smooth the function (docs/regularizers.md).

    Args:
        lam: the weight of the penalty, >= 0 (default 0.1, Finlay & Oberman).
        norm: "l2" or "l1" (dual norm for Linf attacks).
        mode: "exact" or "fd".
        h: the finite-difference step of mode="fd", > 0 (default 0.01).
        backend: "auto" | "torch" | "triton" | "cuda": where the cross-entropy (whose backward the
            exact penalty differentiates) and the l2 norm reduction run (``check_backend``).
    """

    def __init__(self, lam: float = 0.1, norm: str = "l2", mode: str = "exact", h: float = 0.01, backend: str = "auto"):
        self.lam = check_float("lam", lam, min_value=0.0)
        if norm not in Fn.INPUT_GRADIENT_NORMS:
            raise ValueError(f"norm must be one of {Fn.INPUT_GRADIENT_NORMS}, got {norm!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.norm, self.mode, self.h = norm, mode, check_positive("h", h)
        self.backend = check_backend(backend, "InputGradientRegularizer")

    def __repr__(self):
        return (
            f"InputGradientRegularizer(lam={self.lam}, norm={self.norm!r}, mode={self.mode!r}, h={self.h}, "
            f"backend={self.backend!r})"
        )

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor) -> Objective:
        x, y = Fn.check_inputs(model, x, y)
        if self.mode == "exact":  # fd needs no double backward: a compiled model stays compiled
            model = eager_for_double_backward(model, "InputGradientRegularizer")
        # the fd forward replays the clean forward's random draws (Fn.replay)
        rng = Fn.rng_state(x.device) if self.mode == "fd" else None
        # Under DDP the input gradient is taken on the wrapped module's output (Fn.forward_pair)
        # exact: the penalty differentiates the backward of the model (attention, grouped convs: fastrob.routing)
        with twice_differentiable(self.backend) if self.mode == "exact" else contextlib.nullcontext():
            logits, inner = Fn.forward_pair(model, x, y)
        ce = Fn.per_sample_cross_entropy(logits, y, self.backend)
        ce_inner = ce if inner is logits else Fn.per_sample_cross_entropy(inner, y, self.backend)
        if self.mode == "exact":
            penalty = Fn.input_gradient_penalty(ce_inner, x, norm=self.norm, backend=self.backend)
        else:
            penalty = self._fd_penalty(model, x, y, ce_inner, rng)
        mean_ce = ce.mean()
        return Objective(mean_ce + self.lam * penalty, mean_ce, penalty, logits)

    def _fd_penalty(self, model, x, y, ce, rng):
        # The graph of the clean forward is kept: the objective is differentiated through it.
        g = Fn.input_grad(ce.sum(), x, retain_graph=True)
        v = fd_direction(g, self.norm)
        # The extra forward skips DDP's wrapper (one reducer preparation and one buffer broadcast
        # per step, from the clean forward); its graph reaches the same parameters.
        # Both forwards must be one function of x: a stochastic layer (Dropout in train mode) drawing
        # new masks would make (CE(x + hv) - CE(x)) / h a difference of two functions, O(1/h).
        module = unwrap(model)
        with Fn.preserved_buffers(module), Fn.replay(rng):
            ce_h = Fn.per_sample_cross_entropy(Fn.forward(module, x.detach() + self.h * v, y), y, self.backend)
        return ((ce_h - ce) / self.h).pow(2).mean()


def fd_direction(g: torch.Tensor, norm: str) -> torch.Tensor:
    """Finlay & Oberman's direction: g / ||g||_2 (l2) or sign(g) / sqrt(d) (l1), per sample; 0
    where g = 0 (no direction to take)."""
    flat = g.flatten(1).float()
    if norm == "l2":
        n = flat.norm(dim=1, keepdim=True)
        v = torch.where(n > 0, flat / n.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(flat))
    else:
        v = flat.sign() / flat.shape[1] ** 0.5
    return v.view_as(g).to(g.dtype)
