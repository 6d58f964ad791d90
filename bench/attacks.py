"""PGD throughput: fastrob versus torchattacks in the same process, same model, same inputs.

    python -m bench.attacks [--quick]

Rows (bench/results/<device>.csv), metric images_per_s unless stated:
  pgd10            torchattacks.PGD vs fastrob.PGD (float32; on CUDA also bf16 and bf16 + CUDA graph)
  pgd10_restarts4  four restarts: one batch of 4B (restart_mode="batch"), the default (restart_mode
                   "auto": a loop on CPU, the batch on CUDA) and four separate pgd calls
  pgd10_weak       robust_only compaction vs the full attack on a weak model (and its robust_acc)
  peak memory      of one pgd10 call (bench.common.peak_memory); on CPU each provider in a fresh
                   process (``memory_in_fresh_process``), where the resident memory follows the live
                   tensors: in the timing process the allocator's cached memory made the rise depend
                   on which provider ran first (80 MiB vs 16 MiB for the same two calls)
  robust_acc       robust accuracy of both libraries on the digits CNN (equal strength check)

On CPU the providers of a row are timed interleaved (round after round, each provider once per
round in turn), so that the load of a shared machine falls on all of them alike; the medians and
20/80% quantiles are over the rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastrob.attacks as fa
from bench.common import peak_memory, row, save_results, time_ms
from fastrob.data import load_digits


def small_cnn(channels, side, width=32):
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * (side // 4) ** 2, 10),
    )


def train(model, x, y, epochs, device):
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(y), device=device)
        for i in range(0, len(perm), 128):
            b = perm[i : i + 128]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def throughput(stats, batch):
    """ms per call -> images per second (p20 of the time is p80 of the rate)."""
    return {
        "median": batch * 1e3 / stats["median"],
        "p20": batch * 1e3 / stats["p80"],
        "p80": batch * 1e3 / stats["p20"],
    }


def interleaved_ms(fns: dict, device, reps: int) -> dict:
    """{provider: time_ms-style stats}: on CPU ``reps`` rounds, each running every provider once
    (after one warm-up call each); on CUDA each provider's ``time_ms`` (triton's do_bench)."""
    if torch.device(device).type == "cuda":
        return {name: time_ms(fn, device, warmup=1, reps=reps) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for r in range(reps):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))  # neither provider always runs first
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    out = {}
    for name, t in times.items():
        q = statistics.quantiles(t, n=10) if len(t) > 1 else t * 9
        out[name] = {"median": statistics.median(t), "p20": q[1], "p80": q[7]}
    return out


def pgd10(provider: str, model, eps: float, alpha: float):
    """The PGD-10 attack of ``provider``: "torchattacks", "fastrob", "fastrob-bf16", "fastrob-bf16-graph"."""
    if provider == "torchattacks":
        import torchattacks

        return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=10)
    extras = {"fastrob": {}, "fastrob-bf16": {"amp": "bf16"}, "fastrob-bf16-graph": {"amp": "bf16", "cuda_graph": True}}
    return fa.PGD(model, eps=eps, alpha=alpha, steps=10, **extras[provider])


def memory_in_fresh_process(provider: str, channels: int, side: int, batch: int, eps: float, alpha: float) -> float:
    """The RSS rise (MiB) of the second PGD-10 call of ``provider`` on an untrained small_cnn (the
    weights do not change the memory) in a new interpreter whose glibc returns every allocation of
    64 KiB or more on free (bench.regularizers.set_mmap_threshold), so that RSS follows the tensors."""
    args = json.dumps([provider, channels, side, batch, eps, alpha])
    out = subprocess.run(
        [sys.executable, "-m", "bench.attacks", "--memory-of", args], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def _memory_of(spec: str) -> None:
    from bench.common import peak_rss_rise_mib
    from bench.regularizers import set_mmap_threshold

    set_mmap_threshold(64 * 1024)
    provider, channels, side, batch, eps, alpha = json.loads(spec)
    torch.manual_seed(0)
    model = small_cnn(channels, side).eval()
    x, y = torch.rand(batch, channels, side, side), torch.randint(0, 10, (batch,))
    attack = pgd10(provider, model, eps, alpha)
    attack(x, y)  # first call: one-time allocations (kernels' workspaces, caches)
    print(peak_rss_rise_mib(lambda: attack(x, y)))


def robust_acc(model, x_adv, y):
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller batches and fewer repetitions")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # the child of memory_in_fresh_process
    args = parser.parse_args(argv)
    if args.memory_of:
        return _memory_of(args.memory_of)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reps = 3 if args.quick else 7
    rows = []
    torch.manual_seed(0)
    digits = load_digits()
    xd, yd = digits.x_train.to(device), digits.y_train.to(device)
    digits_net = train(small_cnn(1, 8).to(device), xd, yd, 3 if args.quick else 10, device)

    cifar_batch = 64 if args.quick else (512 if device.type == "cuda" else 128)
    cases = [
        (
            "digits-cnn",
            digits_net,
            digits.x_test.to(device)[: 256 if args.quick else 448],
            digits.y_test.to(device),
            0.1,
            0.025,
        ),
        (
            "cifar-shaped-cnn",
            small_cnn(3, 32).to(device).eval(),
            torch.rand(cifar_batch, 3, 32, 32, device=device),
            torch.randint(0, 10, (cifar_batch,), device=device),
            8 / 255,
            2 / 255,
        ),
    ]
    for name, model, x, y, eps, alpha in cases:
        y = y[: len(x)]
        shape = (name,) + tuple(x.shape)
        names = ["torchattacks", "fastrob"] + (["fastrob-bf16", "fastrob-bf16-graph"] if device.type == "cuda" else [])
        providers = {name: pgd10(name, model, eps, alpha) for name in names}
        timings = interleaved_ms({p: (lambda a=a: a(x, y)) for p, a in providers.items()}, device, reps)
        for provider, attack in providers.items():
            stats = timings[provider]
            if device.type == "cpu":
                metric, mib = (
                    "peak_rss_rise_mib",
                    memory_in_fresh_process(provider, x.shape[1], x.shape[2], x.shape[0], eps, alpha),
                )
            else:
                metric, mib = peak_memory(lambda: attack(x, y), device)
            rows.append(row("pgd10", provider, shape, x.dtype, metric, {"median": mib, "p20": mib, "p80": mib}, device))
            rows.append(row("pgd10", provider, shape, x.dtype, "images_per_s", throughput(stats, len(x)), device))
            if name == "digits-cnn":
                torch.manual_seed(1)
                acc = robust_acc(model, attack(x, y), y)
                rows.append(
                    row(
                        "robust_acc",
                        provider,
                        shape,
                        x.dtype,
                        "robust_acc",
                        {"median": acc, "p20": acc, "p80": acc},
                        device,
                    )
                )
            print(f"pgd10 {name:18s} {provider:20s} {rows[-1 if name != 'digits-cnn' else -2]['median']:>10s} images/s")

        batched = fa.PGD(model, eps=eps, alpha=alpha, steps=10, restarts=4)
        default = fa.PGD(model, eps=eps, alpha=alpha, steps=10, restarts=4)
        single = fa.PGD(model, eps=eps, alpha=alpha, steps=10)

        def loop():
            for _ in range(4):
                single(x, y)

        fns = {
            "fastrob-batched": lambda: batched(x, y, restart_mode="batch"),
            "fastrob-default": lambda: default(x, y),
            "fastrob-loop": loop,
        }
        timings = interleaved_ms(fns, device, reps)
        for provider in fns:
            rows.append(
                row(
                    "pgd10_restarts4",
                    provider,
                    shape,
                    x.dtype,
                    "images_per_s",
                    throughput(timings[provider], len(x)),
                    device,
                )
            )
            print(f"restarts4 {name:18s} {provider:20s} {rows[-1]['median']:>10s} images/s")

    # A weak model: one epoch on the digits, so most test points fall within a few steps.
    torch.manual_seed(0)
    weak = train(small_cnn(1, 8).to(device), xd, yd, 1, device)
    x, y = digits.x_test.to(device), digits.y_test.to(device)
    shape = ("digits-weak-cnn",) + tuple(x.shape)
    for provider, kw in (("fastrob-full", {}), ("fastrob-robust_only", {"robust_only": True})):
        attack = fa.PGD(weak, eps=0.1, alpha=0.025, steps=10, restarts=4, **kw)
        stats = time_ms(lambda: attack(x, y), device, warmup=1, reps=reps)
        rows.append(row("pgd10_weak", provider, shape, x.dtype, "images_per_s", throughput(stats, len(x)), device))
        torch.manual_seed(1)
        acc = robust_acc(weak, attack(x, y), y)
        rows.append(
            row("pgd10_weak", provider, shape, x.dtype, "robust_acc", {"median": acc, "p20": acc, "p80": acc}, device)
        )
        print(f"weak model, 4 restarts {provider:20s} {rows[-2]['median']:>10s} images/s, robust acc {acc:.3f}")
    save_results(rows, device, quick=args.quick)


if __name__ == "__main__":
    main()
