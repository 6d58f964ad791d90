"""``fastrob eval``: its arguments, whose defaults are ``EvalSettings``' (the radii per norm
included), the command, and the checkpoints it and ``fastrob explain`` load."""

from __future__ import annotations

import os

import torch

from fastrob import evaluation, trainer
from fastrob._atomic import write_json
from fastrob.attacks import ATTACKS, NORMS
from fastrob.cli.args import _checkpoint_args, _common, _eps_list, _float, _positive_int
from fastrob.data import load_dataset, subset
from fastrob.evaluation import CURVE_RADII, METRIC_RADIUS, EvalSettings


def _radii(per_norm: dict) -> str:
    """e.g. "linf 0.05,0.1; l2 0.5,1": a default radius (or list of radii) per norm, for the help."""
    text = lambda v: ",".join(f"{r:g}" for r in v) if isinstance(v, tuple) else f"{v:g}"  # noqa: E731
    lists = any(isinstance(v, tuple) for v in per_norm.values())
    return ("; " if lists else ", ").join(f"{norm} {text(v)}" for norm, v in per_norm.items())


def add_parser(sub) -> None:
    d = EvalSettings()  # the defaults: the settings' own (in linf; the radii per norm: CURVE_RADII, METRIC_RADIUS)
    p = sub.add_parser(
        "eval",
        help="robust accuracy over eps, ARA, KL bound, D and NS for one or more checkpoints",
        description="Evaluate checkpoints on the test split of their data: PGD robust accuracy at "
        "each eps, the robust accuracy under AutoAttack (or --attack) at --attack-eps, "
        "the gradient-masking report, the accuracy-robustness area (ARA), the KL "
        "divergence bound, the interpretation discrepancy (D) and the neuron sensitivity "
        "(NS). Prints a table and writes eval.json, accuracy.png and ara.png to --out.",
    )
    _checkpoint_args(p)
    p.add_argument("--norm", choices=NORMS, default=d.norm, help="attack norm (default %(default)s)")
    p.add_argument("--eps", type=_eps_list, default=None, help=f"comma-separated radii (default {_radii(CURVE_RADII)})")
    p.add_argument("--steps", type=_positive_int, default=d.steps, help="PGD steps (default %(default)s)")
    p.add_argument(
        "--restarts", type=_positive_int, default=d.restarts, help="PGD random restarts (default %(default)s)"
    )
    p.add_argument("--n", type=_positive_int, default=None, help="evaluate the first N test images (default all)")
    p.add_argument("--ara-n", type=int, default=d.ara_n, help="images for ARA, 0 to skip (default %(default)s)")
    p.add_argument(
        "--ara-kind", choices=("attack", "btr"), default=d.ara_kind, help="ARA success (default %(default)s)"
    )
    p.add_argument(
        "--kl-eps",
        type=_float(),
        default=None,
        help=f"radius of the KL bound in --norm, 0 to skip (default {_radii(METRIC_RADIUS)})",
    )
    p.add_argument(
        "--kl-steps", type=_positive_int, default=d.kl_steps, help="ascent steps of the KL bound (default %(default)s)"
    )
    p.add_argument(
        "--interp-eps",
        type=_float(),
        default=None,
        help=f"PGD radius for the interpretation discrepancy D, 0 to skip (default {_radii(METRIC_RADIUS)})",
    )
    p.add_argument(
        "--sens-eps",
        type=_float(),
        default=None,
        help=f"PGD radius for the neuron sensitivity NS, 0 to skip (default {_radii(METRIC_RADIUS)})",
    )
    p.add_argument(
        "--attack",
        choices=ATTACKS,
        default=d.attack,
        help="attack of the robust accuracy at --attack-eps (default %(default)s: the standard version)",
    )
    p.add_argument(
        "--attack-eps",
        type=_float(),
        default=None,
        help=f"radius of --attack and of the masking report, 0 to skip both (default {_radii(METRIC_RADIUS)})",
    )
    p.add_argument(
        "--attack-iterations",
        type=_positive_int,
        default=d.attack_steps,
        help="iterations of APGD / AutoAttack's APGD-CE, APGD-T, FAB-T (default %(default)s; PGD uses --steps)",
    )
    p.add_argument(
        "--queries",
        type=_positive_int,
        default=d.attack_queries,
        help="AutoAttack's Square queries (default %(default)s)",
    )
    p.add_argument(
        "--curve-attack",
        choices=ATTACKS,
        default=d.curve_attack,
        help="attack of the accuracy-vs-eps curve (default %(default)s, --steps steps; apgd: --steps iterations; "
        "autoattack: the standard version)",
    )
    p.add_argument(
        "--masking-n",
        type=_positive_int,
        default=d.masking_n,
        help="images of the gradient-masking report (default %(default)s)",
    )
    p.add_argument("--no-masking", action="store_true", help="skip the gradient-masking report")
    _common(p, "runs/eval", seed=d.seed)
    p.set_defaults(func=_eval)


def _load_models(args):
    """{name: model}, and the test tensors (x, y) of the data the first checkpoint was trained on
    (or of --data)."""
    models, configs = {}, []
    for path in args.checkpoint:
        model, config = trainer.load_checkpoint(path, args.device)
        name = trainer.describe(config)
        if name in models:
            name = f"{name} ({path})"
        models[name] = model
        configs.append(config)
    first = configs[0]
    data = args.data or first.data
    dataset = load_dataset(data, args.size if args.size else first.size, first.test_fraction, first.seed)
    x, y = subset(dataset.split.x_test, dataset.split.y_test, getattr(args, "n", None))
    for (name, model), config in zip(models.items(), configs):
        try:
            with torch.no_grad():
                out = model(x[:1].to(args.device))
        except RuntimeError as err:
            raise ValueError(
                f"{name}: the model does not take {data} images of shape {tuple(x.shape[1:])} "
                f"(trained on {config.data}, size {config.size}): {str(err).splitlines()[0]}"
            ) from None
        if int(y.max()) >= out.shape[1]:
            raise ValueError(f"{name}: {data} has labels up to {int(y.max())} but the model has {out.shape[1]} outputs")
    return models, x.to(args.device), y.to(args.device), data


def _eval(args) -> int:
    models, x, y, data = _load_models(args)
    settings = EvalSettings.for_norm(
        args.norm,
        eps=args.eps,
        steps=args.steps,
        restarts=args.restarts,
        ara_n=args.ara_n,
        ara_kind=args.ara_kind,
        kl_eps=args.kl_eps,
        kl_steps=args.kl_steps,
        interp_eps=args.interp_eps,
        sens_eps=args.sens_eps,
        seed=args.seed,
        attack=args.attack,
        attack_eps=args.attack_eps,
        attack_steps=args.attack_iterations,
        attack_queries=args.queries,
        curve_attack=args.curve_attack,
        masking_n=0 if args.no_masking else args.masking_n,
    )
    results = evaluation.evaluate(models, x, y, settings, quiet=args.quiet)
    print(f"fastrob eval: {len(models)} model(s) on {len(y)} test images of {data}\n")
    print(evaluation.table(results, settings))
    print("\n" + evaluation.legend(settings, results))
    if settings.masking_n > 0 and settings.attack_eps > 0:  # every model's checks, suspicious or not
        print("\n" + evaluation.masking_tables(results))
    os.makedirs(args.out, exist_ok=True)
    paths = evaluation.write_plots(results, args.out)
    path = write_json(
        {"data": data, "n": len(y), "settings": vars(settings), "results": evaluation.as_json(results)},
        os.path.join(args.out, "eval.json"),
    )
    print(f"\nwrote {path}, {', '.join(paths)}")
    return 0
