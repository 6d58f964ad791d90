"""Batched projected gradient descent (PGD) on the input: the functional engine ``pgd`` and the
torchattacks-compatible classes ``PGD``, ``PGDL2`` and ``FGSM``.

For each sample b with clean input x_b, label y_b and per-sample loss l(f(x'), y), PGD maximises
  J(x') = l(f(x'), y)            (untargeted; y are the true labels)
  J(x') = -l(f(x'), t)           (targeted;   t are the target labels)
over x' in B(x_b, eps_b) ∩ [0, 1] by ``steps`` fused projected steps (``fastrob.ops.pgd_step``):
  Linf: x' <- Π(x' + alpha_b·sign(∇J)),   L2: x' <- Π(x' + alpha_b·∇J/‖∇J‖₂).
∇J is the gradient of Σ_b J_b with respect to the input only (parameters never get gradients),
so each sample's step is independent of the others in the batch. That independence is what lets
restarts run as one batch of R·B and lets ``robust_only`` drop samples without changing the rest.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from fastrob import _backend
from fastrob._checks import (check_generator, check_int, check_labels, check_logits, check_model, check_tensor,
                             per_sample_value)
from fastrob.distributed import unwrap
from fastrob.ops._common import per_sample_view
from fastrob.ops.pgd_step import NORMS, pgd_step_unchecked

LOSSES = ("ce", "margin", "kl")
STARTS = (True, False, "uniform", "normal", "trades")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# losses: each returns the per-sample loss l(z, y), shape [B]; the engine maximises ±l.

def margin_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin max_{j≠y} z_j - z_y per sample (> 0 exactly when misclassified)."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


def kl_loss(logits: torch.Tensor, p_clean: torch.Tensor) -> torch.Tensor:
    """KL(p_clean ‖ softmax(logits)) per sample: TRADES' inner objective."""
    log_p = F.log_softmax(logits, dim=1)
    return (torch.xlogy(p_clean, p_clean) - p_clean * log_p).sum(1)


def _objective(loss, logits, labels, p_clean, targeted):
    """J per sample (the quantity ascended); half-precision logits (autocast) are upcast to float32."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if loss == "ce":
        value = F.cross_entropy(logits, labels, reduction="none")
    elif loss == "margin":
        value = margin_loss(logits, labels)
    elif loss == "kl":
        value = kl_loss(logits, p_clean)
    else:
        value = loss(logits, labels)
        if not isinstance(value, torch.Tensor) or value.shape != (logits.shape[0],):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"loss must return one value per sample, shape ({logits.shape[0]},), got {got}")
        value = value.float()
    return -value if targeted else value


# ----------------------------------------------------------------------------------------------
# model state: eval mode during the attack, parameters frozen, everything restored afterwards.

@contextlib.contextmanager
def attack_context(model, training: Union[bool, Callable] = False):
    """Runs the block with ``model`` in eval mode (``training=True``: train mode; a callable:
    called with the model to set modes itself) and every parameter's requires_grad off, so the
    backward computes input gradients only. Restores each module's ``training`` and each
    parameter's ``requires_grad`` on exit, also after an exception."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in params:
            p.requires_grad_(False)
        if callable(training):
            training(model)
        else:
            model.train(bool(training))
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in params:
            p.requires_grad_(flag)


# ----------------------------------------------------------------------------------------------
# argument checks

def _check_inputs(model, x, y, clamp_input):
    check_model(model)
    check_tensor("x", x, min_dim=2)
    if bool(torch.isnan(x).any()):
        raise ValueError("x contains NaN")
    if not clamp_input and x.numel() and (bool(x.min() < 0) or bool(x.max() > 1)):
        raise ValueError(f"x must lie in [0, 1] (got values in [{x.min().item():.4g}, {x.max().item():.4g}]); "
                         "pass clamp_input=True to clamp it")
    if y is not None:
        check_labels(y, x.shape[0])


# ----------------------------------------------------------------------------------------------
# random starts

