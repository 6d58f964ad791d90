"""Benchmark of the fused PGD step against the unfused eager sequence a user would write.

    python -m bench.pgd_step            # GPU: 256x3x224x224 and 512x3x32x32, float32 and bfloat16
    python -m bench.pgd_step --quick    # small shapes (CPU)

Providers: ``eager`` (torchattacks' update sequence, in the input dtype), ``torch`` (fastrob's
reference), and on a GPU ``triton`` and ``cuda``. The step moves 4 tensors (reads x_adv, grad,
x_orig, writes the result); achieved GB/s counts those bytes and is compared with the device's
copy bandwidth measured in the same run (a copy counts its read and its write). Rows go to
bench/results/<device>.csv, with the peak memory of one step (bench.common.peak_memory).
"""

from __future__ import annotations

import torch

from bench.common import copy_bandwidth_gbps, parse_device_args, peak_memory, row, save_results, time_ms
from fastrob import _backend
from fastrob.ops.pgd_step import pgd_step, pgd_step_unchecked


def eager_step(x_adv, grad, x_orig, alpha, eps, norm):
    """What torchattacks' PGD / PGDL2 run per step, op by op."""
    if norm == "linf":
        adv = x_adv + alpha * grad.sign()
        delta = torch.clamp(adv - x_orig, min=-eps, max=eps)
        return torch.clamp(x_orig + delta, min=0, max=1)
    b = x_adv.shape[0]
    grad_norms = torch.norm(grad.view(b, -1), p=2, dim=1) + 1e-10
    adv = x_adv + alpha * grad / grad_norms.view(b, 1, 1, 1)
    delta = adv - x_orig
    factor = torch.clamp(eps / torch.norm(delta.view(b, -1), p=2, dim=1), max=1.0)
    return torch.clamp(x_orig + delta * factor.view(-1, 1, 1, 1), min=0, max=1)


def main(argv=None) -> None:
    args, device = parse_device_args(__doc__, argv)
    shapes = [(64, 3, 32, 32)] if args.quick else [(256, 3, 224, 224), (512, 3, 32, 32)]
    dtypes = [torch.float32] if device.type == "cpu" else [torch.float32, torch.bfloat16]
    providers = ["eager", "torch"] + [
        b for b in ("triton", "cuda") if device.type == "cuda" and _backend.status(b).available
    ]
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
    print(f"{'norm':<5}{'shape':<16}{'dtype':<10}{'provider':<8}{'ms':>9}{'GB/s':>9}{'% copy':>8}{'vs eager':>9}")
    for shape in shapes:
        for dtype in dtypes:
            gen = torch.Generator(device=device).manual_seed(0)
            x_orig = torch.rand(shape, device=device, generator=gen).to(dtype)
            x_adv = (x_orig + 0.01 * torch.randn(shape, device=device, generator=gen).to(dtype)).clamp(0, 1)
            grad = torch.randn(shape, device=device, generator=gen).to(dtype)
            moved = 4 * x_adv.numel() * x_adv.element_size()
            for norm, eps, alpha in (("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.1)):
                # check once (as the attacks do), then time the steps alone
                pgd_step(x_adv, grad, x_orig, alpha=alpha, eps=eps, norm=norm)
                fns = {"eager": lambda: eager_step(x_adv, grad, x_orig, alpha, eps, norm)}
                for p in providers[1:]:
                    fns[p] = lambda p=p: pgd_step_unchecked(
                        x_adv, grad, x_orig, alpha=alpha, eps=eps, norm=norm, lower=0.0, upper=1.0, backend=p
                    )
                eager_ms = None
                for provider, fn in fns.items():
                    stats = time_ms(fn, device)
                    gbps = moved / (stats["median"] * 1e-3) / 1e9
                    eager_ms = eager_ms or stats["median"]
                    op = f"pgd_step_{norm}"
                    rows.append(row(op, provider, shape, dtype, "time_ms", stats, device))
                    # the 20th percentile of bandwidth comes from the 80th of time, and vice versa
                    rows.append(
                        row(
                            op,
                            provider,
                            shape,
                            dtype,
                            "gbps",
                            {
                                "median": gbps,
                                "p20": moved / (stats["p80"] * 1e-3) / 1e9,
                                "p80": moved / (stats["p20"] * 1e-3) / 1e9,
                            },
                            device,
                        )
                    )
                    metric, mib = peak_memory(fn, device)
                    rows.append(
                        row(op, provider, shape, dtype, metric, {"median": mib, "p20": mib, "p80": mib}, device)
                    )
                    print(
                        f"{norm:<5}{'x'.join(map(str, shape)):<16}{str(dtype)[6:]:<10}{provider:<8}"
                        f"{stats['median']:>9.3f}{gbps:>9.0f}{gbps / copy_gbps:>8.0%}"
                        f"{eager_ms / stats['median']:>8.2f}x"
                    )
    save_results(rows, device, quick=args.quick)


if __name__ == "__main__":
    main()
