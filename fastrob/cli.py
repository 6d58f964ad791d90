"""The ``fastrob`` command."""

from __future__ import annotations

import argparse
import platform
import sys

import torch


def _info(args) -> int:
    import fastrob
    from fastrob import _backend

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"fastrob {fastrob.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton_version}")
    print(f"cpu: {torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            compiled = "" if _backend.extension_runs_on((p.major, p.minor)) else " (fastrob._C has no code for it)"
            print(
                f"cuda:{i}: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB"
                f"{compiled}"
            )
    else:
        print("cuda: no GPU visible (torch.cuda.is_available() is False)")
    record = _backend.extension_build_record()
    if record.get("built"):
        print(f"extension fastrob._C: built with {record.get('nvcc')} for sm_{', sm_'.join(record.get('archs', []))}")
    else:
        print(f"extension fastrob._C: not built ({record.get('reason')})")
    print("backends:")
    for name in ("torch", "triton", "cuda"):
        st = _backend.status(name)
        print(f"  {name:<7}{'available' if st.available else 'unavailable':<13}{st.reason}")
    from fastrob import verify

    print(verify.describe_record())
    return 0


def verify_ops() -> tuple:
    from fastrob.selfchecks import OPS

    return OPS


def _check(args) -> int:
    from fastrob import verify

    return verify.check_command(
        devices=args.device,
        ops=args.op,
        record=args.record,
        record_path=args.record_path,
        tests_passed=args.tests_passed,
    )


def _device(value: str) -> str:
    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {value!r} (try cpu or cuda)") from None
    if device.type == "meta":
        raise argparse.ArgumentTypeError("meta holds no values: choose a device that computes (cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda was asked for but no GPU is visible")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{value}: only {torch.cuda.device_count()} GPU(s) are visible")
    return value


SEED_MAX = 2**32 - 1  # numpy's RandomState (the data split) takes seeds in [0, 2**32)


def _seed(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if not 0 <= n <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer seed in [0, {SEED_MAX}], got {value!r}")
    return n


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _float(low: float = 0.0, strict: bool = False):
    """argparse type: a float >= low (> low when strict)."""

    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            x = float("nan")
        if not (x > low if strict else x >= low) or x != x or x == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a number {'>' if strict else '>='} {low:g}, got {value!r}")
        return x

    return parse


def _number_list(cast, what: str, example: str):
    """An argparse type: comma-separated numbers of type ``cast``, each finite and >= 0."""

    def parse(value: str) -> list:
        try:
            items = [cast(v) for v in value.split(",") if v.strip()]
        except ValueError:
            items = []
        if not items or min(items) < 0 or any(v != v or v == float("inf") for v in items):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what} >= 0, e.g. {example}; got {value!r}")
        return items

    return parse


_int_list = _number_list(int, "indices", "0,1,2")
_warmup_pair = _number_list(float, "epochs", "1,5")


def _warmup(value: str) -> list:
    pair = _warmup_pair(value)
    if len(pair) != 2 or pair[1] < pair[0]:
        raise argparse.ArgumentTypeError(f"expected START,FULL epochs with START <= FULL, e.g. 1,5; got {value!r}")
    return pair


_eps_list = _number_list(float, "radii", "0.05,0.1,0.2")


def _size(value: str) -> int:
    n = _positive_int(value)
    if n < 4:
        raise argparse.ArgumentTypeError(f"expected an image size >= 4, got {value!r}")
    return n


# ----------------------------------------------------------------------------------------------
# fastrob train


def _train(args) -> int:
    import json
    import os

    from fastrob import distributed as dist_utils
    from fastrob.trainer import CHECKPOINT, CURVE, METRICS, TrainConfig, train

    config = TrainConfig(
        data=args.data,
        size=args.size,
        model=args.model,
        activation=args.activation,
        method=args.method,
        eps=args.eps,
        alpha=args.alpha,
        attack_steps=args.attack_steps,
        norm=args.norm,
        beta=args.beta,
        lam=args.lam,
        lam_saliency=args.lam_saliency,
        patch=args.patch,
        warmup=args.warmup,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        test_fraction=args.test_fraction,
    )
    if args.resume and args.overwrite:
        raise ValueError(
            "--resume and --overwrite contradict each other: --resume continues the checkpoint in "
            "--out, --overwrite starts again over it; pass one"
        )
    if not args.resume and os.path.isfile(os.path.join(args.out, CHECKPOINT)) and not args.overwrite:
        raise ValueError(
            f"{args.out} already holds a checkpoint: pass --resume to continue it or --overwrite to start again"
        )
    # Under torchrun (WORLD_SIZE > 1) every rank runs this: DDP training, rank 0 prints and writes
    device, started = dist_utils.init_from_env(args.device)
    main = dist_utils.is_main_process()
    try:
        _, history, dataset = train(config, args.out, device=device, resume=args.resume, quiet=args.quiet)
    finally:
        if started:
            dist_utils.destroy()
    if not main:
        return 0
    with open(os.path.join(args.out, METRICS)) as f:
        summary = json.load(f)
    config = summary["config"]  # on --resume, the checkpoint's
    print(
        f"fastrob train: {summary['method']}, {config['model']} ({config['activation']}) on "
        f"{dataset.name} {'x'.join(map(str, dataset.in_shape))}, {len(dataset.split.y_train)} train / "
        f"{len(dataset.split.y_test)} test images"
    )
    print(f"{'epoch':>5}{'loss':>9}{'ce':>9}{'penalty':>9}{'train acc':>11}{'test acc':>10}{'time (s)':>10}")
    for h in history:
        print(
            f"{h['epoch']:>5}{h['loss']:>9.4f}{h['ce']:>9.4f}{h['penalty']:>9.4f}{h['train_accuracy']:>11.1%}"
            f"{h['test_accuracy']:>10.1%}{h['seconds']:>10.2f}"
        )
    print(f"wrote {', '.join(os.path.join(args.out, n) for n in (CHECKPOINT, METRICS, CURVE))}")
    return 0


# ----------------------------------------------------------------------------------------------
# fastrob eval / explain: checkpoints in, one test set


def _load_models(args):
    """{name: model}, and the test tensors (x, y) of the data the first checkpoint was trained on
    (or of --data)."""
    from fastrob.data import load_dataset, subset
    from fastrob.trainer import describe, load_checkpoint

    models, configs = {}, []
    for path in args.checkpoint:
        model, config = load_checkpoint(path, args.device)
        name = describe(config)
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


def _default_radius(value, norm: str) -> float:
    """A metric's radius: the one given, else 0.1 in linf and 0.5 in l2 (0 skips the metric)."""
    return value if value is not None else (0.1 if norm == "linf" else 0.5)


def _eval(args) -> int:
    import os

    from fastrob import evaluation
    from fastrob._atomic import write_json

    models, x, y, data = _load_models(args)
    eps = args.eps or ([0.05, 0.1, 0.2, 0.3] if args.norm == "linf" else [0.5, 1.0, 2.0])
    settings = evaluation.EvalSettings(
        norm=args.norm,
        eps=eps,
        steps=args.steps,
        restarts=args.restarts,
        ara_n=args.ara_n,
        ara_kind=args.ara_kind,
        kl_eps=_default_radius(args.kl_eps, args.norm),
        kl_steps=args.kl_steps,
        interp_eps=_default_radius(args.interp_eps, args.norm),
        sens_eps=_default_radius(args.sens_eps, args.norm),
        seed=args.seed,
        attack=args.attack,
        attack_eps=_default_radius(args.attack_eps, args.norm),
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


def _explain(args) -> int:
    import os
    import re

    from fastrob import plots
    from fastrob._atomic import write_json

    models, x, y, data = _load_models(args)
    if max(args.samples) >= len(y):
        raise ValueError(f"--samples: index {max(args.samples)} is out of range for {len(y)} test images")
    idx = torch.tensor(args.samples)
    xs, ys = x[idx.to(x.device)], y[idx.to(y.device)]
    os.makedirs(args.out, exist_ok=True)
    paths = [
        plots.saliency_grid(models, xs, ys, os.path.join(args.out, "saliency.png")),
        plots.surfaces(
            models,
            xs,
            ys,
            os.path.join(args.out, "surfaces.png"),
            span=args.span,
            resolution=args.resolution,
            seed=args.seed,
        ),
    ]
    num_classes = int(next(iter(models.values()))(xs[:1]).shape[1])
    if args.target is not None and not 0 <= args.target < num_classes:
        raise ValueError(f"--target must be a class in [0, {num_classes}), got {args.target}")
    targets = torch.full_like(ys, args.target) if args.target is not None else (ys + 1) % num_classes
    for name, model in models.items():
        slug = re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_")
        paths.append(
            plots.explanation_grid(
                model,
                xs,
                targets,
                os.path.join(args.out, f"explanations_{slug}.png"),
                rho=args.rho,
                title=f"{name}: adversarial explanations, RMSE <= {args.rho:g}",
            )
        )
    summary = {
        "data": data,
        "samples": args.samples,
        "labels": ys.tolist(),
        "span": args.span,
        "targets": targets.tolist(),
        "rho": args.rho,
        "models": {},
    }
    print(f"fastrob explain: samples {args.samples} of the {data} test set, plane span {args.span:g}\n")
    print(f"{'model':<28}{'sample':>7}{'label':>6}{'pred':>5}{'margin':>8}{'boundary along u':>18}")
    for name, model in models.items():
        s = plots.surface(model, xs, ys, args.span, args.resolution, args.seed)
        center = args.resolution // 2
        rows = []
        for i, k in enumerate(args.samples):
            with torch.no_grad():
                pred = int(model(xs[i : i + 1]).argmax(1))
            along_u = s["margin"][i, center]  # b = 0: the gradient-sign line
            crossing = [float(a) for a, m in zip(s["a"], along_u) if a >= 0 and m <= 0]
            dist = min(crossing) if crossing else None
            rows.append(
                {
                    "sample": k,
                    "label": int(ys[i]),
                    "prediction": pred,
                    "margin": float(s["margin"][i, center, center]),
                    "boundary_along_u": dist,
                }
            )
            print(
                f"{name:<28}{k:>7}{int(ys[i]):>6}{pred:>5}{rows[-1]['margin']:>8.2f}"
                f"{(f'a = {dist:.3f}' if dist is not None else f'> {args.span:g}'):>18}"
            )
        summary["models"][name] = rows
    path = write_json(summary, os.path.join(args.out, "explain.json"))
    print(
        "\n(margin = z_y - max_{j!=y} z_j at the input; boundary along u = the smallest a >= 0 on the "
        "gradient-sign line where the margin reaches 0, i.e. an Linf distance to the boundary)"
    )
    print(f"wrote {path}, {', '.join(paths)}")
    return 0


def _demo(args) -> int:
    from fastrob import demo

    demo.run(epochs=args.epochs, seed=args.seed, device=args.device, out=args.out, n=args.n, quiet=args.quiet)
    return 0


# ----------------------------------------------------------------------------------------------
# the parser

BENCH_MODULES = ("pgd_step", "ops", "regularizers", "attacks")


def _bench(args) -> int:
    import importlib
    from pathlib import Path

    modules = [m for m in BENCH_MODULES if args.filter is None or args.filter in m]
    if not modules:
        raise ValueError(f"--filter {args.filter!r} matches no benchmark module (of {', '.join(BENCH_MODULES)})")
    roots = [r for r in (Path.cwd(), Path(__file__).resolve().parent.parent) if (r / "bench" / "report.py").is_file()]
    if not roots:
        raise ValueError("no bench/ folder here or beside the fastrob package: run from a fastrob source checkout")
    sys.path.insert(0, str(roots[0]))
    for name in modules:
        print(f"== bench.{name}", flush=True)
        importlib.import_module(f"bench.{name}").main(["--quick"] if args.quick else [])
    return importlib.import_module("bench.report").main([])


def _common(p, out_default: str) -> None:
    p.add_argument("--seed", type=_seed, default=0, help=f"random seed in [0, {SEED_MAX}] (default 0)")
    p.add_argument("--device", type=_device, default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", default=out_default, help=f"output directory (default {out_default})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _checkpoint_args(p) -> None:
    p.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        metavar="PATH",
        help="a training output directory or its checkpoint.pt; repeat to compare models",
    )
    p.add_argument(
        "--data",
        default=None,
        help="digits, an .npz file or a folder of class subfolders (default: the checkpoint's data)",
    )
    p.add_argument("--size", type=_size, default=None, help="resize images to SIZE x SIZE (default: as trained)")


def build_parser() -> argparse.ArgumentParser:
    from fastrob import methods
    from fastrob.attacks import ALPHA_FACTOR, NORMS
    from fastrob.models import ACTIVATIONS, MODELS

    parser = argparse.ArgumentParser(prog="fastrob", description="Fast robust and interpretable classification.")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of any error (also FASTROB_DEBUG=1), for bug reports",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("info", help="versions, devices and which backends can run here")
    p.set_defaults(func=_info)

    attack_methods = ", ".join(m.name for m in methods.REGISTRY.values() if m.attack)
    p = sub.add_parser(
        "train",
        help="train a model (plain, adversarial training or a regularizer); resumable",
        description="Train a classifier and write checkpoint.pt, metrics.json and training.png to "
        f"--out. The methods with an attack ({attack_methods}) use "
        "--eps/--alpha/--attack-steps/--norm; regularizers "
        "use --lam (each method's default is listed under --method; lipschitz: a fixed psi, "
        "adaptive when not given) and jsigr also --lam-saliency/--patch. Under "
        "'torchrun --nproc_per_node N -m fastrob train ...' it trains with "
        "DistributedDataParallel (gloo on cpu, nccl on cuda: rank r takes GPU r), "
        "--batch-size being the global batch; rank 0 prints and writes the files.",
    )
    p.add_argument(
        "--data",
        default="digits",
        help="digits, an .npz file (x NCHW in [0,1], y int) or a folder of class subfolders of PNGs (default digits)",
    )
    p.add_argument("--size", type=_size, default=None, help="resize images to SIZE x SIZE (digits: 8, 16 or 32)")
    p.add_argument("--model", choices=MODELS, default="mlp", help="architecture (default mlp)")
    p.add_argument("--activation", choices=ACTIVATIONS, default="relu", help="activation (default relu)")
    p.add_argument("--method", choices=methods.NAMES, default="none", help=methods.cli_help())
    p.add_argument("--eps", type=_float(), default=0.1, help=f"attack radius of {attack_methods} (default 0.1)")
    p.add_argument(
        "--alpha", type=_float(), default=None, help=f"attack step (default {ALPHA_FACTOR:g}*eps/attack-steps)"
    )
    p.add_argument("--attack-steps", type=_positive_int, default=7, help="attack steps (default 7)")
    p.add_argument("--norm", choices=NORMS, default="linf", help="attack norm (default linf)")
    p.add_argument("--beta", type=_float(), default=6.0, help="TRADES beta (default 6)")
    p.add_argument(
        "--lam", type=_float(), default=None, help="regularizer weight (default: the method's; lipschitz: a fixed psi)"
    )
    p.add_argument("--lam-saliency", type=_float(), default=0.1, help="J-SIGR saliency weight (default 0.1)")
    p.add_argument("--patch", type=_positive_int, default=4, help="J-SIGR saliency patch size (default 4)")
    p.add_argument(
        "--warmup",
        type=_warmup,
        default=None,
        help="int* methods: START,FULL in epochs: eps 0 before START, a linear ramp to --eps at FULL "
        "(Boopathy et al.; default: full eps from the start)",
    )
    p.add_argument("--epochs", type=_positive_int, default=20, help="total epochs (default 20)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="batch size (default 64)")
    p.add_argument("--lr", type=_float(strict=True), default=2e-3, help="Adam learning rate (default 2e-3)")
    p.add_argument("--test-fraction", type=_float(strict=True), default=0.25, help="test split (default 0.25)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt up to --epochs")
    p.add_argument("--overwrite", action="store_true", help="start again even if --out holds a checkpoint")
    _common(p, "runs/train")
    p.set_defaults(func=_train)

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
    p.add_argument("--norm", choices=NORMS, default="linf", help="attack norm (default linf)")
    p.add_argument(
        "--eps", type=_eps_list, default=None, help="comma-separated radii (default linf 0.05,0.1,0.2,0.3; l2 0.5,1,2)"
    )
    p.add_argument("--steps", type=_positive_int, default=20, help="PGD steps (default 20)")
    p.add_argument("--restarts", type=_positive_int, default=1, help="PGD random restarts (default 1)")
    p.add_argument("--n", type=_positive_int, default=None, help="evaluate the first N test images (default all)")
    p.add_argument("--ara-n", type=int, default=1000, help="images for ARA, 0 to skip (default 1000)")
    p.add_argument("--ara-kind", choices=("attack", "btr"), default="attack", help="ARA success (default attack)")
    p.add_argument(
        "--kl-eps",
        type=_float(),
        default=None,
        help="radius of the KL bound in --norm, 0 to skip (default linf 0.1, l2 0.5)",
    )
    p.add_argument("--kl-steps", type=_positive_int, default=10, help="ascent steps of the KL bound (default 10)")
    p.add_argument(
        "--interp-eps",
        type=_float(),
        default=None,
        help="PGD radius for the interpretation discrepancy D, 0 to skip (default linf 0.1, l2 0.5)",
    )
    p.add_argument(
        "--sens-eps",
        type=_float(),
        default=None,
        help="PGD radius for the neuron sensitivity NS, 0 to skip (default linf 0.1, l2 0.5)",
    )
    from fastrob.metrics.robust import ATTACKS

    p.add_argument(
        "--attack",
        choices=ATTACKS,
        default="autoattack",
        help="attack of the robust accuracy at --attack-eps (default autoattack: the standard version)",
    )
    p.add_argument(
        "--attack-eps",
        type=_float(),
        default=None,
        help="radius of --attack and of the masking report, 0 to skip both (default linf 0.1, l2 0.5)",
    )
    p.add_argument(
        "--attack-iterations",
        type=_positive_int,
        default=100,
        help="iterations of APGD / AutoAttack's APGD-CE, APGD-T, FAB-T (default 100; PGD uses --steps)",
    )
    p.add_argument("--queries", type=_positive_int, default=5000, help="AutoAttack's Square queries (default 5000)")
    p.add_argument(
        "--curve-attack",
        choices=ATTACKS,
        default="pgd",
        help="attack of the accuracy-vs-eps curve (default pgd, --steps steps; apgd: --steps iterations; "
        "autoattack: the standard version)",
    )
    p.add_argument(
        "--masking-n", type=_positive_int, default=500, help="images of the gradient-masking report (default 500)"
    )
    p.add_argument("--no-masking", action="store_true", help="skip the gradient-masking report")
    _common(p, "runs/eval")
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "explain",
        help="saliency/CAM maps, decision/loss surfaces and adversarial explanations",
        description="For chosen test samples, write saliency.png (input-gradient saliency, and CAM "
        "for cnn models), surfaces.png (margin and loss over the plane x + a*u + b*v, u "
        "the gradient sign, v random), explanations_<model>.png (Woods et al.'s "
        "adversarial explanations toward --target within RMSE --rho) and explain.json.",
    )
    _checkpoint_args(p)
    p.add_argument("--samples", type=_int_list, default=[0, 1, 2], help="test indices (default 0,1,2)")
    p.add_argument("--span", type=_float(strict=True), default=0.3, help="plane half-width in a, b (default 0.3)")
    p.add_argument("--resolution", type=_positive_int, default=41, help="grid points per axis (default 41)")
    p.add_argument(
        "--target",
        type=int,
        default=None,
        help="class the adversarial explanations move toward (default: label + 1, mod classes)",
    )
    p.add_argument("--rho", type=_float(strict=True), default=0.1, help="explanation RMSE budget (default 0.1)")
    _common(p, "runs/explain")
    p.set_defaults(func=_explain)

    p = sub.add_parser(
        "demo",
        help="train plain, regularized and adversarially trained models on digits and compare their robustness",
        description="On the digits data: train a plain MLP and three robust ones (input gradient, "
        "Jacobian, TRADES), evaluate them side by side, print one table and write the "
        "plots and checkpoints to --out.",
    )
    p.add_argument("--epochs", type=_positive_int, default=30, help="training epochs per model (default 30)")
    p.add_argument(
        "--n", type=_positive_int, default=None, help="evaluate on the first N test images (default all 450)"
    )
    _common(p, "runs/demo")
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "bench",
        help="run the benchmarks against the reference implementations (from a source "
        "checkout), then regenerate the table of docs/benchmarks.md and bench/results/speedup.png",
    )
    p.add_argument("--quick", action="store_true", help="small shapes, fewer repetitions")
    p.add_argument(
        "--filter", metavar="SUBSTR", help=f"only the modules whose name contains SUBSTR ({', '.join(BENCH_MODULES)})"
    )
    p.set_defaults(func=_bench)

    p = sub.add_parser(
        "check",
        help="self-check every fused kernel on this machine's devices against the torch "
        "reference (value, first and second derivatives); exit status 1 on any mismatch",
    )
    p.add_argument(
        "--device",
        action="append",
        type=_device,
        metavar="DEV",
        help="a device to check (repeatable; default: every GPU, or the CPU under TRITON_INTERPRET=1)",
    )
    p.add_argument("--op", action="append", choices=verify_ops(), help="only this op (repeatable; default: all)")
    p.add_argument(
        "--record",
        action="store_true",
        help="write the passing (op, backend, GPU) entries into the "
        "record fastrob/verified.json, which lets backend='auto' use them without a self-check",
    )
    p.add_argument("--record-path", metavar="FILE", help="the record to write (default: the package's)")
    p.add_argument(
        "--tests-passed",
        metavar="JUNIT_XML",
        help="a pytest --junitxml report whose passing tests of each op are added to its entries' evidence",
    )
    p.set_defaults(func=_check)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"fastrob: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand. A user error (bad data or settings found after parsing: ValueError,
    TypeError) or an I/O failure (OSError: disk full, permission denied) is one line on stderr,
    exit status 2 and 1; any other exception is a bug and keeps its traceback. --debug or
    FASTROB_DEBUG=1 shows the traceback of every error."""
    import os
    import warnings

    from fastrob._optional import MissingDependency

    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("FASTROB_DEBUG", "") not in ("", "0")
    if getattr(args, "out", None) is not None:
        from fastrob._rundir import check_out_dir

        try:
            check_out_dir(args.out)  # before any compute: a run must never be lost at its end
        except ValueError as err:
            parser.exit(2, f"fastrob: error: {err}\n")
    try:
        with warnings.catch_warnings():
            if not debug:  # a warning (e.g. what --resume ignored) is one line too
                warnings.showwarning = _one_line_warning
            return args.func(args)
    except MissingDependency as err:
        if debug:
            raise
        parser.exit(1, f"fastrob: error: {err}\n")
    except (ValueError, TypeError) as err:
        if debug:
            raise
        # bad data or settings found after parsing: one line, as argparse reports its own errors
        parser.exit(2, f"fastrob: error: {err}\n")
    except OSError as err:
        if debug:
            raise
        parser.exit(
            1, f"fastrob: error: {err.strerror or err}{f': {err.filename}' if getattr(err, 'filename', None) else ''}\n"
        )
    except KeyboardInterrupt:
        if debug:
            raise
        parser.exit(130, "fastrob: interrupted\n")


if __name__ == "__main__":
    sys.exit(main())