def _random_start(x, eps, kind, norm, generator):
    """One start for the whole batch, drawn exactly as torchattacks draws it (so that the same
    seed gives the same start): Linf uniform in the eps-box, L2 a Gaussian direction times a
    U(0,1) radius, clamped to [0, 1]; "trades" x + 0.001·N(0,1), projected into the ball but, as in
    the TRADES reference, not clamped (the first step clamps it)."""
    if kind is False:
        return x.clone()
    if kind is True:
        kind = "uniform" if norm == "linf" else "normal"
    if kind == "uniform":
        if isinstance(eps, torch.Tensor):
            delta = torch.empty_like(x).uniform_(-1, 1, generator=generator) * per_sample_view(eps, x)
        else:
            delta = torch.empty_like(x).uniform_(-eps, eps, generator=generator)
        return torch.clamp(x + delta, 0, 1)
    if kind == "normal":
        delta = torch.empty_like(x).normal_(generator=generator)
        n = delta.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (x.dim() - 1)))
        r = torch.zeros_like(n).uniform_(0, 1, generator=generator)
        delta *= r / n * per_sample_view(eps, x)
        return torch.clamp(x + delta, 0, 1)
    # "trades": a tiny Gaussian kick so that the KL (0 at x' = x, with zero gradient) can move.
    delta = 0.001 * torch.empty_like(x).normal_(generator=generator)
    e = per_sample_view(eps, x)
    if norm == "linf":
        delta = torch.clamp(delta, -e, e)
    else:
        n = delta.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
        delta = delta * torch.clamp(e / n.clamp_min(1e-30), max=1.0)
    return x + delta


# ----------------------------------------------------------------------------------------------
# the engine

_warned_graph = False


def _warn_graph(reason):
    global _warned_graph
    if not _warned_graph:
        _warned_graph = True
        warnings.warn(f"fastrob.attacks: cuda_graph=True falls back to eager execution: {reason}",
                      RuntimeWarning, stacklevel=4)


