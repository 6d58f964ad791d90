"""Auto-PGD (Croce & Hein 2020): ``APGD`` (CE or DLR loss) and ``APGDT`` (targeted DLR), Linf and L2,
with torchattacks' constructor arguments and call convention, over the functional engine ``apgd``.

Per run (one random start, N = ``steps`` iterations), with Π the projection onto B(x, eps) ∩ [0, 1]
and s(g) = sign(g) (Linf) or g / ‖g‖₂ (L2):
  z       = Π(x_k + η·s(∇f(x_k)))
  x_{k+1} = Π(x_k + α(z - x_k) + (1 - α)(x_k - x_{k-1})),  α = 0.75 (α = 1 at the first step);
η starts at 2·eps. At the checkpoints w_j = ⌈p_j·N⌉ (p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)) η is halved, per sample, and the iterate restarts
from the best point so far when (1) f increased in fewer than ρ·(w_j - w_{j-1}) of the steps since
w_{j-1}, or (2) η was not halved at w_{j-1} and the best f did not improve since then (not tested at
w_1, as in the reference code). The result per sample is the first iterate that fools the model, else
the point of highest f over all runs.

Restarts and target classes are "rows": row r attacks sample ``sample[r]`` with its own start and
target. A sample fooled by any row is dropped from every row (compaction); the rows run either
all in one batch or one (restart, target) block at a time on the still-robust samples.
"""

from __future__ import annotations

import math

import torch

from fastrob import _backend
from fastrob._checks import check_int, check_logits, check_positive, per_sample_value
from fastrob.attacks.config import check_amp, torchattacks_norm
from fastrob.attacks.losses import per_sample_loss, targeted_dlr_loss
from fastrob.attacks.rows import Rows, first_rows
from fastrob.attacks.starts import make_generator, sphere_start
from fastrob.attacks.state import amp_forward, attack_context, check_attack_inputs
from fastrob.attacks.torchattacks_compat import Attack
from fastrob.ops._common import accumulate_dtype
from fastrob.ops.pgd_step import fit_into_ball, pgd_step_unchecked

APGD_LOSSES = ("ce", "dlr", "dlr-targeted")


# ----------------------------------------------------------------------------------------------
# the step-size schedule, as pure functions (tested on their own)


def apgd_checkpoints(steps: int) -> list:
    """The checkpoints w_j = ⌈p_j·steps⌉ <= steps (w_0 = 0) at which APGD may halve its step size."""
    steps = check_int("steps", steps, 0)
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    # Rounded before the ceiling so that 0.22·100 = 22.000000000000004 stays 22.
    return sorted({math.ceil(round(q * steps, 9)) for q in p} & set(range(steps + 1)))


def halving_mask(
    increases: torch.Tensor,
    interval: int,
    rho: float,
    halved_last: torch.Tensor,
    best: torch.Tensor,
    best_last: torch.Tensor,
) -> torch.Tensor:
    """Per sample, whether to halve η at a checkpoint: (1) ``increases`` (how many of the
    ``interval`` steps since the last checkpoint raised f) < ρ·interval, or (2) η was not halved at
    the last checkpoint and the best f did not improve since (``best <= best_last``)."""
    oscillating = increases.float() < rho * interval
    stalled = ~halved_last & (best <= best_last)
    return oscillating | stalled


# ----------------------------------------------------------------------------------------------
# the engine


def _row_loss(loss, logits, y, target):
    if loss == "dlr-targeted":
        return targeted_dlr_loss(logits, y, target)
    return per_sample_loss(loss, logits, y, None, targeted=False)


def _evaluate(forward, r, loss, eot_iter):
    """Mean loss, mean gradient and mean logits over ``eot_iter`` forwards (EOT for randomized models)."""
    total_grad, total_loss, total_logits = None, None, None
    for _ in range(eot_iter):
        with torch.enable_grad():
            inp = r.x.detach().requires_grad_(True)
            logits = forward(inp)
            check_logits(logits, inp.shape[0], where="the attack's iterates")
            value = _row_loss(loss, logits, r.y, r.target)
            grad = torch.autograd.grad(value.sum(), inp)[0]
        total_grad = grad if total_grad is None else total_grad + grad
        total_loss = value.detach() if total_loss is None else total_loss + value.detach()
        total_logits = logits.detach() if total_logits is None else total_logits + logits.detach()
    return total_loss / eot_iter, total_grad / eot_iter, total_logits / eot_iter


