"""Jacobian-norm regularization (Hoffman, Roberts & Yaida 2019), with the projections batched."""

from __future__ import annotations

import contextlib

import torch

from fastrob import functional as Fn
from fastrob.objective import Objective
from fastrob.regularizers.input_gradient import check_backend

BATCHING = ("auto", "replicate", "vjp")


class JacobianRegularizer:
    """loss = mean_i CE_i + lam * penalty, penalty = 1/2 ||J||_F^2 / B, J = d logits / d x.

    For samples that do not interact this is mean_b 1/2 ||J_b||_F^2, J_b = d logits_b / d x_b.
    The penalty is Hoffman et al.'s unbiased estimate 1/2 * C/(P*B) * sum_p sum_b ||v_pb^T J_b||^2
    with P = n_proj independent projections v_pb uniform on the unit sphere of R^C
    (``fastrob.functional.jacobian_penalty``); ``exact=True`` uses the C one-hot vectors, which
    gives the exact value at C times the cost (B*C with BatchNorm in train mode, where a one-hot
    vector shared by the batch would add cross-sample terms; see the functional form).

    How the P > 1 projections are batched (``batching``):
      "replicate": one forward of the input repeated P times (P*B samples), one VJP with one
          projection per row, then one double backward. Mathematically the same estimate, since
          row (p, b) of the replicated batch has Jacobian J_b. The CE uses the first replica's
          logits. Measured fastest on CPU (docs/regularizers.md). Only valid when samples do not
          interact: with BatchNorm in train mode, replicas would share batch statistics and the
          VJP of one replica's projection would leak into the others through them.
      "vjp": one forward of B, and all P projections in one batched VJP on that graph
          (``is_grads_batched``, i.e. vmap over the backward). Exact for any model, BatchNorm in
          train mode included (there it is the Frobenius norm of the whole batch's Jacobian,
          the terms through the batch statistics included, as the reference loop computes).
      "auto": "replicate" unless a BatchNorm layer is in train mode, then "vjp".
    n_proj=1 (the default, and Hoffman's) is one forward and one VJP either way. Forward passes
    beyond the clean one do not move BatchNorm's running statistics.

    Args:
        lam: the weight of the penalty, >= 0 (default 0.01, Hoffman et al.).
        n_proj: random projections per sample, >= 1 (default 1).
        exact: compute the penalty exactly with one-hot projections.
        batching: "auto" | "replicate" | "vjp", see above.
        generator: torch.Generator for the projections (default: the global RNG).
        backend: "auto" | "torch".
    """

    def __init__(self, lam: float = 0.01, n_proj: int = 1, exact: bool = False, batching: str = "auto",
                 generator: torch.Generator | None = None, backend: str = "auto"):
        self.lam = Fn.check_lam("lam", lam)
        self.n_proj = Fn.check_n_proj(n_proj)
        self.exact = bool(exact)
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        self.batching, self.generator = batching, generator
        self.backend = check_backend(backend, "JacobianRegularizer")

    def __repr__(self):
        return (f"JacobianRegularizer(lam={self.lam}, n_proj={self.n_proj}, exact={self.exact}, "
                f"batching={self.batching!r}, backend={self.backend!r})")

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor) -> Objective:
        x, y = Fn.check_inputs(model, x, y)
        logits, penalty = jacobian_objective_parts(model, x, y, n_proj=self.n_proj, exact=self.exact,
                                                   batching=self.batching, generator=self.generator)
        ce = Fn.cross_entropy(logits, y).mean()
        return Objective(ce + self.lam * penalty, ce, penalty, logits)


def jacobian_objective_parts(model, x, y, *, n_proj, exact, batching, generator):
    """(logits of the clean batch, Jacobian penalty), x a checked leaf requiring grad."""
    replicate = not (n_proj == 1 and not exact) and batching != "vjp"
    if replicate and Fn.couples_samples(model):
        if batching == "replicate":
            raise ValueError("batching='replicate' needs samples that do not interact, but the model has "
                             "BatchNorm in train mode; use batching='vjp' or 'auto'")
        replicate = False
    if not replicate:
        logits = Fn.forward(model, x, y)
        return logits, Fn.jacobian_penalty(logits, x, n_proj=n_proj, exact=exact, generator=generator,
                                           samples_interact=Fn.couples_samples(model))
    if exact:
        # C is known only after a forward: the clean one, which the CE uses.
        logits = Fn.forward(model, x, y)
        n_rep = logits.shape[1]
    else:
        logits, n_rep = None, n_proj
    batch = x.shape[0]
    x_rep = x.detach().repeat(n_rep, *([1] * (x.dim() - 1))).requires_grad_(True)
    with Fn.preserved_buffers(model) if logits is not None else contextlib.nullcontext():
        logits_rep = Fn.forward(model, x_rep, y.repeat(n_rep))
    if logits is None:
        logits = logits_rep[:batch]
    v = Fn.projections(batch, logits.shape[1], n_rep, exact, logits_rep, generator)
    # Row p*B + b of the replicated batch takes projection v[p, b]: one VJP for all P.
    penalty = Fn.projected_jacobian_penalty(logits_rep, x_rep, v.reshape(1, n_rep * batch, -1), scale=logits.shape[1])
    return logits, penalty