def pgd(model, x: torch.Tensor, y: Optional[torch.Tensor] = None, *, eps=8 / 255, alpha=2 / 255, steps: int = 10,
        norm: str = "linf", random_start: Union[bool, str] = True, restarts: int = 1,
        loss: Union[str, LossFn] = "ce", targeted: bool = False, robust_only: bool = False,
        early_stop: Optional[bool] = None, backend: str = "auto", amp: Optional[str] = None,
        cuda_graph: bool = False, clamp_input: bool = False, model_training: Union[bool, Callable] = False,
        generator: Optional[torch.Generator] = None, return_fooled: bool = False, _graph_cache=None):
    """Projected gradient descent on the input, all restarts in one batch (see the module docstring).

    Args:
        model: maps x [B, ...] to logits [B, C].
        x: clean inputs in [0, 1] (NCHW images or any shape with the batch first).
        y: labels [B] (target labels when ``targeted``); None: the model's own predictions.
        eps, alpha: radius and step size, floats or per-sample [B] tensors, >= 0.
        steps: number of steps (0 returns the start).
        norm: "linf" or "l2".
        random_start: True (Linf uniform, L2 torchattacks' Gaussian·U(0,1) radius), False (start
            at x), "uniform", "normal", or "trades" (x + 0.001·N(0,1)).
        restarts: R random starts run as one batch of R·B; per sample the result is a restart that
            fools the model if one does, else the one with the highest J. Restart 0 draws the same
            start a single run draws, so restarts are never weaker than one run.
        loss: "ce", "margin" (max_{j≠y} z_j - z_y), "kl" (KL(f(x) ‖ f(x')), TRADES) or a callable
            (logits [B, C], labels [B]) -> per-sample losses [B].
        targeted: descend the loss towards the labels ``y`` instead of ascending it away from them.
        early_stop: keep, per sample, the first iterate (in step order, then restart order) that
            fools the model (argmax ≠ y, or = y when targeted) instead of the last one. Default:
            ``robust_only``; False reproduces torchattacks exactly.
        robust_only: early stop, and also drop fooled samples from all later steps and restarts (the
            batch shrinks), so a weak model costs a fraction of a full attack. Same result as
            ``early_stop=True`` without dropping, because the samples' steps are independent.
        backend: backend of the fused step ("auto" | "torch" | "triton" | "cuda").
        amp: None or "bf16": run the model's forward and backward under bfloat16 autocast (the step
            and the loss stay float32).
        cuda_graph: capture the step loop as one CUDA graph (CUDA tensors, fixed shapes, no early
            stop); falls back to eager execution, with one warning, when it cannot.
        clamp_input: clamp x into [0, 1] instead of raising for values outside.
        model_training: the model's mode during the attack (False: eval); see ``attack_context``.
        generator: torch.Generator for the random starts (default: the global RNG, as torchattacks).
        return_fooled: also return a [B] bool tensor: whether the returned input fools the model.

    Returns:
        x_adv (x's shape and dtype, no grad), or (x_adv, fooled) with ``return_fooled``.
    """
    _check_inputs(model, x, y, clamp_input)
    check_generator(generator, x.device)
    # Under DDP the attack runs the wrapped module: a DDP forward would prepare the reducer and
    # broadcast buffers, a collective that ranks attacking different numbers of steps would hang in.
    model = unwrap(model)
    steps = check_int("steps", steps, 0)
    restarts = check_int("restarts", restarts, 1)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not callable(loss) and loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES} or a callable (logits, labels) -> [B], got {loss!r}")
    if loss == "kl" and targeted:
        raise ValueError("loss='kl' has no target: use targeted=False with it")
    if not any(random_start is s for s in STARTS[:2]) and random_start not in STARTS[2:]:
        raise ValueError(f"random_start must be one of {STARTS}, got {random_start!r}")
    if amp not in (None, "bf16"):
        raise ValueError(f"amp must be None or 'bf16', got {amp!r}")
    if early_stop is None:
        early_stop = robust_only
    elif robust_only and not early_stop:
        raise ValueError("robust_only=True drops fooled samples, so it needs early_stop=True (or None)")
    batch = x.shape[0]
    x = torch.clamp(x, 0, 1).detach() if clamp_input else x.detach()
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    eps = per_sample_value("eps", eps, batch, x.device, dtype=compute)
    alpha = per_sample_value("alpha", alpha, batch, x.device, dtype=compute)
    backend = _backend.resolve(backend, x.device, x.dtype, op="pgd")

    with attack_context(model, model_training):
        autocast = (torch.autocast(x.device.type, dtype=torch.bfloat16) if amp == "bf16"
                    else contextlib.nullcontext())

        def forward(inp):
            with autocast:
                return model(inp)

        with torch.no_grad():
            clean_logits = forward(x) if (y is None or loss == "kl") else None
        if clean_logits is not None:
            check_logits(clean_logits, batch, None)
        if y is None:
            if targeted:
                raise ValueError("targeted=True needs target labels y")
            y = clean_logits.argmax(1)
        y = y.to(device=x.device, dtype=torch.long)
        p_clean = F.softmax(clean_logits.float(), dim=1) if loss == "kl" else None

        starts = [_random_start(x, eps, random_start, norm, generator) for _ in range(restarts)]
        rep = (restarts,) + (1,) * (x.dim() - 1)
        work = _Work(x_adv=torch.cat(starts), x0=x.repeat(rep), y=y.repeat(restarts),
                     p0=p_clean.repeat(restarts, 1) if p_clean is not None else None,
                     eps=eps.repeat(restarts) if isinstance(eps, torch.Tensor) else eps,
                     alpha=alpha.repeat(restarts) if isinstance(alpha, torch.Tensor) else alpha,
                     idx=torch.arange(restarts * batch, device=x.device))

        def objective(inp, w, need_grad, check=False):
            with torch.enable_grad():
                inp = inp.detach().requires_grad_(need_grad)
                logits = forward(inp)
                if check:  # checked once: the label check synchronises with the device
                    check_logits(logits, inp.shape[0], w.y)
                j = _objective(loss, logits, w.y, w.p0, targeted)
                grad = torch.autograd.grad(j.sum(), inp)[0] if need_grad else None
            return logits.detach(), j.detach(), grad

        def step(w, grad):
            return pgd_step_unchecked(w.x_adv, grad, w.x0, alpha=w.alpha, eps=w.eps, norm=norm, lower=0.0,
                                      upper=1.0, backend=backend)

        need_final = restarts > 1 or early_stop or return_fooled
        use_graph = cuda_graph and steps > 0
        if use_graph:
            reason = None
            if x.device.type != "cuda":
                reason = f"tensors are on {x.device}, not CUDA"
            elif early_stop:
                reason = "early_stop / robust_only change shapes between steps"
            if reason is None:
                try:
                    work.x_adv = _graph_loop(objective, step, work, steps, _graph_cache)
                    steps_left = 0
                except Exception as err:  # capture is impossible for many models: run eagerly
                    reason = f"capture failed ({type(err).__name__}: {err})"
            if reason is not None:
                _warn_graph(reason)
                use_graph = False
        if not use_graph:
            steps_left = steps

        out = x.clone()
        done = torch.zeros(batch, dtype=torch.bool, device=x.device)
        for k in range(steps_left + 1):
            last = k == steps_left
            if last and not need_final:
                break
            logits, j, grad = objective(work.x_adv, work, need_grad=not last, check=k == 0)
            fooled_rows = _fooled(logits, work.y, targeted)
            if early_stop:
                _record_first(out, done, work, fooled_rows, batch)
                if robust_only and not last:
                    grad = work.keep(~done[work.idx % batch], grad)
            if last:
                _pick_best(out, work, j, fooled_rows, ~done[work.idx % batch], restarts, batch)
                break
            work.x_adv = step(work, grad)
        if not need_final:
            out = work.x_adv[:batch].clone()
        out.clamp_(0, 1)  # a no-op except for an unstepped "trades" start
        if return_fooled:
            with torch.no_grad():
                return out, _fooled(forward(out), y, targeted)
        return out


