"""``fastrob train``: its arguments, whose defaults are ``TrainConfig``'s, and the command."""

from __future__ import annotations

import json
import os

from fastrob import distributed as dist_utils
from fastrob import methods, trainer
from fastrob.attacks import ALPHA_FACTOR, NORMS
from fastrob.cli.args import _common, _float, _positive_int, _size, _warmup
from fastrob.models import ACTIVATIONS, MODELS
from fastrob.regularizers.jsigr import SALIENCY_ESTIMATES
from fastrob.trainer import CHECKPOINT, CURVE, METRICS, TrainConfig


def add_parser(sub) -> None:
    attack_methods = ", ".join(m.name for m in methods.REGISTRY.values() if m.attack)
    d = TrainConfig  # the defaults: the config's own
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
        default=d.data,
        help="digits, an .npz file (x NCHW in [0,1], y int) or a folder of class subfolders of PNGs "
        "(default %(default)s)",
    )
    p.add_argument("--size", type=_size, default=d.size, help="resize images to SIZE x SIZE (digits: 8, 16 or 32)")
    p.add_argument("--model", choices=MODELS, default=d.model, help="architecture (default %(default)s)")
    p.add_argument("--activation", choices=ACTIVATIONS, default=d.activation, help="activation (default %(default)s)")
    p.add_argument("--method", choices=methods.NAMES, default=d.method, help=methods.cli_help())
    p.add_argument(
        "--eps", type=_float(), default=d.eps, help=f"attack radius of {attack_methods} (default %(default)s)"
    )
    p.add_argument(
        "--alpha", type=_float(), default=d.alpha, help=f"attack step (default {ALPHA_FACTOR:g}*eps/attack-steps)"
    )
    p.add_argument(
        "--attack-steps", type=_positive_int, default=d.attack_steps, help="attack steps (default %(default)s)"
    )
    p.add_argument("--norm", choices=NORMS, default=d.norm, help="attack norm (default %(default)s)")
    p.add_argument("--beta", type=_float(), default=d.beta, help="TRADES beta (default %(default)s)")
    p.add_argument(
        "--lam", type=_float(), default=d.lam, help="regularizer weight (default: the method's; lipschitz: a fixed psi)"
    )
    p.add_argument(
        "--lam-saliency", type=_float(), default=d.lam_saliency, help="J-SIGR saliency weight (default %(default)s)"
    )
    p.add_argument(
        "--patch", type=_positive_int, default=d.patch, help="J-SIGR saliency patch size (default %(default)s)"
    )
    p.add_argument(
        "--saliency-estimate",
        choices=SALIENCY_ESTIMATES,
        default=d.saliency_estimate,
        help="J-SIGR saliency: the occlusion forwards, or their first-order estimate (default %(default)s)",
    )
    p.add_argument(
        "--warmup",
        type=_warmup,
        default=d.warmup,
        help="int* methods: START,FULL in epochs: eps 0 before START, a linear ramp to --eps at FULL "
        "(Boopathy et al.; default: full eps from the start)",
    )
    p.add_argument("--epochs", type=_positive_int, default=d.epochs, help="total epochs (default %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="batch size (default %(default)s)")
    p.add_argument("--lr", type=_float(strict=True), default=d.lr, help="Adam learning rate (default %(default)s)")
    p.add_argument(
        "--test-fraction", type=_float(strict=True), default=d.test_fraction, help="test split (default %(default)s)"
    )
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt up to --epochs")
    p.add_argument("--overwrite", action="store_true", help="start again even if --out holds a checkpoint")
    _common(p, "runs/train", seed=d.seed)
    p.set_defaults(func=_train)


def _train(args) -> int:
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
        saliency_estimate=args.saliency_estimate,
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
        _, history, dataset = trainer.train(config, args.out, device=device, resume=args.resume, quiet=args.quiet)
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
