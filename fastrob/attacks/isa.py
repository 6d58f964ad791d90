"""ISA, the interpretability sneaking attack (Boopathy et al., ICML 2020): a
targeted attack that also keeps the interpretation maps of the input as they were, to test whether
a prediction can change without its interpretation changing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastrob._checks import (
    check_float,
    check_generator,
    check_int,
    check_labels,
    check_logits,
)
from fastrob._progress import progress
from fastrob.attacks.config import ALPHA_FACTOR, START_KINDS, check_norm, check_random_start, default_alpha
from fastrob.attacks.engine import Evaluation, ascend
from fastrob.attacks.losses import margin_loss
from fastrob.attacks.state import attack_context, check_attack_inputs
from fastrob.distributed import unwrap
from fastrob.interpret import map_function
from fastrob.interpret_discrepancy import KINDS, discrepancy
from fastrob.ops._common import accumulate_dtype
from fastrob.routing import twice_differentiable


@dataclass
class ISAResult:
    """Per sample b:
    x_adv:  the returned input (for a failed sample: the last try at eps_max, which did not succeed).
    target: the target class t_b (never y_b).
    success: whether argmax f(x_adv) = t_b.
    eps:    the smallest radius found at which the attack succeeds (NaN where it failed).
    gamma:  the largest gamma in [0, gamma_max] found to still succeed at that radius (0: only the
            plain targeted attack succeeded; NaN where it failed).
    discrepancy: D(x, x_adv), the interpretation change of the returned input.
    discrepancy_plain: D(x, x_adv) of the plain (gamma = 0) attack at the same radius, i.e. what the
            interpretation change would be without sneaking.
    """

    x_adv: torch.Tensor = field(repr=False)
    target: torch.Tensor = field(repr=False)
    success: torch.Tensor = field(repr=False)
    eps: torch.Tensor = field(repr=False)
    gamma: torch.Tensor = field(repr=False)
    discrepancy: torch.Tensor = field(repr=False)
    discrepancy_plain: torch.Tensor = field(repr=False)

    def as_dict(self) -> dict:
        ok = self.success
        mean = (lambda v: float(v[ok].float().mean())) if bool(ok.any()) else (lambda v: float("nan"))
        return {
            "n": len(ok),
            "success_rate": float(ok.float().mean()) if len(ok) else 0.0,
            "mean_eps": mean(self.eps),
            "mean_gamma": mean(self.gamma),
            "mean_discrepancy": mean(self.discrepancy),
            "mean_discrepancy_plain": mean(self.discrepancy_plain),
        }


def isa(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    target: torch.Tensor | None = None,
    eps_max: float = 0.3,
    norm: str = "linf",
    kappa: float = 0.1,
    gamma_max: float = 1.0,
    steps: int = 20,
    search_steps: int = 6,
    alpha_factor: float = ALPHA_FACTOR,
    map: str | Callable = "cam",
    map_kwargs: dict | None = None,
    kind: str = "2class",
    random_start: bool | str = False,
    generator: torch.Generator | None = None,
    quiet: bool = True,
) -> ISAResult:
    """The interpretability sneaking attack: per sample, the targeted perturbation x' = x + δ that
    minimises
        L(x') = max(max_{j≠t} z_j(x') - z_t(x'), -kappa) + gamma·D(x, x')
    over the ball ||δ|| <= eps (``norm``) ∩ [0, 1], with D the interpretation discrepancy
    (``fastrob.interpret_discrepancy.discrepancy`` of the true label y, ``kind``) and t the target.

    1. eps: bisection on [0, eps_max] for the smallest radius at which the plain targeted attack
       (gamma = 0) succeeds (argmax = t): first a try at eps_max (samples failing there are
       failures), then ``search_steps`` halvings.
    2. gamma: at that radius, the largest gamma in [0, gamma_max] that still succeeds: first a try
       at gamma_max (samples succeeding there keep it), then ``search_steps`` halvings, which
       hides the interpretation change as far as the radius allows. The result is the successful
       iterate of the largest successful gamma (the plain attack's where none > 0 succeeded).

    Each try is ``steps`` descent steps of the attack engine (``fastrob.attacks.engine``) of size
    alpha_factor·eps/steps
    (per sample), from x (``random_start=False``) or a random start; of the iterates that reach the
    target it keeps the one with the smallest D (the first, for gamma = 0). The hinge at -kappa stops
    the margin term once the target wins by kappa, so that the D term can act. Samples are attacked
    together as a batch with per-sample eps and gamma; samples already decided drop out.

    The model runs in eval mode with its parameters frozen; both are restored. Maps are computed
    for all classes ("2class") or class y ("1class"), with ``map`` as in
    ``fastrob.interpret.map_function`` ("cam" needs a CAM head).

    Args:
        target: target labels [B], each != y (default: uniform random among the classes != y,
            drawn with ``generator``).
        eps_max: the largest radius tried, > 0.
        kappa: the hinge's confidence, >= 0 (default 0.1, Boopathy et al. 2020).
        gamma_max: the largest gamma tried, >= 0.
        steps: descent steps per try, >= 1; search_steps: halvings per bisection, >= 0.
        quiet: hide the progress bar over the 1 + 2·search_steps tries (hidden by default).
    """
    check_attack_inputs(model, x, y, clamp_input=None, name="isa")
    model = unwrap(model)  # a DDP model's wrapped module: attacks never communicate
    y = check_labels(y, x.shape[0]).to(x.device)  # required here
    check_norm(norm)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    eps_max = check_float("eps_max", eps_max, min_value=0.0)
    if eps_max <= 0:
        raise ValueError(f"eps_max must be > 0, got {eps_max}")
    kappa = check_float("kappa", kappa, min_value=0.0)
    gamma_max = check_float("gamma_max", gamma_max, min_value=0.0)
    check_random_start(random_start, (True, False) + START_KINDS[:2])
    check_generator(generator, x.device)
    alpha_factor = check_float("alpha_factor", alpha_factor, min_value=0.0)
    steps = check_int("steps", steps, 1)
    search_steps = check_int("search_steps", search_steps, 0)
    fn = map_function(map, **(map_kwargs or {}))
    x = x.detach()
    batch = x.shape[0]
    compute = accumulate_dtype(x.dtype)

    # the objective differentiates gradient maps: attention and grouped convolutions run on ops whose
    # backward is differentiable (fastrob.routing)
    with attack_context(model), twice_differentiable():
        with torch.no_grad():
            logits = model(x)
        check_logits(logits, batch, y)
        num_classes = logits.shape[1]
        target = _targets(target, y, num_classes, generator)
        classes = None if kind == "2class" else y
        maps_clean, _ = fn(model, x, classes, create_graph=False)
        maps_clean = maps_clean.detach()

        def attack(rows, eps, gamma):
            """(x_adv, success) for the samples ``rows`` at radii eps [R] and weights gamma [R]."""
            return _descend(
                model,
                fn,
                x[rows],
                y[rows],
                target[rows],
                maps_clean[rows],
                None if classes is None else classes[rows],
                eps,
                gamma,
                kappa=kappa,
                norm=norm,
                steps=steps,
                alpha_factor=alpha_factor,
                kind=kind,
                random_start=random_start,
                generator=generator,
            )

        every = torch.arange(batch, device=x.device)
        zeros = torch.zeros(batch, device=x.device, dtype=compute)
        bar = progress(total=2 + 2 * search_steps, desc="ISA", unit="searches", disable=quiet)
        # 1. the smallest successful radius of the plain targeted attack
        hi = torch.full((batch,), eps_max, device=x.device, dtype=compute)
        lo = zeros.clone()
        x_out, success = attack(every, hi, zeros)
        bar.update(1)
        for _ in range(search_steps):
            rows = success.nonzero().squeeze(1)
            if len(rows):
                mid = (lo[rows] + hi[rows]) / 2
                xa, ok = attack(rows, mid, zeros[rows])
                hi[rows[ok]], x_out[rows[ok]] = mid[ok], xa[ok]
                lo[rows[~ok]] = mid[~ok]
            bar.update(1)
        x_plain = x_out.clone()
        # 2. the largest gamma that still succeeds at that radius
        g_lo, g_hi = zeros.clone(), torch.full((batch,), gamma_max, device=x.device, dtype=compute)
        rows = success.nonzero().squeeze(1)
        if len(rows) and gamma_max > 0:  # first a try at gamma_max, as at eps_max: who succeeds is done
            xa, ok = attack(rows, hi[rows], g_hi[rows])
            g_lo[rows[ok]], x_out[rows[ok]] = gamma_max, xa[ok]
        bar.update(1)
        searching = success & (g_lo < gamma_max)
        for _ in range(search_steps):
            rows = searching.nonzero().squeeze(1)
            if len(rows) and gamma_max > 0:
                mid = (g_lo[rows] + g_hi[rows]) / 2
                xa, ok = attack(rows, hi[rows], mid)
                g_lo[rows[ok]], x_out[rows[ok]] = mid[ok], xa[ok]
                g_hi[rows[~ok]] = mid[~ok]
            bar.update(1)
        bar.close()
        d_final = _discrepancy(model, fn, x_out, y, maps_clean, classes, kind)
        d_plain = _discrepancy(model, fn, x_plain, y, maps_clean, classes, kind)
        with torch.no_grad():
            success = model(x_out).argmax(1) == target
    nan = torch.full_like(hi, float("nan"))
    return ISAResult(
        x_out, target, success, torch.where(success, hi, nan), torch.where(success, g_lo, nan), d_final, d_plain
    )


def _targets(target, y, num_classes, generator):
    if target is None:
        shift = torch.randint(1, num_classes, y.shape, generator=generator, device=y.device)
        return (y + shift) % num_classes
    target = check_labels(target, y.shape[0]).to(y.device)
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(
            f"target must hold labels in [0, {num_classes}), got values in [{int(target.min())}, {int(target.max())}]"
        )
    if bool((target == y).any()):
        raise ValueError("target must differ from y for every sample (ISA is a targeted attack)")
    return target


def _hinge(logits, target, kappa):
    # max(max_{j != t} z_j - z_t, -kappa): the CW margin toward the target, clipped at -kappa
    return torch.clamp(margin_loss(logits, target), min=-kappa)


def _discrepancy(model, fn, x_adv, y, maps_clean, classes, kind):
    maps_adv, logits = fn(model, x_adv, classes, create_graph=False)
    return discrepancy(maps_clean, maps_adv.detach(), y, logits.detach(), kind).detach()


class _SneakingObjective:
    """The engine objective of one ISA try: J = -L(x') per sample (the engine ascends), an iterate
    succeeds when argmax = t, and among successful iterates the lowest D wins (gamma > 0; for
    gamma = 0 the first success, as without maps D is not computed)."""

    def __init__(self, fn, y, target, maps_clean, classes, gamma, kappa, kind):
        self.fn, self.y, self.target, self.maps_clean, self.classes = fn, y, target, maps_clean, classes
        self.gamma, self.kappa, self.kind = gamma, kappa, kind
        self.use_maps = bool((gamma > 0).any())

    def __call__(self, model, x_adv, rows):
        target = self.target[rows]
        if self.use_maps:
            # maps differentiated w.r.t. x' while a step follows (double backprop for gradient maps)
            classes = None if self.classes is None else self.classes[rows]
            maps_adv, logits = self.fn(model, x_adv, classes, create_graph=x_adv.requires_grad)
            d = discrepancy(self.maps_clean[rows], maps_adv, self.y[rows], logits, self.kind)
        else:
            logits = model(x_adv)
            d = torch.zeros(len(x_adv), device=x_adv.device, dtype=self.gamma.dtype)
        # float32 at least: under autocast the logits are bf16, the discrepancy float32
        loss = _hinge(logits.float(), target, self.kappa) + self.gamma[rows].float() * d.float()
        hit = logits.detach().argmax(1) == target
        return Evaluation(-loss, hit, d.detach() if self.use_maps else None, logits)


def _descend(
    model,
    fn,
    x,
    y,
    target,
    maps_clean,
    classes,
    eps,
    gamma,
    *,
    kappa,
    norm,
    steps,
    alpha_factor,
    kind,
    random_start,
    generator,
):
    """One try: ``steps`` descent steps on L, keeping per sample the successful iterate with the
    smallest D (gamma > 0) or the first successful one (gamma = 0); the last iterate where none
    succeeded. Returns (x_adv, success)."""
    objective = _SneakingObjective(fn, y, target, maps_clean, classes, gamma, kappa, kind)
    result = ascend(
        model,
        x,
        objective,
        eps=eps,
        alpha=default_alpha(eps, steps, alpha_factor),
        steps=steps,
        norm=norm,
        start=random_start,
        early_stop=True,
        generator=generator,
    )
    return result.x_adv, result.found