def _fooled(logits, labels, targeted):
    """Whether each row counts as fooled: argmax at the target (targeted), or off the label."""
    pred = logits.argmax(1)
    return pred == labels if targeted else pred != labels


class _Work:
    """The rows still being attacked: row i is restart idx[i] // B of sample idx[i] % B."""

    def __init__(self, x_adv, x0, y, p0, eps, alpha, idx):
        self.x_adv, self.x0, self.y, self.p0, self.eps, self.alpha, self.idx = x_adv, x0, y, p0, eps, alpha, idx

    def keep(self, rows, grad):
        if bool(rows.all()):
            return grad
        for name in ("x_adv", "x0", "y", "p0", "eps", "alpha", "idx"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, value[rows])
        return grad[rows] if grad is not None else None


def _record_first(out, done, work, hit, batch):
    """For samples not yet done that some row fools now, store the first such row's input."""
    hit = hit & ~done[work.idx % batch]
    if not bool(hit.any()):
        return
    rows = hit.nonzero().squeeze(1)
    samples = work.idx[rows] % batch
    # Several restarts of one sample can fool at the same step: the lowest restart wins, so the
    # result does not depend on which rows were dropped before.
    first = torch.full((batch,), work.idx.numel(), device=rows.device, dtype=rows.dtype)
    first.scatter_reduce_(0, samples, rows, reduce="amin")
    winners = first[samples] == rows
    out[samples[winners]] = work.x_adv[rows[winners]].to(out.dtype)
    done[samples] = True


def _pick_best(out, work, j, fooled, keep, restarts, batch):
    """Samples not done: the restart whose final iterate fools the model, else the highest J."""
    if not bool(keep.any()):
        return
    x_adv = work.x_adv[keep]
    samples = work.idx[keep].view(restarts, -1)[0] % batch
    if restarts == 1:
        out[samples] = x_adv.to(out.dtype)
        return
    j = j[keep].view(restarts, -1)
    fooled = fooled[keep].view(restarts, -1)
    candidates = fooled | ~fooled.any(0, keepdim=True)
    best = torch.where(candidates, j, torch.full_like(j, float("-inf"))).argmax(0)
    rows = best * samples.numel() + torch.arange(samples.numel(), device=best.device)
    out[samples] = x_adv[rows].to(out.dtype)


def _graph_loop(objective, step, work, steps, cache):
    """Runs the ``steps`` steps as one captured CUDA graph and returns the final iterate.

    The graph reads its inputs from static buffers, so a cached graph is replayed for later calls
    of the same shapes after copying the new inputs in (``cache``: a dict owned by the caller)."""
    key = (tuple(work.x_adv.shape), work.x_adv.dtype, work.x_adv.device, steps,
           isinstance(work.eps, torch.Tensor), isinstance(work.alpha, torch.Tensor),
           None if isinstance(work.eps, torch.Tensor) else work.eps,
           None if isinstance(work.alpha, torch.Tensor) else work.alpha, work.p0 is not None)
    entry = cache.get(key) if cache is not None else None
    names = ("x_adv", "x0", "y", "p0", "eps", "alpha")

    if entry is None:
        static = _Work(*(v.clone() if isinstance(v, torch.Tensor) else v
                         for v in (getattr(work, n) for n in names)), idx=work.idx)

        def loop(check):
            x_cur = static.x_adv
            for _ in range(steps):
                _, _, grad = objective(x_cur, static, need_grad=True, check=check)
                x_cur = step(_Work(x_cur, static.x0, static.y, static.p0, static.eps, static.alpha, None), grad)
            return x_cur

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loop(True)  # warm-up: lazy initialisation and autotuning must not happen during capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            result = loop(False)
        entry = (graph, static, result)
        if cache is not None:
            cache[key] = entry
    graph, static, result = entry
    for n in names:
        value = getattr(work, n)
        if isinstance(value, torch.Tensor):
            getattr(static, n).copy_(value)
    graph.replay()
    return result.clone()