def _record_fooled(state, r, fooled):
    """Samples not yet done that some row fools now: store the first such row's iterate."""
    out, done = state["out"], state["done"]
    hit = fooled & ~done[r.sample]
    if not bool(hit.any()):
        return
    first = first_rows(hit, r.sample, done.numel())
    won = first < r.sample.numel()
    out[won] = r.x[first[won]].to(out.dtype)
    done[won] = True


def _record_best(state, r):
    """Rows whose sample is not done: keep, per sample, the best point of the highest-loss row."""
    out, done, best = state["out"], state["done"], state["best_loss"]
    live = ~done[r.sample]
    if not bool(live.any()):
        return
    rows = live.nonzero().squeeze(1)
    samples, values = r.sample[rows], r.loss_best[rows].to(best.dtype)
    top = best.clone()
    top.scatter_reduce_(0, samples, values, reduce="amax")
    better = (values >= top[samples]) & (values > best[samples])
    out[samples[better]] = r.x_best[rows[better]].to(out.dtype)
    best[samples[better]] = values[better]


def _run_rows(forward, r, state, *, loss, norm, steps, eot_iter, rho, momentum, backend, trace=None):
    """APGD on the rows ``r`` (see the module docstring); writes results into ``state``."""
    checkpoints = set(apgd_checkpoints(steps)[1:])
    last_mark = 0
    value, r.grad, logits = _evaluate(forward, r, loss, eot_iter)
    _record_fooled(state, r, logits.argmax(1) != r.y)
    r.x_best, r.grad_best, r.loss_best = r.x.clone(), r.grad.clone(), value.clone()
    r.loss_last, r.best_last = value.clone(), value.clone()
    r.increases = torch.zeros_like(r.sample)
    r.halved_last = torch.ones_like(r.sample, dtype=torch.bool)  # condition (2) is not tested at w_1
    r.x_prev = r.x.clone()
    zero = 0.0
    for i in range(steps):
        live = ~state["done"][r.sample]
        if not bool(live.all()):
            r.keep(live)
        if r.sample.numel() == 0:
            break
        if trace is not None:
            trace.append(r.eta.clone())
        z = pgd_step_unchecked(
            r.x, r.grad, r.x0, alpha=r.eta, eps=r.eps, norm=norm, lower=0.0, upper=1.0, backend=backend
        )
        if i > 0:
            # Π(x_k + α(z - x_k) + (1 - α)(x_k - x_{k-1})): the fused step with α = 0 is the projection.
            mixed = r.x + momentum * (z - r.x) + (1 - momentum) * (r.x - r.x_prev)
            z = pgd_step_unchecked(
                mixed, mixed, r.x0, alpha=zero, eps=r.eps, norm=norm, lower=0.0, upper=1.0, backend=backend
            )
        r.x_prev, r.x = r.x, z
        value, r.grad, logits = _evaluate(forward, r, loss, eot_iter)
        _record_fooled(state, r, logits.argmax(1) != r.y)
        r.increases += value > r.loss_last
        r.loss_last = value
        improved = value > r.loss_best
        if bool(improved.any()):
            r.x_best[improved], r.grad_best[improved] = r.x[improved], r.grad[improved]
            r.loss_best = torch.where(improved, value, r.loss_best)
        if i + 1 in checkpoints:
            interval = i + 1 - last_mark
            halve = halving_mask(r.increases, interval, rho, r.halved_last, r.loss_best, r.best_last)
            r.eta = torch.where(halve, r.eta / 2, r.eta)
            if bool(halve.any()):
                r.x[halve], r.grad[halve] = r.x_best[halve], r.grad_best[halve]
            r.increases.zero_()
            r.best_last, r.halved_last, last_mark = r.loss_best.clone(), halve, i + 1
    _record_best(state, r)


