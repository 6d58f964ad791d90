"""Benchmark of the differentiable fused ops against the eager torch composite a user would write.

    python -m bench.ops            # GPU: CE 4096x1000 and 512x10; bias_act, sqnorm, batch_norm at
                                   # 128x64x32x32 and 128x256x8x8
    python -m bench.ops --quick    # small shapes (CPU: the torch providers only)

Also: the activations of modern models (gelu_tanh, silu, sigmoid, hardswish) at 128x64x32x32, and
layer norm over the last dimension at 128x197x768 (ViT-B) and over the channels at 64x96x56x56
(ConvNeXt's first stage), each against its eager composite.

For each op three passes are timed: forward; forward + backward (first derivative); and
forward + backward with create_graph + the backward of a squared-norm of that gradient (the
double backward, as an input-gradient penalty runs it). Providers: ``eager`` (the plain torch
composite: F.cross_entropy, x + b then the activation, g.pow(2).sum, F.batch_norm in training
mode, whose double backward is torch's composite of many kernels), and on a GPU ``triton``
and ``cuda``. GB/s counts the bytes of the op's inputs and outputs of the forward pass only (a
lower bound for the other passes) against the copy bandwidth measured in the same run. Rows go
to bench/results/<device>.csv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import copy_bandwidth_gbps, parse_device_args, row, save_results, time_ms
from fastrob import _backend
from fastrob.ops import batch_norm, bias_act, cross_entropy, layer_norm, sqnorm
from fastrob.ops.layer_norm import SPEC as layer_norm_spec


def cases(device, quick):
    """(op name, shape, make inputs, {provider: fn(*inputs)}, forward bytes)."""
    ce_shapes = [(256, 10), (256, 1000)] if quick else [(4096, 1000), (512, 10)]
    act_shapes = [(8, 16, 16, 16)] if quick else [(128, 64, 32, 32), (128, 256, 8, 8)]
    fused = [b for b in ("triton", "cuda") if device.type == "cuda" and _backend.status(b).available]
    out = []
    for shape in ce_shapes:

        def make(shape=shape):
            z = torch.randn(shape, device=device, requires_grad=True)
            return z, torch.randint(0, shape[1], (shape[0],), device=device)

        fns = {"eager": lambda z, y: F.cross_entropy(z, y)}
        fns.update({b: (lambda z, y, b=b: cross_entropy(z, y, backend=b)) for b in fused})
        out.append(("cross_entropy", shape, make, fns, 4 * shape[0] * shape[1]))
    for shape in act_shapes:

        def make(shape=shape):
            return (
                torch.randn(shape, device=device, requires_grad=True),
                torch.randn(shape[1], device=device, requires_grad=True),
            )

        fns = {"eager": lambda x, b: F.softplus(x + b.view(1, -1, 1, 1))}
        fns.update({k: (lambda x, b, k=k: bias_act(x, b, "softplus", backend=k)) for k in fused})
        out.append(("bias_act_softplus", shape, make, fns, 2 * 4 * torch.Size(shape).numel()))
        fns = {"eager": lambda x, b: x.pow(2).sum((1, 2, 3))}
        fns.update({k: (lambda x, b, k=k: sqnorm(x, backend=k)) for k in fused})
        out.append(("sqnorm", shape, make, fns, 4 * torch.Size(shape).numel()))

        def make_bn(shape=shape):
            return (
                torch.randn(shape, device=device, requires_grad=True),
                torch.randn(shape[1], device=device, requires_grad=True),
                torch.randn(shape[1], device=device, requires_grad=True),
            )

        fns = {"eager": lambda x, w, b: F.batch_norm(x, None, None, w, b, True)}
        fns.update({k: (lambda x, w, b, k=k: batch_norm(x, w, b, None, None, True, backend=k)) for k in fused})
        out.append(("batch_norm", shape, make_bn, fns, 2 * 4 * torch.Size(shape).numel()))
    out += modern_cases(device, quick, fused)
    return out


def modern_cases(device, quick, fused):
    """The activations of modern models (bias_act without bias, against the torch activation) and
    layer norm (last dimension against F.layer_norm at a ViT-B shape, channels first against
    timm's LayerNorm2d composite at a ConvNeXt stage-1 shape). Providers: eager, fastrob's torch
    backend (what ``auto`` runs on a CPU) and the fused backends with kernels of the op."""
    act_shape = (8, 16, 16, 16) if quick else (128, 64, 32, 32)
    eager_acts = {
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "silu": F.silu,
        "sigmoid": torch.sigmoid,
        "hardswish": F.hardswish,
    }
    out = []

    def make_x(shape=act_shape):
        return (torch.randn(shape, device=device, requires_grad=True),)

    for act, eager in eager_acts.items():
        fns = {"eager": eager}
        fns.update({k: (lambda x, k=k, act=act: bias_act(x, None, act, backend=k)) for k in ("torch", *fused)})
        out.append((f"bias_act_{act}", act_shape, make_x, fns, 2 * 4 * torch.Size(act_shape).numel()))
    ln_fused = [k for k in fused if k in layer_norm_spec.fused_backends]
    for name, shape, channels_first in (
        ("layer_norm", (4, 197, 768) if quick else (128, 197, 768), False),
        ("layer_norm2d", (4, 96, 28, 28) if quick else (64, 96, 56, 56), True),
    ):
        c = shape[1] if channels_first else shape[-1]

        def make_ln(shape=shape, c=c):
            return (
                torch.randn(shape, device=device, requires_grad=True),
                torch.randn(c, device=device, requires_grad=True),
                torch.randn(c, device=device, requires_grad=True),
            )

        if channels_first:
            fns = {"eager": lambda x, w, b: F.layer_norm(x.permute(0, 2, 3, 1), w.shape, w, b).permute(0, 3, 1, 2)}
        else:
            fns = {"eager": lambda x, w, b: F.layer_norm(x, w.shape, w, b)}
        fns.update(
            {
                k: (lambda x, w, b, k=k, cf=channels_first: layer_norm(x, w, b, channels_first=cf, backend=k))
                for k in ("torch", *ln_fused)
            }
        )
        out.append((name, shape, make_ln, fns, 2 * 4 * torch.Size(shape).numel()))
    return out


def passes(fn, inputs):
    """The three timed passes of fn on inputs (inputs[0] requires grad)."""
    x = inputs[0]

    def forward():
        with torch.no_grad():
            fn(*inputs)

    def backward():
        torch.autograd.grad(fn(*inputs).sum(), x)

    def double_backward():
        (g,) = torch.autograd.grad(fn(*inputs).sum(), x, create_graph=True)
        torch.autograd.grad(g.pow(2).sum(), x)

    return {"forward": forward, "backward": backward, "double_backward": double_backward}


def main(argv=None) -> None:
    args, device = parse_device_args(__doc__, argv)
    copy_gbps = copy_bandwidth_gbps(device)
    rows = [
        row(
            "copy",
            "torch",
            "1GiB" if device.type == "cuda" else "256MiB",
            torch.float32,
            "gbps",
            {"median": copy_gbps, "p20": copy_gbps, "p80": copy_gbps},
            device,
        )
    ]
    print(f"device: {rows[0]['device']}; copy bandwidth {copy_gbps:.0f} GB/s")
    print(f"{'op':<19}{'shape':<16}{'pass':<16}{'provider':<9}{'ms':>9}{'fwd GB/s':>10}{'vs eager':>9}")
    for op, shape, make, fns, moved in cases(device, args.quick):
        inputs = make()
        eager = {}
        for provider, fn in fns.items():
            for name, run in passes(fn, inputs).items():
                stats = time_ms(run, device, reps=10 if args.quick else 20)
                eager.setdefault(name, stats["median"])
                rows.append(row(f"{op}_{name}", provider, shape, torch.float32, "time_ms", stats, device))
                gbps = moved / (stats["median"] * 1e-3) / 1e9 if name == "forward" else float("nan")
                if name == "forward":
                    rows.append(
                        row(
                            f"{op}_{name}",
                            provider,
                            shape,
                            torch.float32,
                            "gbps",
                            {
                                "median": gbps,
                                "p20": moved / (stats["p80"] * 1e-3) / 1e9,
                                "p80": moved / (stats["p20"] * 1e-3) / 1e9,
                            },
                            device,
                        )
                    )
                print(
                    f"{op:<19}{'x'.join(map(str, shape)):<16}{name:<16}{provider:<9}{stats['median']:>9.3f}"
                    f"{gbps:>10.1f}{eager[name] / stats['median']:>8.2f}x"
                )
    save_results(rows, device, quick=args.quick)


if __name__ == "__main__":
    main()