# ----------------------------------------------------------------------------------------------
# TRADES' inner maximisation

def trades_perturb(model, x, *, eps=0.031, alpha=0.007, steps=10, norm="linf", backend="auto", amp=None,
                   generator=None, clamp_input=False):
    """TRADES' adversary: x' ≈ argmax_{x' ∈ B(x, eps) ∩ [0,1]} KL(f(x) ‖ f(x')), by ``steps``
    sign steps from x + 0.001·N(0, 1), with the model in eval mode (Zhang et al. 2019)."""
    return pgd(model, x, None, eps=eps, alpha=alpha, steps=steps, norm=norm, random_start="trades", loss="kl",
               backend=backend, amp=amp, generator=generator, clamp_input=clamp_input)


# ----------------------------------------------------------------------------------------------
# torchattacks-compatible classes

class Attack:
    """What fastrob's attacks share with ``torchattacks.Attack``: ``attack(images, labels)``,
    targeted modes, the model-mode setting and input normalisation."""

    def __init__(self, name, model, **options):
        self.attack = name
        self.model = model
        try:
            self.device = next(model.parameters()).device
        except (AttributeError, StopIteration):
            self.device = None
        self.attack_mode = "default"
        self.supported_mode = ["default", "targeted"]
        self.targeted = False
        self._target_map_function = None
        self._training = False
        self._normalization = None
        self._graph_cache = {}
        self.options = options

    # modes, as torchattacks spells them; ``quiet`` is accepted, nothing is printed
    def get_mode(self):
        return self.attack_mode

    def set_mode_default(self):
        self.attack_mode, self.targeted, self._target_map_function = "default", False, None

    def _set_targeted(self, mode, fn):
        self.attack_mode, self.targeted, self._target_map_function = mode, True, fn

    def set_mode_targeted_by_label(self, quiet=False):
        self._set_targeted("targeted(label)", None)

    def set_mode_targeted_by_function(self, target_map_function, quiet=False):
        self._set_targeted("targeted(custom)", target_map_function)

    def set_mode_targeted_random(self, quiet=False):
        self._set_targeted("targeted(random)", self.get_random_target_label)

    def set_mode_targeted_least_likely(self, kth_min=1, quiet=False):
        if kth_min < 1:
            raise ValueError(f"kth_min must be >= 1, got {kth_min}")
        self._kth_min = kth_min
        self._set_targeted("targeted(least-likely)", self.get_least_likely_label)

    def set_model_training_mode(self, model_training=False, batchnorm_training=False, dropout_training=False):
        if not model_training:
            self._training = False
            return

        def set_modes(model):
            model.train()
            for m in model.modules():
                if (not batchnorm_training and isinstance(m, torch.nn.modules.batchnorm._BatchNorm)) or \
                        (not dropout_training and isinstance(m, torch.nn.modules.dropout._DropoutNd)):
                    m.eval()

        self._training = set_modes

    def set_normalization_used(self, mean, std):
        """The model expects (x - mean) / std; the attack still takes and returns x in [0, 1]."""
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        self._normalization = (mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1))

    def set_device(self, device):
        self.device = device

    def _model(self):
        model = unwrap(self.model)  # no DDP communication inside attacks (fastrob.distributed)
        if self._normalization is None:
            return model
        return _Normalized(model, *self._normalization)

    @torch.no_grad()
    def _clean_logits(self, images):
        model = self._model()
        with attack_context(model, False):
            return model(images)

    def get_random_target_label(self, images, labels=None):
        logits = self._clean_logits(images)
        labels = logits.argmax(1) if labels is None else labels
        shift = torch.randint(1, logits.shape[1], labels.shape, device=labels.device)
        return (labels + shift) % logits.shape[1]

    def get_least_likely_label(self, images, labels=None):
        logits = self._clean_logits(images)
        labels = logits.argmax(1) if labels is None else labels
        masked = logits.scatter(1, labels[:, None], float("inf"))
        return masked.kthvalue(self._kth_min, dim=1).indices

    def get_target_label(self, images, labels=None):
        if self.attack_mode == "targeted(label)":
            return labels
        return self._target_map_function(images, labels)

    def __call__(self, images, labels=None, **overrides):
        """Adversarial images for ``images`` [B, ...] in [0, 1] and ``labels`` [B] (None: the model's
        predictions). ``overrides`` replace constructor options for this call (any ``pgd`` keyword)."""
        return self.forward(images, labels, **overrides)

    def forward(self, images, labels=None, **overrides):
        if self.device is not None and isinstance(images, torch.Tensor):
            images = images.to(self.device)
            labels = labels.to(self.device) if isinstance(labels, torch.Tensor) else labels
        if self.targeted:
            if self._target_map_function is None and self.attack_mode != "targeted(label)":
                raise ValueError("the targeted mode has no target map function")
            labels = self.get_target_label(images, labels)
        options = dict(self.options, **overrides)
        return pgd(self._model(), images, labels, targeted=self.targeted, model_training=self._training,
                   _graph_cache=self._graph_cache, **options)

    def __repr__(self):
        shown = {k: v for k, v in self.options.items() if not k.startswith("_")}
        return f"{self.attack}({', '.join(f'{k}={v}' for k, v in shown.items())}, attack_mode={self.attack_mode})"


