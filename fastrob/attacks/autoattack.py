"""AutoAttack (Croce & Hein 2020): an ensemble of diverse attacks run one after another, each on
the points that all earlier attacks left robust, with torchattacks.AutoAttack's signature.

Versions (every iterative attack with 100 iterations, as in the AutoAttack paper):
  standard  APGD-CE (1 run) -> APGD-T (9 targets) -> FAB-T (9 targets) -> Square (5000 queries)
  plus      APGD-CE (5 restarts) -> APGD-DLR (5 restarts) -> FAB (5 restarts) -> Square (5000)
            -> APGD-T -> FAB-T
  rand      APGD-CE and APGD-DLR with EOT over 20 forwards (randomized models)
  fast      APGD-CE (1 run) -> APGD-T on FAST_TARGETS MALT targets (Melamed, Yehudai & Shamir 2024)
            -> the masking report's cheap checks on the same points; FAB-T and Square only when a
            check is suspicious (docs/autoattack-fast.md says what this skips and why)
torchattacks.AutoAttack builds its parts with their own defaults of 10 iterations: a cheaper,
weaker variant. A point counts as broken only when the attack's output is misclassified and lies in
the eps-ball and [0, 1]; the output keeps the clean input at points that stay robust (as AutoAttack).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastrob._checks import check_float, check_logits
from fastrob._progress import progress
from fastrob.attacks.apgd import APGD, APGDT
from fastrob.attacks.ball import inside_ball
from fastrob.attacks.config import check_amp, torchattacks_norm
from fastrob.attacks.fab import FAB
from fastrob.attacks.malt import MALTAPGDT
from fastrob.attacks.masking_checks import cheap_checks
from fastrob.attacks.square import Square
from fastrob.attacks.state import attack_context, check_attack_inputs
from fastrob.attacks.torchattacks_compat import Attack

VERSIONS = ("standard", "plus", "rand", "fast")
# The fast version's targeting: APGD-T on the FAST_TARGETS nearest classes by MALT's linear distance
# among the FAST_CANDIDATES most confident ones (chosen by bench/autoattack_fast.py on digits models)
FAST_TARGETS, FAST_CANDIDATES = 3, 9


@dataclass
class AutoAttackRecord:
    """What one AutoAttack call found.

    stages: the attacks' names in run order. broken_by: per sample, "clean" (misclassified
    without attack), the name of the first stage that broke it, or None (robust).
    robust_accuracy: per stage, the robust accuracy after it (the last is AutoAttack's number).
    guard (the "fast" version only): the cheap masking checks run on the batch, {name: check as a
    dict with its value, threshold and verdict}; guard_fired: whether one was suspicious, so that
    the guarded stages ran; skipped: the guarded stages that did not run (none suspicious).
    """

    stages: list
    broken_by: list
    clean_accuracy: float
    robust_accuracy: dict = field(default_factory=dict)
    guard: dict | None = None
    guard_fired: bool | None = None
    skipped: list = field(default_factory=list)

    @property
    def robust(self) -> torch.Tensor:
        return torch.tensor([b is None for b in self.broken_by], dtype=torch.bool)


# the fewest classes each built-in stage needs (DLR: 3; targeted DLR: 4)
MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4, "apgd-t-malt": 4}


class AutoAttack(Attack):
    """AutoAttack with torchattacks.AutoAttack's signature plus ``attacks`` (a custom list of
    attacks, or of (name, attack) pairs, run in order instead of a version), ``steps`` and
    ``n_queries`` (the versions' 100 iterations and 5000 Square queries), ``amp`` and ``quiet``
    (hide the progress bar over stages). The attributes (``eps``, ``norm``, ``version``, ...) are
    read at each call. After a call, ``last_record`` holds an ``AutoAttackRecord``; ``run``
    returns both.

    ``amp`` (None or "bf16") runs the APGD stages' forwards and backwards under bfloat16 autocast,
    for speed on GPUs (on CPU bfloat16 is slower). FAB (its projection divides logit differences by
    their gradients' norms) and Square (its random search keeps a proposal when the loss drops by
    less than bfloat16 resolves: measured 5 points weaker on a digits CNN) stay in the model's
    precision, and so does the check of every broken point, so bf16 can make AutoAttack weaker,
    never report a point broken that is not. Report numbers with amp=None.
    """

    def __init__(
        self,
        model,
        norm="Linf",
        eps=8 / 255,
        version="standard",
        n_classes=10,
        seed=None,
        verbose=False,
        *,
        attacks=None,
        steps=100,
        n_queries=5000,
        amp=None,
        quiet=False,
    ):
        super().__init__("AutoAttack", model)
        self.norm, self.eps, self.version, self.n_classes = norm, eps, version, n_classes
        self.seed, self.verbose, self.attacks, self.steps, self.quiet = seed, verbose, attacks, steps, quiet
        self.n_queries, self.amp = n_queries, amp
        self.supported_mode = ["default"]
        self.last_record: AutoAttackRecord | None = None
        self.stages()  # checks the settings now

    def stages(self):
        """[(name, attack)] in run order, built from the current attributes (for "fast", the stages
        that always run; ``guarded_stages`` are those that run when the guard fires)."""
        return self._stages()[0]

    def guarded_stages(self):
        """[(name, attack)]: the "fast" version's stages run only when a cheap masking check fires."""
        return self._stages()[1]

    def _stages(self):
        if self.attacks is not None:
            return _custom_stages(self.attacks), []
        if self.version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {self.version!r}")
        torchattacks_norm(self.norm)
        model, norm, eps, steps, amp = self._model(), self.norm, self.eps, self.steps, check_amp(self.amp)
        seed = int(torch.randint(0, 2**62, (1,)).item()) if self.seed is None else int(self.seed)
        n_targets = max(1, min(9, self.n_classes - 1))

        def apgd(loss, **kw):
            return APGD(model, norm=norm, eps=eps, steps=steps, seed=seed, loss=loss, amp=amp, **kw)

        def apgdt(cls=APGDT, targets=n_targets, **kw):
            return cls(
                model,
                norm=norm,
                eps=eps,
                steps=steps,
                seed=seed,
                n_classes=self.n_classes,
                n_target_classes=targets,
                amp=amp,
                **kw,
            )

        def fab(multi_targeted, n_restarts=1):
            atk = FAB(
                model,
                norm=norm,
                eps=eps,
                steps=steps,
                n_restarts=n_restarts,
                seed=seed,
                multi_targeted=multi_targeted,
                n_classes=self.n_classes,
            )
            atk.n_target_classes = n_targets
            return atk

        def square():
            return Square(model, norm=norm, eps=eps, n_queries=self.n_queries, seed=seed)

        if self.version == "standard":
            return [("apgd-ce", apgd("ce")), ("apgd-t", apgdt()), ("fab-t", fab(True)), ("square", square())], []
        if self.version == "fast":
            malt = apgdt(MALTAPGDT, min(FAST_TARGETS, n_targets), n_candidates=FAST_CANDIDATES)
            return [("apgd-ce", apgd("ce")), ("apgd-t-malt", malt)], [("fab-t", fab(True)), ("square", square())]
        if self.version == "plus":
            return [
                ("apgd-ce", apgd("ce", n_restarts=5)),
                ("apgd-dlr", apgd("dlr", n_restarts=5)),
                ("fab", fab(False, 5)),
                ("square", square()),
                ("apgd-t", apgdt()),
                ("fab-t", fab(True)),
            ], []
        return [("apgd-ce", apgd("ce", eot_iter=20)), ("apgd-dlr", apgd("dlr", eot_iter=20))], []

    def forward(self, images, labels=None):
        return self.run(images, labels)[0]

    def run(self, images, labels=None):
        """(x_adv, AutoAttackRecord) for ``images`` [B, C, H, W] in [0, 1] and ``labels`` [B]."""
        images, labels = self._on_device(images, labels)
        model = self._model()
        check_attack_inputs(model, images, labels, clamp_input=None, name="AutoAttack")
        if images.shape[0] == 0:
            raise ValueError("images holds no samples: AutoAttack needs at least one to measure robust accuracy")
        norm = torchattacks_norm(self.norm)
        eps = check_float("eps", self.eps, min_value=0.0)
        stages, guarded = self._stages()
        x = images.detach()
        batch = x.shape[0]
        with attack_context(model, self._training), torch.no_grad():
            clean = model(x)
        check_logits(clean, batch, labels, where="clean inputs")
        y = clean.argmax(1) if labels is None else labels.to(device=x.device, dtype=torch.long)
        robust = clean.argmax(1) == y
        broken_by = [None if r else "clean" for r in robust.tolist()]
        record = AutoAttackRecord([name for name, _ in stages], broken_by, robust.float().mean().item())
        run = _StageRunner(self, model, x, y, eps, norm, clean.shape[1], robust, record)
        bar = progress(stages, desc="AutoAttack", unit="stages", disable=self.quiet)
        for name, attack in bar:
            run(name, attack)
            bar.set_postfix(robust=f"{record.robust_accuracy[name]:.2%}")
        if guarded:
            seed = 0 if self.seed is None else int(self.seed)
            checks = cheap_checks(model, x, y, norm.lower(), seed=seed, model_training=self._training)
            record.guard = {c.name: c.as_dict() for c in checks}
            record.guard_fired = any(c.verdict == "suspicious" for c in checks)
            if self.verbose:
                print(
                    f"AutoAttack guard: {'suspicious, running' if record.guard_fired else 'ok, skipping'} "
                    f"{[name for name, _ in guarded]}"
                )
            if record.guard_fired:
                record.stages += [name for name, _ in guarded]
                for name, attack in guarded:
                    run(name, attack)
            else:
                record.skipped = [name for name, _ in guarded]
        self.last_record = record
        return run.out, record

    def describe(self) -> str:
        """e.g. "AutoAttack(standard, Linf, eps=0.1)"; the budget when it is not the versions' own."""
        default_budget = (self.steps, self.n_queries) == (100, 5000)
        extra = "" if default_budget else f", steps={self.steps}, n_queries={self.n_queries}"
        custom = "custom" if self.attacks is not None else self.version
        return f"AutoAttack({custom}, {self.norm}, eps={self.eps:g}{extra})"

    def __repr__(self):
        return (
            f"AutoAttack(norm={self.norm}, eps={self.eps}, version={self.version}, n_classes={self.n_classes}, "
            f"seed={self.seed}, steps={self.steps})"
        )


def _custom_stages(attacks):
    """``attacks`` (attacks, or (name, attack) pairs) as [(name, attack)], or a clear error."""
    if isinstance(attacks, (str, bytes)) or not hasattr(attacks, "__iter__"):
        raise ValueError(f"attacks must be a list of attacks or (name, attack) pairs, got {attacks!r}")
    stages = []
    for i, item in enumerate(attacks):
        name, attack = item if isinstance(item, tuple) and len(item) == 2 else (None, item)
        if isinstance(item, tuple) and not isinstance(name, str):
            raise ValueError(f"attacks[{i}]: a (name, attack) pair needs a str name, got {name!r}")
        if not callable(attack) or isinstance(attack, str):
            raise ValueError(
                f"attacks[{i}] must be an attack (a callable taking images and labels) or a (name, attack) "
                f"pair, got {attack!r}; the built-in stages are chosen with version= {VERSIONS}"
            )
        stages.append((name or getattr(attack, "attack", type(attack).__name__), attack))
    if not stages:
        raise ValueError("attacks must hold at least one attack (None: the version's stages)")
    return stages


class _StageRunner:
    """Runs one stage on the points still robust and books what it broke (``out``, ``robust``, record)."""

    def __init__(self, owner, model, x, y, eps, norm, n_classes, robust, record):
        self.owner, self.model, self.x, self.y, self.eps, self.norm = owner, model, x, y, eps, norm
        self.n_classes, self.robust, self.record, self.out = n_classes, robust, record, x.clone()

    def _predict(self, inp):
        with attack_context(self.model, self.owner._training), torch.no_grad():
            logits = self.model(inp)
        check_logits(logits, inp.shape[0], where="the attacks' outputs")
        return logits.argmax(1)

    def __call__(self, name, attack):
        x, y, robust = self.x, self.y, self.robust
        live = robust.nonzero().squeeze(1)
        # the DLR losses rank the sorted logits (targeted DLR reads the 4th largest): with fewer
        # classes than they need the stage cannot run, and the later stages still do
        if live.numel() and self.n_classes >= MIN_CLASSES.get(name, 2):
            adv = attack(x[live], y[live])
            if not isinstance(adv, torch.Tensor) or adv.shape != x[live].shape:
                got = tuple(adv.shape) if isinstance(adv, torch.Tensor) else type(adv).__name__
                raise ValueError(
                    f"AutoAttack stage {name!r} returned {got}; a stage must return images of its input's "
                    f"shape {tuple(x[live].shape)}"
                )
            adv = adv.detach().to(x.dtype)
            broken = (self._predict(adv) != y[live]) & inside_ball(adv, x[live], self.eps, self.norm)
            hit = live[broken]
            self.out[hit] = adv[broken]
            robust[hit] = False
            for i in hit.tolist():
                self.record.broken_by[i] = name
        self.record.robust_accuracy[name] = robust.float().mean().item()
        if self.owner.verbose:
            print(f"AutoAttack {name}: robust accuracy {self.record.robust_accuracy[name]:.2%}")
