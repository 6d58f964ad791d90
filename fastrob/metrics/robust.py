"""Robust accuracy under one attack, and the accuracy-vs-eps curve with compaction. The attacks
these metrics run by name ("pgd", "apgd", "autoattack") come from ``fastrob.attacks.make_attack``,
the names of the attacks a result came from from ``fastrob.attacks.describe_attack``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from fastrob._checks import check_float, check_int
from fastrob.attacks import (
    ALPHA_FACTOR,
    ATTACKS,
    attack_ball,
    check_attack_output,
    check_norm,
    default_alpha,
    describe_attack,
    make_attack,
    pgd,
)
from fastrob.distributed import unwrap
from fastrob.metrics._common import batches, clean_logits, model_device, shard

# re-exported: the metrics' names of the attack factory
__all__ = [
    "ATTACKS",
    "AccuracyCurve",
    "RobustAccuracy",
    "accuracy_curve",
    "describe_attack",
    "make_attack",
    "robust_accuracy",
]


@dataclass
class RobustAccuracy:
    """accuracy: fraction of samples classified correctly both clean and after the attack;
    clean_accuracy: without the attack; n: number of samples; robust: the per-sample mask [n];
    attack: which attack produced it (``describe_attack``)."""

    accuracy: float
    clean_accuracy: float
    n: int
    robust: torch.Tensor = field(repr=False)
    attack: str = ""

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "clean_accuracy": self.clean_accuracy, "n": self.n, "attack": self.attack}


@dataclass
class AccuracyCurve:
    """Robust accuracy at each eps (ascending), with the clean accuracy and the attack settings
    (``attack``: which attack, ``describe_attack`` of the one at the largest eps)."""

    eps: list[float]
    accuracy: list[float]
    clean_accuracy: float
    n: int
    norm: str
    steps: int
    attack: str = ""

    def as_dict(self) -> dict:
        return {
            "eps": self.eps,
            "accuracy": self.accuracy,
            "clean_accuracy": self.clean_accuracy,
            "n": self.n,
            "norm": self.norm,
            "steps": self.steps,
            "attack": self.attack,
        }


def robust_accuracy(
    model,
    data,
    attack,
    *,
    batch_size: int = 256,
    device=None,
    quiet: bool = False,
    n: int | None = None,
    distributed: bool | None = None,
) -> RobustAccuracy:
    """Fraction of samples with argmax f(x) = y and argmax f(attack(x, y)) = y.

    ``attack`` is any callable attack(x, y) -> x_adv (a fastrob attack such as
    ``fastrob.PGD(model, eps=...)``, or a torchattacks attack). Samples the model already gets
    wrong are not attacked (they cannot count as robust), so the attack sees only the clean-correct
    rows of each batch; ``n`` caps the number of samples read.

    Distributed (``fastrob.metrics._common.shard``): with a DistributedSampler-sharded loader (or
    ``distributed=True``), each rank attacks its shard without communicating, and the per-sample
    masks are gathered, so every rank returns the global result, ``robust`` in the sampler's order;
    the sampler's padding repeats are not counted and ``n`` caps the global number of samples. A
    DDP model runs its wrapped module; a non-fastrob attack must do the same (attack the module).
    """
    if not callable(attack):
        raise TypeError(f"attack must be callable as attack(x, y) -> x_adv, got {type(attack).__name__}")
    ball = attack_ball(attack)
    model = unwrap(model)
    device = model_device(model, device)
    part = shard(data, n, distributed)
    masks, clean = [], []
    for x, y in batches(data, batch_size, device, desc="robust accuracy", quiet=quiet, limit=n, shard=part):
        correct = clean_logits(model, x, y).argmax(1) == y
        clean.append(correct.cpu())
        robust = correct.clone()
        if bool(correct.any()):
            x_adv = attack(x[correct], y[correct])
            check_attack_output(x_adv, x[correct], ball)
            robust[correct] = clean_logits(model, x_adv, where="adversarial inputs").argmax(1) == y[correct]
        masks.append(robust.cpu())
    robust = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)
    n_clean = int(torch.cat(clean).sum()) if clean else 0
    if part is not None:
        robust, n_clean = part.gather(robust), int(part.sum(n_clean))
    if not len(robust):
        raise ValueError("data holds no samples: robust accuracy is undefined on empty data")
    total = len(robust)
    return RobustAccuracy(
        float(robust.float().sum()) / total, n_clean / total, len(robust), robust, describe_attack(attack)
    )


def accuracy_curve(
    model,
    data,
    eps_list: Sequence[float],
    norm: str = "linf",
    *,
    steps: int = 20,
    alpha_factor: float = ALPHA_FACTOR,
    restarts: int = 1,
    random_start=True,
    loss: str = "ce",
    seed: int = 0,
    batch_size: int = 256,
    device=None,
    quiet: bool = False,
    n: int | None = None,
    distributed: bool | None = None,
    attack="pgd",
) -> AccuracyCurve:
    """Robust accuracy under PGD (``fastrob.attacks.pgd``, the default) or another attack at each eps.

    ``attack``: "pgd" (below), "apgd" (APGD-CE with ``steps`` iterations, ``restarts`` restarts),
    "autoattack" (AutoAttack standard: 100 iterations, 5000 Square queries), "autoattack-fast" (its
    "fast" version, the same settings) or a factory
    eps -> attack(x, y) -> x_adv. Each eps then attacks the survivors of the smaller ones, as below;
    ``alpha_factor``, ``random_start`` and ``loss`` are PGD's only.

    PGD with ``steps`` steps of size alpha = alpha_factor·eps/steps (Madry et al.'s 2.5·eps/steps),
    ``restarts`` random starts and early stop. Compaction: eps are visited in ascending order and a
    sample fooled at a smaller eps counts as fooled at every larger one (the ball contains the
    smaller ball), so each eps attacks only the survivors of the previous one, and PGD's
    ``robust_only`` drops a sample inside an attack as soon as it is fooled. The curve is therefore
    non-increasing by construction, and it is never above the per-eps ``robust_accuracy`` of the
    same attack. Random starts come from one generator seeded with ``seed``.

    Distributed: as ``robust_accuracy`` (each rank attacks its shard, the counts are summed over
    ranks); rank r seeds its generator with ``seed + r``, so with random starts the curve equals a
    single-process one in distribution, and exactly with ``random_start=False``.
    """
    if isinstance(eps_list, (str, bytes)) or not isinstance(eps_list, Iterable):
        raise TypeError(f"eps_list must be a sequence of radii, e.g. [0.05, 0.1], got {type(eps_list).__name__}")
    check_norm(norm)  # here, not first by pgd: with no clean-correct sample pgd never runs
    eps_values = [check_float("eps_list", e, min_value=0.0) for e in eps_list]
    if not eps_values:
        raise ValueError("eps_list must hold at least one eps")
    steps = check_int("steps", steps, 1)
    alpha_factor = check_float("alpha_factor", alpha_factor, min_value=0.0)
    order = sorted(range(len(eps_values)), key=eps_values.__getitem__)
    if attack != "pgd":
        return _curve_of(
            model,
            data,
            [eps_values[k] for k in order],
            norm,
            attack,
            steps=steps,
            restarts=restarts,
            seed=seed,
            batch_size=batch_size,
            device=device,
            quiet=quiet,
            n=n,
            distributed=distributed,
        )
    model = unwrap(model)
    device = model_device(model, device)
    part = shard(data, n, distributed)
    generator = torch.Generator(device=device).manual_seed(seed + (part.rank if part else 0))
    alive_count = [0] * len(eps_values)
    n_total = n_clean = 0
    for x, y in batches(data, batch_size, device, desc=f"accuracy curve ({norm})", quiet=quiet, limit=n, shard=part):
        alive = (clean_logits(model, x, y).argmax(1) == y).nonzero().squeeze(1)
        n_total += len(y)
        n_clean += len(alive)
        for k in order:
            eps = eps_values[k]
            if eps > 0 and len(alive):
                _, fooled = pgd(
                    model,
                    x[alive],
                    y[alive],
                    eps=eps,
                    alpha=default_alpha(eps, steps, alpha_factor),
                    steps=steps,
                    norm=norm,
                    restarts=restarts,
                    random_start=random_start,
                    loss=loss,
                    robust_only=True,
                    return_fooled=True,
                    generator=generator,
                )
                alive = alive[~fooled]
            alive_count[k] += len(alive)
    n_total, n_clean, alive_count = _curve_counts(part, n_total, n_clean, alive_count)
    total = n_total
    return AccuracyCurve(
        [eps_values[k] for k in order],
        [alive_count[k] / total for k in order],
        n_clean / total,
        n_total,
        norm,
        steps,
        f"PGD-{steps}({norm}, alpha={alpha_factor:g}*eps/{steps}{f', {restarts} restarts' if restarts > 1 else ''})",
    )


def _curve_counts(part, n_total: int, n_clean: int, alive_count: list) -> tuple[int, int, list]:
    """The curve's counts summed over ranks (``part``: the shard, None alone); empty data is an error."""
    if part is not None:
        n_total, n_clean, *alive_count = (int(v) for v in part.sum([n_total, n_clean, *alive_count]))
    if not n_total:
        raise ValueError("data holds no samples: the accuracy curve is undefined on empty data")
    return n_total, n_clean, alive_count


def _curve_of(
    model, data, eps_values, norm, attack, *, steps, restarts, seed, batch_size, device, quiet, n, distributed
) -> AccuracyCurve:
    """``accuracy_curve`` under a named attack or a factory eps -> attack (eps_values ascending): each
    eps attacks only the survivors of the smaller ones; outputs are checked as in ``robust_accuracy``."""
    if isinstance(attack, str):
        if attack not in ATTACKS:
            raise ValueError(f"attack must be one of {ATTACKS} or a factory eps -> attack, got {attack!r}")
        name = attack
        attack = None
    elif not callable(attack):
        raise TypeError(f"attack must be a name in {ATTACKS} or a factory eps -> attack, got {type(attack).__name__}")
    model = unwrap(model)
    device = model_device(model, device)
    part = shard(data, n, distributed)
    built = {}

    def attack_at(eps, n_classes):
        if eps not in built:
            if attack is None:
                steps_of = 100 if name.startswith("autoattack") else steps
                built[eps] = make_attack(
                    name,
                    model,
                    eps,
                    norm,
                    steps=steps_of,
                    restarts=restarts,
                    n_classes=n_classes,
                    seed=seed + (part.rank if part else 0),
                    quiet=True,
                )
            else:
                built[eps] = attack(eps)
                if not callable(built[eps]):
                    raise TypeError(
                        f"attack(eps) must return an attack(x, y) -> x_adv, got {type(built[eps]).__name__}"
                    )
        return built[eps]

    alive_count = [0] * len(eps_values)
    n_total = n_clean = 0
    for x, y in batches(data, batch_size, device, desc=f"accuracy curve ({norm})", quiet=quiet, limit=n, shard=part):
        logits = clean_logits(model, x, y)
        alive = (logits.argmax(1) == y).nonzero().squeeze(1)
        n_total += len(y)
        n_clean += len(alive)
        for k, eps in enumerate(eps_values):
            if eps > 0 and len(alive):
                atk = attack_at(eps, logits.shape[1])
                x_adv = atk(x[alive], y[alive])
                check_attack_output(x_adv, x[alive], attack_ball(atk))
                fooled = clean_logits(model, x_adv, where="adversarial inputs").argmax(1) != y[alive]
                alive = alive[~fooled]
            alive_count[k] += len(alive)
    n_total, n_clean, alive_count = _curve_counts(part, n_total, n_clean, alive_count)
    largest = max(eps_values)
    described = describe_attack(built[largest]) if largest in built else (name if attack is None else "")
    return AccuracyCurve(
        list(eps_values), [c / n_total for c in alive_count], n_clean / n_total, n_total, norm, steps, described
    )