class _Normalized(torch.nn.Module):
    """model((x - mean) / std), as a module so that the attack's mode handling reaches ``model``."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        self.mean, self.std = mean, std

    def forward(self, x):
        return self.model((x - self.mean.to(x)) / self.std.to(x))


class PGD(Attack):
    """Linf PGD (Madry et al. 2018), torchattacks.PGD's signature plus fastrob's extras.

    x' <- clamp(x + clamp(x' + alpha·sign(∇J) - x, -eps, eps), 0, 1), ``steps`` times, from a
    uniform start in the eps-box (``random_start``). See ``fastrob.attacks.pgd`` for the extras.
    """

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True, *, restarts=1, loss="ce",
                 robust_only=False, early_stop=None, backend="auto", amp=None, cuda_graph=False,
                 clamp_input=False, generator=None):
        super().__init__("PGD", model, eps=eps, alpha=alpha, steps=steps, random_start=random_start, norm="linf",
                         restarts=restarts, loss=loss, robust_only=robust_only, early_stop=early_stop,
                         backend=backend, amp=amp, cuda_graph=cuda_graph, clamp_input=clamp_input,
                         generator=generator)
        self.eps, self.alpha, self.steps, self.random_start = eps, alpha, steps, random_start


class PGDL2(Attack):
    """L2 PGD, torchattacks.PGDL2's signature plus fastrob's extras.

    x' <- clamp(x + Π_eps(x' + alpha·∇J/‖∇J‖₂ - x), 0, 1), Π_eps rescaling to norm <= eps; the
    random start is a Gaussian direction times a U(0,1)·eps radius. ``eps_for_division`` is
    accepted for compatibility: the fused step divides by the exact norm and skips zero gradients.
    """

    def __init__(self, model, eps=1.0, alpha=0.2, steps=10, random_start=True, eps_for_division=1e-10, *,
                 restarts=1, loss="ce", robust_only=False, early_stop=None, backend="auto", amp=None,
                 cuda_graph=False, clamp_input=False, generator=None):
        super().__init__("PGDL2", model, eps=eps, alpha=alpha, steps=steps, random_start=random_start, norm="l2",
                         restarts=restarts, loss=loss, robust_only=robust_only, early_stop=early_stop,
                         backend=backend, amp=amp, cuda_graph=cuda_graph, clamp_input=clamp_input,
                         generator=generator)
        self.eps, self.alpha, self.steps, self.random_start = eps, alpha, steps, random_start
        self.eps_for_division = eps_for_division


class FGSM(Attack):
    """FGSM (Goodfellow et al. 2015): x' = clamp(x + eps·sign(∇J), 0, 1), i.e. one PGD step with
    alpha = eps from x. torchattacks.FGSM's signature plus ``loss``, ``backend``, ``amp``."""

    def __init__(self, model, eps=8 / 255, *, loss="ce", backend="auto", amp=None, clamp_input=False):
        super().__init__("FGSM", model, eps=eps, alpha=eps, steps=1, random_start=False, norm="linf", loss=loss,
                         backend=backend, amp=amp, clamp_input=clamp_input)
        self.eps = eps
