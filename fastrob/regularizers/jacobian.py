"""Jacobian-norm regularization (Hoffman, Roberts & Yaida 2019), with the projections batched."""

from __future__ import annotations

import contextlib

import torch

from fastrob import functional as Fn
from fastrob._checks import check_float, check_int
from fastrob.compiled import eager_for_double_backward
from fastrob.distributed import is_ddp, unwrap
from fastrob.objective import Objective
from fastrob.regularizers.input_gradient import check_backend
from fastrob.routing import twice_differentiable

BATCHING = ("auto", "replicate", "graph")


class JacobianRegularizer:
    """loss = mean_i CE_i + lam * penalty, penalty = 1/2 ||J||_F^2 / B, J = d logits / d x.

    For samples that do not interact this is mean_b 1/2 ||J_b||_F^2, J_b = d logits_b / d x_b.
    The penalty is Hoffman et al.'s unbiased estimate 1/2 * C/(P*B) * sum_p sum_b ||v_pb^T J_b||^2
    with P = n_proj independent projections v_pb uniform on the unit sphere of R^C
    (``fastrob.functional.jacobian_penalty``); ``exact=True`` uses the C one-hot vectors, which
    gives the exact value at C times the cost (B*C with BatchNorm in train mode, where a one-hot
    vector shared by the batch would add cross-sample terms; see the functional form).

    How the P > 1 projections are batched (``batching``):
      "graph": one forward of B and P vector-Jacobian products on its graph, one after another
          (what the reference implementation does).
      "replicate": one forward of the input stacked P times (P*B rows), one VJP with one
          projection per row, then one double backward: a few large kernels instead of P passes
          over the graph. Row (p, b) of the stack has Jacobian J_b, so the estimate is the same.
          Samples that interact (BatchNorm in train mode) would also interact across copies
          through shared batch statistics, and one copy's projection would leak into another's
          derivative: there each BatchNorm layer normalises each copy with its own statistics
          during this forward (``functional.per_replica_batch_norm``), which makes every copy
          compute exactly the B-batch function; the CE then comes from a separate clean forward
          of B, the only one that moves the running statistics. Without interacting samples the
          CE reuses the first copy's logits and there is one forward in all.
      "auto": "graph". Measured on CPU (docs/regularizers.md), "replicate" was 3x slower than
          the loop at 128x3x32x32 and a vmapped VJP (``is_grads_batched``) 1.45x slower; the
          choice is to be measured again on a GPU, where fewer, larger kernels should pay.
    Extra forward passes never move BatchNorm's running statistics: they move once per call, as
    in a plain training step.

    Args:
        lam: the weight of the penalty, >= 0 (default 0.01, Hoffman et al.).
        n_proj: random projections per sample, >= 1 (default 1).
        exact: compute the penalty exactly with one-hot projections.
        batching: "auto" | "replicate" | "graph", see above.
        generator: torch.Generator for the projections (default: the global RNG).
        backend: "auto" | "torch" | "triton" | "cuda", for the cross-entropy (``check_backend``).
    """

    def __init__(
        self,
        lam: float = 0.01,
        n_proj: int = 1,
        exact: bool = False,
        batching: str = "auto",
        generator: torch.Generator | None = None,
        backend: str = "auto",
    ):
        self.lam = check_float("lam", lam, min_value=0.0)
        self.n_proj = check_int("n_proj", n_proj, 1)
        self.exact = bool(exact)
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        self.batching, self.generator = batching, generator
        self.backend = check_backend(backend, "JacobianRegularizer")

    def __repr__(self):
        return (
            f"JacobianRegularizer(lam={self.lam}, n_proj={self.n_proj}, exact={self.exact}, "
            f"batching={self.batching!r}, backend={self.backend!r})"
        )

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor) -> Objective:
        x, y = Fn.check_inputs(model, x, y)
        model = eager_for_double_backward(model, "JacobianRegularizer")
        with twice_differentiable(self.backend):  # the penalty differentiates a backward
            logits, penalty = jacobian_objective_parts(
                model, x, y, n_proj=self.n_proj, exact=self.exact, batching=self.batching, generator=self.generator
            )
        ce = Fn.per_sample_cross_entropy(logits, y, self.backend).mean()
        return Objective(ce + self.lam * penalty, ce, penalty, logits)


def jacobian_objective_parts(model, x, y, *, n_proj, exact, batching, generator):
    """(logits of the clean batch, Jacobian penalty), x a checked leaf requiring grad."""
    coupled = Fn.couples_samples(model)
    if batching == "replicate" and exact and coupled:
        raise ValueError(
            "batching='replicate' with exact=True needs samples that do not interact, but the "
            "model has BatchNorm in train mode (B*C single-sample projections); use 'graph' or 'auto'"
        )
    if batching in ("auto", "graph") or (n_proj == 1 and not exact):
        # Under DDP the VJPs run on the wrapped module's output (Fn.forward_pair)
        logits, inner = Fn.forward_pair(model, x, y)
        return logits, Fn.jacobian_penalty(
            inner, x, n_proj=n_proj, exact=exact, generator=generator, samples_interact=coupled
        )
    # The clean forward comes first where the CE cannot take the first copy's logits: when the
    # copies' forward must not move running statistics, when C (the copies of exact mode) is known
    # only from the logits, and under DDP, whose one forward per step must be the loss's (the
    # stacked forward then runs on the unwrapped module).
    ddp = is_ddp(model)
    logits = Fn.forward(model, x, y) if exact or coupled or ddp else None
    model = unwrap(model)
    copies = logits.shape[1] if exact else n_proj
    batch = x.shape[0]
    x_rep = x.detach().repeat(copies, *([1] * (x.dim() - 1))).requires_grad_(True)
    with contextlib.ExitStack() as stack:
        if logits is not None:
            stack.enter_context(Fn.preserved_buffers(model))
        stack.enter_context(Fn.per_replica_batch_norm(model, copies))
        logits_rep = Fn.forward(model, x_rep, y.repeat(copies))
    if logits is None:
        logits = logits_rep[:batch]
    v = Fn.projections(batch, logits.shape[1], copies, exact, logits_rep, generator)
    # Row p*B + b of the stack takes projection v[p, b]: one VJP for all P.
    penalty = Fn.projected_jacobian_penalty(logits_rep, x_rep, v.reshape(1, copies * batch, -1), scale=logits.shape[1])
    return logits, penalty
