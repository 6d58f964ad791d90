"""Side-by-side evaluation of several models (``fastrob eval`` and ``fastrob demo``): the metrics of
``fastrob.metrics`` on one test set, a JSON-ready result, a plain-text table, and the plots."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from fastrob import attacks, distributed, metrics, plots
from fastrob._checks import check_logits

# the table's and legend's short name of each headline attack
SHORT_NAMES = {"autoattack": "AA", "autoattack-fast": "AA-fast", "apgd": "APGD", "pgd": "PGD"}

# each norm's radii unless given: those of the accuracy curve, and the one radius of the KL bound,
# the interpretation discrepancy, the neuron sensitivity, the headline attack and the masking report
CURVE_RADII = {"linf": (0.05, 0.1, 0.2, 0.3), "l2": (0.5, 1.0, 2.0)}
METRIC_RADIUS = {"linf": 0.1, "l2": 0.5}
METRIC_RADIUS_FIELDS = ("kl_eps", "interp_eps", "sens_eps", "attack_eps")


@dataclass
class EvalSettings:
    """norm, eps: the PGD accuracy curve (``steps`` steps, ``restarts`` starts, alpha 2.5·eps/steps);
    ara_n: samples for ARA (0: skip); kl_eps, kl_steps: the KL bound (kl_eps 0: skip); interp_eps:
    the radius of the PGD (``steps`` steps) under which the interpretation discrepancy is measured,
    sens_eps: the same for neuron sensitivity (0: skip); attack, attack_eps: the attack ("autoattack",
    "autoattack-fast", "apgd", "pgd") of the headline robust accuracy at attack_eps (0: skip), with
    attack_steps iterations (APGD, AutoAttack; PGD uses ``steps``) and attack_queries Square queries
    (AutoAttack);
    curve_attack: the attack of the accuracy curve (PGD unless asked); masking_n: samples of the
    gradient-masking report at attack_eps (0: skip), masking_queries: its Square queries."""

    norm: str = "linf"
    eps: list = field(default_factory=lambda: list(CURVE_RADII["linf"]))
    steps: int = 20
    restarts: int = 1
    ara_n: int = 1000
    ara_kind: str = "attack"
    kl_eps: float = METRIC_RADIUS["linf"]
    kl_steps: int = 10
    interp_eps: float = METRIC_RADIUS["linf"]
    sens_eps: float = METRIC_RADIUS["linf"]
    attack: str = "autoattack"
    attack_eps: float = METRIC_RADIUS["linf"]
    attack_steps: int = 100
    attack_queries: int = 5000
    curve_attack: str = "pgd"
    masking_n: int = 500
    masking_queries: int = 1000
    seed: int = 0

    @classmethod
    def for_norm(cls, norm: str, **values) -> EvalSettings:
        """Settings in ``norm`` whose radii not given (absent or None) are the norm's own
        (``CURVE_RADII``, ``METRIC_RADIUS``)."""
        if norm not in CURVE_RADII:
            raise ValueError(f"norm must be one of {tuple(CURVE_RADII)}, got {norm!r}")
        defaults = {"eps": list(CURVE_RADII[norm]), **dict.fromkeys(METRIC_RADIUS_FIELDS, METRIC_RADIUS[norm])}
        for name, default in defaults.items():
            if values.get(name) is None:
                values[name] = default
        return cls(norm=norm, **values)


def _pgd(model, eps: float, s: EvalSettings):
    """The PGD of the interpretation discrepancy: ``s.steps`` steps of 2.5·eps/steps in ``s.norm``,
    random starts from one generator per evaluation seeded with seed + rank (as the other metrics)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(s.seed + distributed.rank())
    return lambda x, y: attacks.pgd(
        model, x, y, eps=eps, alpha=attacks.default_alpha(eps, s.steps), steps=s.steps, norm=s.norm, generator=generator
    )


def _headline(model, data, s: EvalSettings, quiet: bool):
    """Robust accuracy at ``s.attack_eps`` under ``s.attack`` (AutoAttack by default)."""
    x = data[0]
    with torch.no_grad():
        first = model(x[:1])
    check_logits(first, 1)  # a tuple or dict output: the error says how to pick the logits
    n_classes = int(first.shape[1])
    steps = s.steps if s.attack == "pgd" else s.attack_steps
    attack = metrics.make_attack(
        s.attack,
        model,
        s.attack_eps,
        s.norm,
        steps=steps,
        restarts=s.restarts,
        n_queries=s.attack_queries,
        n_classes=n_classes,
        seed=s.seed,
    )
    return metrics.robust_accuracy(model, data, attack, quiet=quiet)