def apgd(
    model,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    eps=8 / 255,
    norm: str = "Linf",
    steps: int = 100,
    n_restarts: int = 1,
    loss: str = "ce",
    n_target_classes: int = 9,
    targets: torch.Tensor | None = None,
    eot_iter: int = 1,
    rho: float = 0.75,
    momentum: float = 0.75,
    seed: int | None = 0,
    batch_runs: bool | None = None,
    backend: str = "auto",
    amp: str | None = None,
    model_training=False,
    return_fooled: bool = False,
    _trace=None,
):
    """Auto-PGD on a batch (module docstring).

    Args:
        model: maps x [B, ...] in [0, 1] to logits [B, C] (run in eval mode, state restored).
        x, y: clean inputs and labels (None: the model's predictions).
        eps: radius, a float or a per-sample [B] tensor; norm: "Linf" or "L2".
        steps: iterations per run; n_restarts: random starts (a sample fooled is not restarted).
        loss: "ce", "dlr" or "dlr-targeted" (APGD-T: one run per target class and restart, the
            targets being the ``n_target_classes`` classes with the highest clean logits after y).
        targets: for "dlr-targeted", the target classes [B, k] to use instead (k runs per restart).
        eot_iter: forwards averaged per gradient (expectation over transformation).
        rho, momentum: the halving threshold and momentum α.
        seed: seeds the random starts (a private generator; the global RNG is not touched).
        batch_runs: run all restarts × targets as one batch (True, the default for None) or one
            after the other on the still-robust samples (False). Batched measured faster even on a
            2-core CPU (digits CNN, 100 samples: APGD-T with 9 targets 5.9 s vs 14.5 s looped, 5
            restarts 3.9 s vs 6.8 s), as compaction still drops each sample once any row fools it.
        backend: the fused step's ("auto" | "torch" | "triton" | "cuda").
        amp: None or "bf16": the iterates' forwards and backwards under bfloat16 autocast (the
            losses upcast the logits; the steps stay in x's dtype). The clean prediction and the
            returned ``fooled`` use the model's own precision; an iterate that fools the model in
            bfloat16 only is taken as a success (AutoAttack re-checks every broken point).
        model_training: the model's mode during the attack (False: eval); see ``attack_context``.
        return_fooled: also return whether each output fools the model (in the model's precision).

    Returns:
        x_adv (x's shape and dtype), per sample the first fooling iterate or the highest-loss point.
    """
    check_attack_inputs(model, x, y, clamp_input=None, name="APGD")
    norm = torchattacks_norm(norm)
    steps = check_int("steps", steps, 0)
    n_restarts = check_int("n_restarts", n_restarts, 1)
    eot_iter = check_int("eot_iter", eot_iter, 1)
    rho = check_positive("rho", rho)
    if loss not in APGD_LOSSES:
        raise ValueError(f"loss must be one of {APGD_LOSSES}, got {loss!r}")
    if targets is not None and loss != "dlr-targeted":
        raise ValueError(f"targets are for loss='dlr-targeted', got loss={loss!r}")
    n_target_classes = check_int("n_target_classes", n_target_classes, 1)
    check_amp(amp)
    forward = amp_forward(model, amp, x.device.type)
    batch = x.shape[0]
    x = x.detach()
    compute = accumulate_dtype(x.dtype)
    eps = per_sample_value("eps", eps, batch, x.device, dtype=compute)
    eps = eps if isinstance(eps, torch.Tensor) else torch.full((batch,), eps, device=x.device, dtype=compute)
    backend = _backend.resolve(backend, x.device, x.dtype, op="pgd_step")
    generator = make_generator(seed, x.device)  # on x's device: nothing to check
    batch_runs = True if batch_runs is None else bool(batch_runs)

    with attack_context(model, model_training):
        with torch.no_grad():
            clean = model(x)
            check_logits(clean, batch, y, where="clean inputs")
        y = clean.argmax(1) if y is None else y.to(device=x.device, dtype=torch.long)
        state = {
            "out": x.clone(),
            "done": clean.argmax(1) != y,
            "best_loss": torch.full((batch,), float("-inf"), device=x.device, dtype=compute),
        }
        given, targets = targets, [None]
        if loss == "dlr-targeted":
            n_classes = clean.shape[1]
            if n_classes < 4:
                raise ValueError(f"the targeted DLR loss needs at least 4 classes, the model has {n_classes}")
            ranked = clean.scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)
            ranked = (
                ranked[:, : min(n_target_classes, n_classes - 1)]
                if given is None
                else _check_targets(given, y, n_classes)
            )
            targets = list(ranked.T)
        runs = [(t, r) for t in targets for r in range(n_restarts)]
        blocks = [runs] if batch_runs else [[run] for run in runs]
        for block in blocks:
            live = (~state["done"]).nonzero().squeeze(1)
            if live.numel() == 0:
                break
            sample = live.repeat(len(block))
            x0 = x[sample]
            r = Rows(
                x0=x0,
                y=y[sample],
                sample=sample,
                eps=eps[sample],
                eta=2 * eps[sample],
                target=torch.cat([t[live] for t, _ in block]) if block[0][0] is not None else None,
            )
            r.x = sphere_start(x0, r.eps, norm, generator)
            _run_rows(
                forward,
                r,
                state,
                loss=loss,
                norm=norm,
                steps=steps,
                eot_iter=eot_iter,
                rho=rho,
                momentum=momentum,
                backend=backend,
                trace=_trace,
            )
        out = fit_into_ball(state["out"], x, eps, norm)  # float16/bfloat16 rounding
        if return_fooled:
            with torch.no_grad():
                logits = model(out)
            check_logits(logits, batch, where="the attack's result")
            return out, logits.argmax(1) != y
        return out


