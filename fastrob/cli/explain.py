"""``fastrob explain``: maps, surfaces and adversarial explanations of chosen test samples."""

from __future__ import annotations

import os
import re

import torch

from fastrob import plots
from fastrob._atomic import write_json
from fastrob.cli.args import _checkpoint_args, _common, _float, _int_list, _positive_int
from fastrob.cli.evaluate import _load_models


def add_parser(sub) -> None:
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


def _explain(args) -> int:
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