# What ``evaluate`` computes per model, in order: (key, function(model, data, settings, quiet) ->
# result with as_dict(), enabled(settings)); ``table`` has a column for each.
EVAL_METRICS: list[tuple[str, Callable, Callable]] = [
    (
        "curve",
        lambda m, d, s, q: metrics.accuracy_curve(
            m, d, s.eps, s.norm, steps=s.steps, restarts=s.restarts, seed=s.seed, quiet=q, attack=s.curve_attack
        ),
        lambda s: True,
    ),
    # the headline robust accuracy (AutoAttack, Croce & Hein 2020, by default) and the masking checks behind it
    ("robust", _headline, lambda s: s.attack_eps > 0),
    (
        "masking",
        lambda m, d, s, q: metrics.masking_report(
            m, d, s.attack_eps, s.norm, n=s.masking_n, n_queries=s.masking_queries, seed=s.seed, quiet=q
        ),
        lambda s: s.attack_eps > 0 and s.masking_n > 0,
    ),
    (
        "ara",
        lambda m, d, s, q: metrics.ara(m, d, n=s.ara_n, kind=s.ara_kind, seed=s.seed, quiet=q),
        lambda s: s.ara_n > 0,
    ),
    (
        "kl",
        lambda m, d, s, q: metrics.kl_robustness(m, d, s.kl_eps, s.norm, s.kl_steps, seed=s.seed, quiet=q),
        lambda s: s.kl_eps > 0,
    ),
    # Boopathy et al. 2020 (docs/methods.md#interpretation-aware-training): the 2-class l1
    # discrepancy of CAM (models with a GAP head) or saliency maps
    (
        "interp",
        lambda m, d, s, q: metrics.interpretation_discrepancy(m, d, _pgd(m, s.interp_eps, s), map="auto", quiet=q),
        lambda s: s.interp_eps > 0,
    ),
    # Zhang, Liu et al. 2019 (docs/methods.md#neuron-sensitivity): mean neuron sensitivity of the activation layers
    (
        "sensitivity",
        lambda m, d, s, q: metrics.neuron_sensitivity_metric(
            m, d, eps=s.sens_eps, norm=s.norm, steps=s.steps, seed=s.seed, quiet=q
        ),
        lambda s: s.sens_eps > 0,
    ),
]


def evaluate(
    models: Mapping[str, torch.nn.Module], x: torch.Tensor, y: torch.Tensor, settings: EvalSettings, quiet: bool = False
) -> dict:
    """{model name: {metric key: result object}} for every enabled metric of ``EVAL_METRICS``."""
    out = {}
    for name, model in models.items():
        out[name] = {key: fn(model, (x, y), settings, quiet) for key, fn, enabled in EVAL_METRICS if enabled(settings)}
    return out


def as_json(results: Mapping[str, Mapping[str, object]]) -> dict:
    return {name: {key: r.as_dict() for key, r in res.items()} for name, res in results.items()}


def table(results: Mapping[str, Mapping[str, object]], settings: EvalSettings) -> str:
    """One row per model: clean accuracy, robust accuracy at each eps, ARA, mean KL bound, mean
    interpretation discrepancy, mean neuron sensitivity (the metrics that ran)."""
    width = max([len(n) for n in results] + [5]) + 2
    eps = [e for e in sorted(settings.eps) if e > 0]
    head = f"{'model':<{width}}{'clean':>7}" + "".join(f"{f'{settings.norm} {e:g}':>11}" for e in eps)
    # the optional columns after the accuracies: (metric key, header, the cell of its result)
    short = SHORT_NAMES.get(settings.attack, settings.attack)
    columns = [
        ("robust", f"{short}@{settings.attack_eps:g}", lambda r: f"{r.accuracy:.1%}"),
        ("masking", "masking", lambda r: r.verdict),
        ("ara", "ARA", lambda r: f"{r.ara:.4f}"),
        ("kl", f"KL@{settings.kl_eps:g}", lambda r: f"{r.mean:.3f}"),
        ("interp", f"D@{settings.interp_eps:g}", lambda r: f"{r.mean:.2f}"),
        ("sensitivity", f"NS@{settings.sens_eps:g}", lambda r: f"{r.mean:.4f}"),
    ]
    columns = [c for c in columns if any(c[0] in r for r in results.values())]
    # each column as wide as its widest cell (at least 9): "suspicious" is wider than a number
    widths = [
        max([9, len(header) + 2] + [len(cell(r[key])) + 2 for r in results.values() if key in r])
        for key, header, cell in columns
    ]
    head += "".join(f"{header:>{w}}" for (_, header, _), w in zip(columns, widths))
    lines = [head]
    for name, res in results.items():
        c = res["curve"]
        acc = dict(zip(c.eps, c.accuracy))
        row = f"{name:<{width}}{c.clean_accuracy:>7.1%}" + "".join(f"{acc[e]:>11.1%}" for e in eps)
        row += "".join(f"{cell(res[key]) if key in res else '-':>{w}}" for (key, _, cell), w in zip(columns, widths))
        lines.append(row)
    return "\n".join(lines)