def _check_targets(targets, y, n_classes):
    """``targets`` as a long [B, k] tensor on y's device: k >= 1 classes per sample, none equal to y."""
    shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else None
    if shape is None or len(shape) != 2 or shape[0] != y.shape[0] or not shape[1] or targets.is_floating_point():
        raise ValueError(f"targets must be an integer tensor [B={y.shape[0]}, k>=1] of classes, got shape {shape}")
    targets = targets.to(device=y.device, dtype=torch.long)
    if bool(((targets < 0) | (targets >= n_classes) | (targets == y[:, None])).any()):
        raise ValueError(f"targets must be classes in [0, {n_classes}) other than the sample's label")
    return targets


# ----------------------------------------------------------------------------------------------
# torchattacks-compatible classes


class APGD(Attack):
    """APGD with CE or DLR loss, torchattacks.APGD's signature (``loss`` "ce" | "dlr"), plus
    ``batch_runs``, ``backend`` and ``amp`` (see ``apgd``). The attributes are read at each call, so setting
    ``atk.eps`` or ``atk.steps`` after construction takes effect."""

    options = ("eps", "steps", "n_restarts", "seed", "loss", "eot_iter", "rho", "batch_runs", "backend", "amp")

    def __init__(
        self,
        model,
        norm="Linf",
        eps=8 / 255,
        steps=10,
        n_restarts=1,
        seed=0,
        loss="ce",
        eot_iter=1,
        rho=0.75,
        verbose=False,
        *,
        batch_runs=None,
        backend="auto",
        amp=None,
    ):
        super().__init__("APGD", model)
        self.norm, self.eps, self.steps, self.n_restarts, self.seed = norm, eps, steps, n_restarts, seed
        self.loss, self.eot_iter, self.rho, self.verbose = loss, eot_iter, rho, verbose
        self.batch_runs, self.backend, self.amp = batch_runs, backend, amp
        self.supported_mode = ["default"]
        if loss not in ("ce", "dlr"):
            raise ValueError(f"loss must be 'ce' or 'dlr', got {loss!r}")
        torchattacks_norm(norm)

    def _attack(self, model, images, labels, options):
        return apgd(model, images, labels, model_training=self._training, **options)

    def describe(self) -> str:
        restarts = f", {self.n_restarts} restarts" if self.n_restarts > 1 else ""
        return f"APGD-{self.loss.upper()}-{self.steps}({self.norm}, eps={self.eps:g}{restarts})"


class APGDT(APGD):
    """Targeted APGD (APGD-T) on the targeted DLR loss over the ``n_target_classes`` classes with
    the highest clean logits after the true one (default n_classes - 1 = 9, as torchattacks).
    torchattacks.APGDT's signature plus ``n_target_classes``, ``batch_runs``, ``backend`` and ``amp``."""

    options = APGD.options + ("n_target_classes",)

    def __init__(
        self,
        model,
        norm="Linf",
        eps=8 / 255,
        steps=10,
        n_restarts=1,
        seed=0,
        eot_iter=1,
        rho=0.75,
        verbose=False,
        n_classes=10,
        *,
        n_target_classes=None,
        batch_runs=None,
        backend="auto",
        amp=None,
    ):
        super().__init__(
            model,
            norm,
            eps,
            steps,
            n_restarts,
            seed,
            "ce",
            eot_iter,
            rho,
            verbose,
            batch_runs=batch_runs,
            backend=backend,
            amp=amp,
        )
        self.attack, self.loss = "APGDT", "dlr-targeted"
        self.n_classes = n_classes
        n_classes = check_int("n_classes", n_classes, 2)
        self.n_target_classes = n_classes - 1 if n_target_classes is None else n_target_classes
