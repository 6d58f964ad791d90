"""Functional forms of the regularizers' penalties, for users who already have the logits or the
per-sample losses of a forward pass, plus the model-calling helpers the regularizer classes share.

Every penalty here is differentiable with respect to the model's parameters (it is built with
``create_graph=True``) and is computed with ``torch.autograd.grad`` with respect to the input only,
so no parameter's ``.grad`` changes until the caller runs ``backward``.

Batch coupling. The gradients below are those of the *summed* loss (or logits) with respect to
the batch: sample i's row is d(sum_j l_j)/dx_i. When samples do not interact (no BatchNorm in
train mode) this is d l_i / d x_i exactly; with BatchNorm in train mode it also carries the terms
through the batch statistics, which is what an eager double-backprop user computes too.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fastrob._checks import (
    check_finite,
    check_int,
    check_labels,
    check_logits,
    check_model,
    check_model_input,
    check_tensor,
)
from fastrob.ops._common import resolve_backend
from fastrob.ops.batch_norm import batch_norm as fused_batch_norm
from fastrob.ops.cross_entropy import cross_entropy_unchecked
from fastrob.ops.sqnorm import sqnorm
from fastrob.routing import check_twice_differentiable

INPUT_GRADIENT_NORMS = ("l2", "l1")


# ---- the formulas ---------------------------------------------------------------------------


def input_gradient_penalty(
    loss_per_sample: torch.Tensor,
    x: torch.Tensor,
    *,
    norm: str = "l2",
    weight: torch.Tensor | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """mean_i ||w * g_i||_2^2 (norm="l2") or mean_i ||w * g_i||_1^2 / d (norm="l1").

    g_i = d(sum_j loss_per_sample_j) / d x_i is sample i's input gradient (see the module
    docstring for batch coupling), d the number of elements of one sample and w an optional
    elementwise weight broadcastable to ``x`` (1 when None; J-SIGR's 1 - saliency mask). l1 is the
    dual norm of Linf attacks; dividing by d puts it on the scale of the l2 penalty
    (||g||_1^2 / d <= ||g||_2^2). Differentiable by double backprop.

    Args:
        loss_per_sample: [B] per-sample losses computed from ``x`` (e.g. cross-entropy with
            ``reduction="none"``).
        x: [B, ...] the input the losses were computed from; it must require grad.
        backend: for the l2 norm's reduction (``fastrob.ops.sqnorm``); "torch" (default) or
            "auto" | "triton" | "cuda".
    """
    check_tensor("loss_per_sample", loss_per_sample)
    check_tensor("x", x, min_dim=2)
    if loss_per_sample.shape != (x.shape[0],):
        raise ValueError(f"loss_per_sample must have shape [B] = ({x.shape[0]},), got {tuple(loss_per_sample.shape)}")
    if norm not in INPUT_GRADIENT_NORMS:
        raise ValueError(f"norm must be one of {INPUT_GRADIENT_NORMS}, got {norm!r}")
    _check_differentiable(loss_per_sample, x)
    g = input_grad(loss_per_sample.sum(), x, create_graph=True)
    if weight is not None:
        g = g * weight
    return gradient_norm_penalty(g, norm, backend=backend)


def gradient_norm_penalty(g: torch.Tensor, norm: str, *, backend: str = "torch") -> torch.Tensor:
    """mean_i ||g_i||_2^2, or mean_i ||g_i||_1^2 / d, of a [B, ...] gradient (float32 at least).

    With a backend other than "torch", the l2 norms are ``fastrob.ops.sqnorm`` (fused, twice
    differentiable; "auto" uses the reference on CPU)."""
    if norm == "l2" and backend != "torch":
        return sqnorm(g, backend=backend).mean()
    g = g.flatten(1)
    if g.dtype in (torch.float16, torch.bfloat16):
        g = g.float()  # squares of half-precision gradients underflow
    if norm == "l2":
        return g.pow(2).sum(1).mean()
    return g.abs().sum(1).pow(2).mean() / g.shape[1]


def jacobian_penalty(
    logits: torch.Tensor,
    x: torch.Tensor,
    *,
    n_proj: int = 1,
    exact: bool = False,
    samples_interact: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """1/2 ||J||_F^2 / B with J = d logits / d x the Jacobian of the whole batch, [B*C, B*d].

    For samples that do not interact, J is block-diagonal and this is mean_b 1/2 ||J_b||_F^2,
    J_b = d logits_b / d x_b. Estimated as Hoffman et al. do:
        1/2 * C / (P * B) * sum_p ||v_p^T J||^2,
    v_p = (v_p1, ..., v_pB) with P = n_proj independent v_pb uniform on the unit sphere of R^C per
    sample. Unbiased because E[v v^T] = I / C within a sample and the samples' v are independent
    (cross-sample terms vanish in expectation, so it is unbiased with train-mode BatchNorm too).

    ``exact=True`` computes the value exactly: with the C one-hot vectors (the same e_c for every
    sample, P = C) when samples do not interact; with ``samples_interact=True`` (BatchNorm in train
    mode) one-hot vectors on one sample at a time, P = B*C, since a one-hot vector shared by the
    batch would add the cross-sample products sum_{j != k} <d z_jc/dx, d z_kc/dx>. The latter costs
    B*C VJPs: a check, not a training method.

    On a given graph the P vector-Jacobian products run one after another: batching them with
    ``is_grads_batched`` (vmap over the backward) measured 1.5x slower on CPU, and on torch 2.13
    the batched VJP fails on GroupNorm. ``JacobianRegularizer(batching="replicate")``, which owns
    the forward pass, batches them by stacking the input instead (docs/regularizers.md).

    Args:
        logits: [B, C] computed from ``x``.
        x: [B, ...] the input, requiring grad.
        n_proj: P, the number of random projections per sample (ignored when ``exact``).
        samples_interact: whether the logits of one sample depend on other samples' inputs
            (matters for ``exact`` only).
        generator: the random generator for the projections, on the logits' device (default:
            torch's global one).
    """
    check_tensor("logits", logits, min_dim=2)
    check_tensor("x", x, min_dim=2)
    if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"logits must have shape [B, C] with B = {x.shape[0]}, got {tuple(logits.shape)}")
    n_proj = check_int("n_proj", n_proj, 1)
    _check_differentiable(logits, x)
    rows, classes = logits.shape
    if exact and samples_interact:
        # v[b*C + c] is e_c on sample b and 0 elsewhere: every output element on its own.
        v = torch.eye(rows * classes, device=logits.device, dtype=logits.dtype).view(rows * classes, rows, classes)
        return projected_jacobian_penalty(logits, x, v, scale=1.0)
    v = projections(rows, classes, n_proj, exact, logits, generator)
    return projected_jacobian_penalty(logits, x, v, scale=classes / v.shape[0])


def projections(
    rows: int, classes: int, n_proj: int, exact: bool, like: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[P, rows, C] projection vectors: the C one-hot vectors (P = C) when ``exact``, else
    P x rows independent vectors uniform on the unit sphere (normalised Gaussians)."""
    if exact:
        eye = torch.eye(classes, device=like.device, dtype=like.dtype)
        return eye[:, None, :].expand(classes, rows, classes)
    v = torch.randn(n_proj, rows, classes, device=like.device, dtype=torch.float32, generator=generator)
    return (v / v.norm(dim=-1, keepdim=True)).to(like.dtype)


def projected_jacobian_penalty(logits: torch.Tensor, x: torch.Tensor, v: torch.Tensor, *, scale: float) -> torch.Tensor:
    """1/2 * scale / N * sum_p ||v_p^T J||^2 for projections v of shape [P, N, C], J = d logits / d x.

    The one formula behind every Jacobian penalty here; ``scale`` is C / P for one unit vector
    per sample and projection (random: Hoffman's unbiased estimate; one-hot: the exact value).
    One VJP per projection (see ``jacobian_penalty`` for why not a vmapped one).
    """
    total = 0.0
    for p in range(v.shape[0]):
        g = input_grad(logits, x, v[p], create_graph=True, retain_graph=True)
        if g.dtype in (torch.float16, torch.bfloat16):
            g = g.float()  # squares of half-precision gradients underflow
        total = total + g.pow(2).sum()
    return 0.5 * scale * total / logits.shape[0]


# ---- argument checks and model calls shared by the regularizer classes ----------------------


def check_inputs(model, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks (model, x, y); returns a leaf copy of x that requires grad, and y as int64.

    x must hold at least one sample (a mean over an empty batch is NaN, not a loss), finite values
    (one NaN pixel makes the loss and then every parameter NaN after one optimizer step), and fit
    the model (dtype, no meta device: ``fastrob._checks.check_model_input``). x is never modified:
    the copy is a detached view, so the caller's tensor and its graph (if any) stay as they were.
    """
    check_model(model)
    check_tensor("x", x, min_dim=2)
    y = check_labels(y, x.shape[0])
    if x.shape[0] == 0:
        raise ValueError(f"x holds no samples (shape {tuple(x.shape)}): a regularizer needs a non-empty batch")
    check_model_input(model, x)
    check_finite("x", x)
    return x.detach().requires_grad_(True), y


def rng_state(device: torch.device) -> tuple:
    """(device, CPU generator state, CUDA generator state of ``device`` or None)."""
    device = torch.device(device)
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return device, torch.get_rng_state(), cuda


@contextlib.contextmanager
def replay(saved: tuple):
    """Runs the block from the RNG state ``saved`` (``rng_state``), so that its random draws
    (Dropout masks) repeat those made after ``saved`` was taken; restores the state the block
    found, so that the caller's later draws are unchanged by the replay."""
    device, cpu, cuda = saved
    now = rng_state(device)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    try:
        yield
    finally:
        torch.set_rng_state(now[1])
        if now[2] is not None:
            torch.cuda.set_rng_state(now[2], device)


def forward(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """model(x), checked to be [N, C] logits with every label of y < C."""
    logits = model(x)
    check_logits(logits, x.shape[0], y)
    return logits


def forward_pair(model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, inner): ``model(x)`` checked as in ``forward``, and the same values to take
    input gradients of (``autograd.grad`` with respect to x, inside the objective).

    For a plain module both are the same tensor. For a ``DistributedDataParallel`` model, ``inner``
    is the wrapped module's own output, captured by a forward hook before DDP passes it through its
    ``_DDPSink`` autograd function (with ``find_unused_parameters=True``, and on the first iteration
    with ``static_graph=True``). An inner backward through the sink, on the first static-graph
    iteration, queues the reducer's delayed all-reduce at the end of that inner backward, before any
    parameter gradient exists: the gradients come out wrong, silently, on every later iteration
    (measured: 0.3 off on a small MLP). The loss terms use ``logits`` (so the outer backward passes
    the sink once, as DDP expects) and the penalties differentiate ``inner``; both graphs reach the
    same parameters, whose gradients the outer backward sums before DDP's hooks reduce them once.
    """
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        logits = forward(model, x, y)
        return logits, logits
    captured = []
    handle = model.module.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        logits = forward(model, x, y)
    finally:
        handle.remove()
    return logits, captured[-1] if captured and isinstance(captured[-1], torch.Tensor) else logits


def per_sample_cross_entropy(logits: torch.Tensor, y: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """CE(z_b, y_b) = logsumexp(z_b) - z_b[y_b] per sample, [B], in float32 at least (bf16 autocast
    logits lose too much in log-softmax); the regularizers' CE, unchecked.

    ``backend`` other than "torch" runs ``fastrob.ops.cross_entropy`` (the public, checked op:
    fused, twice differentiable, with reduction and label smoothing; "auto" uses the reference on
    CPU). Labels are not checked again here: ``forward`` did."""
    name = resolve_backend(backend, logits, op="cross_entropy")
    if name != "torch":
        return cross_entropy_unchecked(logits, y, backend=name)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, y, reduction="none")


@contextlib.contextmanager
def preserved_buffers(model):
    """Runs the block with scratch copies of ``model``'s buffers, and puts the originals back.

    For the extra forward passes a regularizer makes: in train mode BatchNorm updates its running
    statistics on every forward, and those must move once per training step, from the clean
    batch. Swapping the buffers (rather than copying the old values back) leaves the originals
    untouched, so autograd's version check on buffers the clean forward saved still passes.
    """
    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
    saved = [(m, dict(m._buffers)) for m in modules if m._buffers]
    for m, buffers in saved:
        for name, b in buffers.items():
            if b is not None:
                m._buffers[name] = b.clone()
    try:
        yield
    finally:
        for m, buffers in saved:
            m._buffers.update(buffers)


@torch.no_grad()
def update_running_stats(model, x: torch.Tensor) -> None:
    """Moves BatchNorm's running statistics as one train-mode forward of ``x`` does (the one move
    per training step), for objectives whose differentiated forwards all run under
    ``preserved_buffers``; nothing when no BatchNorm is in train mode."""
    if coupling_modules(model):
        model(x)


def coupling_modules(model) -> list:
    """The modules of ``model`` that mix samples in their forward: BatchNorm in train mode (batch
    statistics). GroupNorm, LayerNorm and InstanceNorm normalise per sample and do not."""
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]


def couples_samples(model) -> bool:
    if not isinstance(model, torch.nn.Module):
        return True  # an unknown callable: assume the worst
    return bool(coupling_modules(model))


@contextlib.contextmanager
def per_replica_batch_norm(model, replicas: int):
    """Within the block, batch normalisation with batch statistics normalises a batch of
    ``replicas`` stacked copies (rows r*B .. r*B + B - 1 for copy r) with each copy's own batch
    statistics, so that every copy computes exactly the B-batch function, its cross-sample
    derivatives through the statistics included, and no copy's derivatives leak into another's.

    It replaces the normalisation itself, wherever a forward calls it: ``F.batch_norm`` (torch's
    BatchNorm1d/2d/3d and subclasses that call it, such as timm's BatchNormAct2d, whose activation
    still runs) and ``fastrob.ops.batch_norm`` (fastrob's fused modules), in train mode (batch
    statistics); eval-mode calls run unchanged. Nothing is replaced when ``model`` has no
    train-mode BatchNorm (``couples_samples``). The running mean and variance are not updated in
    the block, but the modules' own bookkeeping (``num_batches_tracked``) is: use it inside
    ``preserved_buffers`` where no state may move. SyncBatchNorm in a multi-process run
    synchronises its statistics with its own function and is not split.
    """
    if replicas <= 1 or not couples_samples(model):
        yield
        return
    with _PerReplicaBatchNorm(replicas):
        yield


class _PerReplicaBatchNorm(TorchFunctionMode):
    def __init__(self, replicas: int):
        super().__init__()
        self.replicas = replicas

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            call = _F_BATCH_NORM.bind(*args, **kwargs).arguments
        elif func is fused_batch_norm:
            call = _FUSED_BATCH_NORM.bind(*args, **kwargs).arguments
        else:
            return func(*args, **kwargs)
        if not call.get("training", False):  # running statistics: no coupling between samples
            return func(*args, **kwargs)
        x = call.get("input", call.get("x"))
        return _replica_batch_norm(x, call.get("weight"), call.get("bias"), call.get("eps", 1e-5), self.replicas)


_F_BATCH_NORM = inspect.signature(F.batch_norm)
_FUSED_BATCH_NORM = inspect.signature(fused_batch_norm)


def _replica_batch_norm(x, weight, bias, eps, replicas):
    """Batch norm of [R*B, C, ...] with the statistics of each copy's B rows."""
    if x.shape[0] % replicas:
        raise ValueError(f"per_replica_batch_norm: a batch of {x.shape[0]} rows is not {replicas} stacked copies")
    channels = x.shape[1]
    # [R*B, C, ...] -> [B, R*C, ...]: channel r*C + c is channel c of copy r
    xg = x.unflatten(0, (replicas, -1)).movedim(0, 1).flatten(1, 2)
    weight = weight.repeat(replicas) if weight is not None else None
    bias = bias.repeat(replicas) if bias is not None else None
    y = F.batch_norm(xg, None, None, weight, bias, True, 0.0, eps)
    return y.unflatten(1, (replicas, channels)).movedim(1, 0).flatten(0, 1)


def input_grad(outputs, x: torch.Tensor, grad_outputs=None, *, create_graph=False, retain_graph=None):
    """``torch.autograd.grad(outputs, x, grad_outputs)``, with a model whose output does not depend on
    x (its forward detaches its input) refused in words instead of autograd's "appears to not have
    been used in the graph"; with ``create_graph`` (a gradient that will itself be differentiated),
    a graph through torch's fused attention is refused here, naming the fix, rather than at the
    user's later ``loss.backward()``."""
    if create_graph:
        check_twice_differentiable(outputs, "the outputs")
    (g,) = torch.autograd.grad(
        outputs, x, grad_outputs, create_graph=create_graph, retain_graph=retain_graph, allow_unused=True
    )
    if g is None:
        raise ValueError(
            "the model's output does not depend on x, so it has no input gradient (does the "
            "model's forward detach its input, or compute it from something other than x?)"
        )
    return g


def _check_differentiable(out: torch.Tensor, x: torch.Tensor) -> None:
    if not x.requires_grad:
        raise ValueError("x must require grad and be the input the outputs were computed from")
    if not out.requires_grad:
        raise ValueError("the outputs do not depend on x (or were computed under torch.no_grad)")