def _attack_words(name: str, s: EvalSettings, steps: int, queries: int) -> str:
    """What the attack ``name`` runs with ``steps`` iterations (APGD, AutoAttack; PGD: ``s.steps``), in words."""
    restarts = f", {s.restarts} restarts" if s.restarts > 1 else ""
    if name == "pgd":
        return f"PGD-{s.norm}, {s.steps} steps of {attacks.ALPHA_FACTOR:g}*eps/{s.steps}{restarts or ', random start'}"
    if name == "apgd":
        return f"APGD-CE-{s.norm}, {steps} iterations{restarts}"
    standard = (steps, queries) == (100, 5000)
    if name == "autoattack-fast":
        return (
            f"AutoAttack fast (APGD-CE and APGD-T on {attacks.autoattack.FAST_TARGETS} MALT targets with {steps} "
            f"iterations; FAB-T and Square ({queries} queries) only where a cheap masking check is suspicious)"
        )
    return (
        f"AutoAttack {'standard' if standard else 'in the standard order with cheaper settings'} "
        f"(APGD-CE, APGD-T, FAB-T with {steps} iterations, Square with {queries} queries)"
    )


def legend(settings: EvalSettings, results: Mapping[str, Mapping[str, object]] | None = None) -> str:
    """The lines under the table, one per column that ran; ``results`` give the number of images
    the masking reports read (fewer than ``masking_n`` when the data has fewer)."""
    # accuracy_curve runs APGD with ``steps`` and AutoAttack standard
    parts = [
        f"robust accuracy over eps: {_attack_words(settings.curve_attack, settings, settings.steps, 5000)}"
        if settings.curve_attack != "autoattack"
        else f"robust accuracy over eps: {_attack_words('autoattack', settings, 100, 5000)}"
    ]
    if settings.attack_eps > 0:
        short = SHORT_NAMES[settings.attack]
        parts.append(
            f"{short}@{settings.attack_eps:g}: robust accuracy at {settings.norm} eps "
            f"{settings.attack_eps:g} under "
            f"{_attack_words(settings.attack, settings, settings.attack_steps, settings.attack_queries)}"
        )
        if settings.masking_n > 0:
            # the images the reports read: --masking-n, or fewer when the data has fewer
            n = max((r["masking"].n for r in (results or {}).values() if "masking" in r), default=settings.masking_n)
            parts.append(
                f"masking: the gradient-masking report at the same eps on {n} images "
                "(suspicious: a check over its limit; the checks of flagged models follow)"
            )
    if settings.ara_n > 0:
        parts.append(f"ARA: accuracy-robustness area over RMSE radii ({settings.ara_kind}; higher is more robust)")
    if settings.kl_eps > 0:
        parts.append(
            f"KL@{settings.kl_eps:g}: mean max KL(p(x)||p(x+d)) over the {settings.norm} ball (lower is more stable)"
        )
    if settings.interp_eps > 0:
        parts.append(
            f"D@{settings.interp_eps:g}: mean 2-class l1 interpretation discrepancy under PGD-{settings.norm} "
            "(CAM for models with a GAP head, else input-gradient saliency: compare like with like; "
            "lower is more stable)"
        )
    if settings.sens_eps > 0:
        parts.append(
            f"NS@{settings.sens_eps:g}: mean neuron sensitivity of the activation layers under "
            f"PGD-{settings.norm} (lower is more stable)"
        )
    return "\n".join(parts)


def masking_tables(results: Mapping[str, Mapping[str, object]]) -> str:
    """Each model's gradient-masking report (the checks, values, limits and verdicts), one after another."""
    return "\n\n".join(f"{name}: {res['masking'].table()}" for name, res in results.items() if "masking" in res)


def write_plots(results: Mapping[str, Mapping[str, object]], out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [plots.accuracy_curves({n: r["curve"] for n, r in results.items()}, os.path.join(out_dir, "accuracy.png"))]
    aras = {n: r["ara"] for n, r in results.items() if "ara" in r}
    if aras:
        paths.append(plots.ara_curves(aras, os.path.join(out_dir, "ara.png")))
    return paths
