"""Interpretability-aware robust training (Boopathy et al., ICML 2020): the
objectives Int, Int-Adv, Int2 and Int2-Adv, which penalise the interpretation discrepancy between
an input and a perturbed copy of it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fastrob import functional as Fn
from fastrob._checks import check_float, check_generator, check_int, check_logits
from fastrob.attacks import AttackConfig, Evaluation, ascend, attack_context, check_random_start, pgd
from fastrob.compiled import eager_for_double_backward
from fastrob.distributed import unwrap
from fastrob.interpret import map_function
from fastrob.interpret_discrepancy import KINDS as DISCREPANCIES
from fastrob.interpret_discrepancy import discrepancy
from fastrob.objective import Objective
from fastrob.regularizers.input_gradient import check_backend
from fastrob.routing import twice_differentiable

KINDS = ("int", "int_adv", "int2", "int2_adv")


class InterpretationRegularizer:
    """Boopathy et al.'s interpretability-aware objectives, with D the l1 interpretation
    discrepancy (``fastrob.interpret_discrepancy.discrepancy``, 2-class by default) and
    x* the inner attack's result in the ball B(x, eps) ∩ [0, 1]:

        kind        inner attack maximises        loss
        "int"       lam·D(x, x')                  CE(f(x), y)  + lam·D(x, x*)
        "int_adv"   CE(f(x'), y) + lam·D(x, x')   CE(f(x*), y) + lam·D(x, x*)
        "int2"      CE(f(x'), y)  (plain PGD)     CE(f(x), y)  + lam·D(x, x*)
        "int2_adv"  CE(f(x'), y)  (plain PGD)     CE(f(x*), y) + lam·D(x, x*)

    CE is the batch mean and D the batch mean of the per-sample discrepancies. ``Objective.penalty``
    is mean D (unweighted) and ``Objective.logits`` the logits the CE used (x* for the -adv kinds).

    Inner attack: ``steps`` PGD steps of size ``alpha`` (default 2.5·eps/steps) from a random
    start (``random_start``, as ``fastrob.attacks.pgd``), with the model in eval mode and its
    parameters frozen (restored afterwards). Int2/Int2-Adv run ``fastrob.attacks.pgd`` on the CE; Int
    and Int-Adv pass their objective (with the maps inside) to the attack engine
    (``fastrob.attacks.engine``). Maps at x' are differentiated w.r.t. x' (for gradient maps that is
    double backprop). D is 0 with a zero gradient at x' = x, which is why the start is random.

    The loss part runs in the model's own mode; its forward passes (the maps', at x and at x*)
    keep BatchNorm's running statistics, which then move once per call, from the clean batch (one
    extra forward without gradient, for models with BatchNorm in train mode). Maps at x and at x*
    are both differentiated w.r.t. the parameters (gradient maps: by double backprop, so use
    smooth activations for them; CAM needs none). Under DistributedDataParallel the attack and the maps run
    the wrapped module and the CE one extra forward of the DDP model (docs/distributed.md).

    eps schedule (the authors' warm-up): the radius at a call is eps·s(step), where ``step`` counts
    this object's calls (every call, in train or eval mode; set ``reg.step`` to resume a run) and
        s(step) = 0 for step < start, (step - start)/(full - start) for start <= step < full,
        1 for step >= full,
    with ``warmup=(start, full)`` (MNIST in the paper: (2000, 10000)); ``warmup=None`` is s = 1;
    a callable warmup(step) -> s in [0, 1] replaces the ramp. alpha is scaled by the same s (a
    given alpha keeps its ratio to eps). While s = 0 there is no attack and no penalty: the loss is
    the plain CE.

    Args:
        kind: "int" | "int_adv" | "int2" | "int2_adv".
        lam: lambda >= 0 (default 0.01, the paper's).
        eps, alpha, steps, norm: the inner attack (defaults: eps 0.1, alpha 2.5·eps/steps, 7 steps,
            "linf"; Madry's MNIST setting is eps 0.3, alpha 0.01, 40 steps).
        map: "cam" (default; needs a CAM head, ``fastrob.interpret.cam``) | "grad_cam" | "saliency" |
            "ig", or a callable (model, x, classes) -> maps [B, K, ...].
        map_kwargs: the map's keyword arguments (grad_cam: {"layer": module}; ig: {"steps": 5}).
        discrepancy: "2class" (default) or "1class".
        warmup: None, (start, full) with 0 <= start <= full, or a callable step -> s.
        random_start: the inner attack's start (True, False, "uniform", "normal").
        generator: torch.Generator for the random start (default: the global RNG).
        backend: "auto" | "torch" | "triton" | "cuda": where the cross-entropy and the inner
            attack's PGD step run (``fastrob.regularizers.input_gradient.check_backend``).
    """

    def __init__(
        self,
        kind: str = "int2",
        lam: float = 0.01,
        eps: float = 0.1,
        alpha: float | None = None,
        steps: int = 7,
        norm: str = "linf",
        map: str | Callable = "cam",
        discrepancy: str = "2class",
        warmup: None | Sequence[int] | Callable[[int], float] = None,
        map_kwargs: dict | None = None,
        random_start: bool | str = True,
        generator: torch.Generator | None = None,
        backend: str = "auto",
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if discrepancy not in DISCREPANCIES:
            raise ValueError(f"discrepancy must be one of {DISCREPANCIES}, got {discrepancy!r}")
        check_random_start(random_start, (True, False, "uniform", "normal"))
        if random_start is False and kind in ("int", "int_adv"):
            # D(x, x') = 0 with zero gradient at x' = x: Int's attack would never leave x
            raise ValueError(
                f"kind={kind!r} needs a random start (D has zero gradient at x' = x); got random_start=False"
            )
        # the inner attack's settings, checked once (eps, alpha, steps, norm, random start)
        self.attack = AttackConfig(eps=eps, alpha=alpha, steps=steps, norm=norm, random_start=random_start)
        self.kind, self.norm, self.discrepancy, self.random_start = kind, norm, discrepancy, random_start
        self.lam = check_float("lam", lam, min_value=0.0)
        self.eps, self.alpha, self.steps = self.attack.eps, self.attack.alpha, self.attack.steps
        self.map, self.map_kwargs = map, dict(map_kwargs or {})
        self._map_fn = map_function(map, **self.map_kwargs)
        self.warmup = _check_warmup(warmup)
        self.generator = generator
        self.backend = check_backend(backend, "InterpretationRegularizer")
        self.step = 0

    def __repr__(self):
        return (
            f"InterpretationRegularizer(kind={self.kind!r}, lam={self.lam}, eps={self.eps}, alpha={self.alpha}, "
            f"steps={self.steps}, norm={self.norm!r}, map={self.map!r}, discrepancy={self.discrepancy!r}, "
            f"warmup={self.warmup!r}, step={self.step})"
        )

    def state_dict(self) -> dict:
        """The warm-up position (``step``), for checkpoints; ``load_state_dict`` restores it."""
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(f"state must be a dict with key 'step' (from state_dict()), got {state!r}")
        self.step = check_int("state['step']", state["step"], 0)

    # ---- the eps schedule ----------------------------------------------------------------------

    def schedule(self, step: int | None = None) -> float:
        """s(step) in [0, 1], the fraction of eps used at call number ``step`` (default: the next)."""
        step = self.step if step is None else step
        w = self.warmup
        if w is None:
            return 1.0
        if callable(w):
            s = check_float("warmup(step)", w(step), min_value=0.0)
            if s > 1.0:
                raise ValueError(f"warmup(step) must return a fraction in [0, 1], got {s} at step {step}")
            return s
        start, full = w
        if step < start:
            return 0.0
        if step >= full:
            return 1.0
        return (step - start) / (full - start)

    def current_eps(self, step: int | None = None) -> tuple[float, float]:
        """(eps, alpha) of call number ``step`` (default: the next call)."""
        attack = AttackConfig(eps=self.eps, alpha=self.alpha, steps=self.steps).scaled(self.schedule(step))
        return attack.eps, attack.alpha

    # ---- the objective ---------------------------------------------------------------------------

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor) -> Objective:
        x, y = Fn.check_inputs(model, x, y)
        model = eager_for_double_backward(model, "InterpretationRegularizer")
        check_generator(self.generator, x.device)
        eps, alpha = self.current_eps()
        self.step += 1
        # the attack runs the DDP-wrapped module: no communication (fastrob.distributed)
        x_adv = self.perturb(unwrap(model), x, y, eps=eps, alpha=alpha) if eps > 0 else None
        return self.objective(model, x, y, x_adv)

    def _classes(self, y):
        # the 1-class discrepancy needs the maps of class y only (one backward, not C, for gradient maps)
        return None if self.discrepancy == "2class" else y

    def perturb(self, model, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float) -> torch.Tensor:
        """x*, the inner attack's result for this kind (see the class docstring), detached."""
        x = x.detach()
        if self.kind in ("int2", "int2_adv"):
            return pgd(
                model,
                x,
                y,
                eps=eps,
                alpha=alpha,
                steps=self.steps,
                norm=self.norm,
                backend=self.backend,
                random_start=self.random_start,
                loss="ce",
                generator=self.generator,
            )
        classes = self._classes(y)
        # the attack's objective holds maps, whose gradient maps are differentiated (fastrob.routing)
        with attack_context(model), twice_differentiable(self.backend):
            maps_clean, _ = self._map_fn(model, x, classes, create_graph=False)
            objective = _InterpretationObjective(self, maps_clean.detach(), y, classes)
            result = ascend(
                model,
                x,
                objective,
                eps=eps,
                alpha=alpha,
                steps=self.steps,
                norm=self.norm,
                start=self.random_start,
                backend=self.backend,
                generator=self.generator,
                need_final=False,
            )
        return result.x_adv.detach()

    def objective(self, model, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor | None) -> Objective:
        """The loss for a given x* (None: no attack, the loss is the plain CE and the penalty 0).
        ``x`` must be the checked leaf of ``fastrob.functional.check_inputs``."""
        if x_adv is None:
            logits = Fn.forward(model, x, y)
            ce = Fn.per_sample_cross_entropy(logits, y, self.backend).mean()
            return Objective(ce, ce, ce.new_zeros(()), logits)
        classes = self._classes(y)
        # The maps come from the wrapped module under DDP (CAM needs its features and head, and a
        # gradient map's inner backward must not pass DDP's output, docs/distributed.md), and the
        # CE then from one forward of the DDP model, which makes the outer backward all-reduce.
        # Every differentiated forward keeps BatchNorm's running statistics, which then move once,
        # from the clean batch, whatever the map (IG's path forwards, a callable's own forwards).
        module = unwrap(model)
        ddp = module is not model
        adv = self.kind.endswith("_adv")
        with Fn.preserved_buffers(module), twice_differentiable(self.backend):
            maps_clean, logits_clean = self._map_fn(module, x, classes, create_graph=True)
            check_logits(logits_clean, x.shape[0], y)
            maps_adv, logits_adv = self._map_fn(module, x_adv.detach(), classes, create_graph=True)
            logits = (
                Fn.forward(model, x_adv.detach() if adv else x, y) if ddp else (logits_adv if adv else logits_clean)
            )
        Fn.update_running_stats(module, x)
        penalty = discrepancy(maps_clean, maps_adv, y, logits_adv, self.discrepancy).mean()
        ce = Fn.per_sample_cross_entropy(logits, y, self.backend).mean()
        return Objective(ce + self.lam * penalty, ce, penalty, logits)


class _InterpretationObjective:
    """Int's inner objective lam·D(x, x') (Int-Adv: + CE(f(x'), y)) per sample, for the attack engine."""

    def __init__(self, reg, maps_clean, y, classes):
        self.reg, self.maps_clean, self.y, self.classes = reg, maps_clean, y, classes

    def __call__(self, model, x_adv, rows):
        reg, y = self.reg, self.y[rows]
        classes = None if self.classes is None else self.classes[rows]
        maps_adv, logits = reg._map_fn(model, x_adv, classes, create_graph=True)
        j = reg.lam * discrepancy(self.maps_clean[rows], maps_adv, y, logits, reg.discrepancy)
        if reg.kind == "int_adv":
            j = j + Fn.per_sample_cross_entropy(logits, y, reg.backend)
        return Evaluation(j, logits=logits)


def _check_warmup(warmup):
    if warmup is None or callable(warmup):
        return warmup
    if not isinstance(warmup, (tuple, list)) or len(warmup) != 2:
        raise ValueError(
            f"warmup must be None, a pair (start, full) of call counts or a callable step -> fraction, got {warmup!r}"
        )
    start = check_int("warmup start", warmup[0], 0)
    full = check_int("warmup full", warmup[1], 0)
    if full < start:
        raise ValueError(f"warmup must have start <= full, got ({start}, {full})")
    return (start, full)
