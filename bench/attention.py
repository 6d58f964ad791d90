"""Twice-differentiable attention against torch's math attention, and a ViT's exact input-gradient
step against its plain step.

    python -m bench.attention [--quick] [--device cpu|cuda] [--rows all|op|model]

Op rows (``attention_{forward,backward,double_backward}``), float32, [B, H, N, 64] with
N in {65, 197, 257} (B x H = 8 x 3 on CPU, 32 x 12 on a GPU): the forward; the gradients of q, k, v;
and the double backward an input-gradient penalty runs (gradients with create_graph, then the
gradient of their squared norm). Providers: ``torch_math`` (F.scaled_dot_product_attention under
sdpa_kernel(SDPBackend.MATH), the only torch attention whose backward can be differentiated) and
``fastrob``: on a GPU the Triton kernels (backend="triton"); on CPU ``fastrob.ops.attention``'s
auto choice, the reference formula (the Triton kernels on CPU run only in the interpreter, whose
timings mean nothing). Metrics: time_ms and peak memory (peak_cuda_mib, or on CPU the rise of the
process's resident memory, peak_rss_rise_mib; measured before any timing, with glibc returning
every allocation of 64 KiB or more on free, a setting the timings run without).

Model rows (``vit_tiny_step``): a training step (zero_grad, objective, backward, SGD step) of a
ViT-Tiny-shaped fastrob.models.ViT (dim 192, depth 12, 3 heads) at 32x32 with 4x4 patches
(65 tokens) and at 224x224 with 16x16 patches (197 tokens): ``plain`` (cross-entropy),
``input_grad_exact`` (fastrob's InputGradientRegularizer, attention routed) and
``input_grad_math_eager`` (the double backprop a user writes under sdpa_kernel(MATH)); timed
round-robin (median over rounds), with ``ratio_vs_plain`` rows. Rows are appended to
bench/results/<device>.csv.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import peak_memory, row, save_results, time_ms
from bench.regularizers import set_mmap_threshold
from fastrob.models import ViT
from fastrob.ops import attention
from fastrob.regularizers import InputGradientRegularizer

LAM = 0.1


def math_attention(q, k, v):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v)


def passes(fn, q, k, v):
    def forward():
        with torch.no_grad():
            fn(q, k, v)

    def backward():
        torch.autograd.grad(fn(q, k, v).sum(), (q, k, v))

    def double_backward():
        first = torch.autograd.grad(fn(q, k, v).square().sum(), (q, k, v), create_graph=True)
        torch.autograd.grad(sum(g.square().sum() for g in first), (q, k, v))

    return {"forward": forward, "backward": backward, "double_backward": double_backward}


def op_cases(device, quick) -> list:
    """[(pass, provider, shape, run)] for every attention pass to measure."""
    batch, heads = (8, 3) if device.type == "cpu" else (32, 12)
    lengths = (65,) if quick else (65, 197, 257)
    backend = "triton" if device.type == "cuda" else "auto"
    providers = {"torch_math": math_attention, "fastrob": lambda q, k, v: attention(q, k, v, backend=backend)}
    cases = []
    for n in lengths:
        shape = (batch, heads, n, 64)
        q, k, v = (torch.randn(shape, device=device, requires_grad=True) for _ in range(3))
        for provider, fn in providers.items():
            cases += [(name, provider, shape, run) for name, run in passes(fn, q, k, v).items()]
    return cases


def op_rows(cases, memory, device, quick) -> list:
    rows = []
    print(f"{'pass':<17}{'shape':<16}{'provider':<12}{'ms':>9}{'peak MiB':>10}")
    for name, provider, shape, run in cases:
        stats = time_ms(run, device, reps=3 if quick else 10)
        metric, mib = memory[name, provider, shape]
        rows.append(row(f"attention_{name}", provider, shape, torch.float32, "time_ms", stats, device))
        rows.append(row(f"attention_{name}", provider, shape, torch.float32, metric, _flat(mib), device))
        print(f"{name:<17}{'x'.join(map(str, shape)):<16}{provider:<12}{stats['median']:>9.2f}{mib:>10.1f}")
    return rows


def _flat(value: float) -> dict:
    return {"median": value, "p20": value, "p80": value}


def plain(model, x, y):
    return F.cross_entropy(model(x), y)


def input_grad_math_eager(model, x, y):
    with sdpa_kernel(SDPBackend.MATH):
        x = x.clone().requires_grad_(True)
        ce = F.cross_entropy(model(x), y, reduction="none")
        (g,) = torch.autograd.grad(ce.sum(), x, create_graph=True)
        return ce.mean() + LAM * g.square().sum((1, 2, 3)).mean()


def model_cases(device, quick) -> list:
    """[(label, shape, {objective name: step})]: one ViT-Tiny per input size, one training step per
    objective."""
    configs = {"32px_65tokens": (32, 4, 16), "224px_197tokens": (224, 16, 4)}
    if quick:
        configs = {"32px_65tokens": (32, 4, 4)}
    reg = InputGradientRegularizer(LAM)
    objectives = {
        "plain": plain,
        "input_grad_exact": lambda m, x, y: reg(m, x, y).loss,
        "input_grad_math_eager": input_grad_math_eager,
    }
    cases = []
    for label, (size, patch, batch) in configs.items():
        torch.manual_seed(0)
        model = ViT(size, patch, 3, 10, dim=192, depth=12, heads=3).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        x = torch.rand(batch, 3, size, size, device=device)
        y = torch.randint(0, 10, (batch,), device=device)

        def step(objective, model=model, opt=opt, x=x, y=y):
            opt.zero_grad(set_to_none=True)
            objective(model, x, y).backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        steps = {
            name: (lambda objective=objective, step=step: step(objective)) for name, objective in objectives.items()
        }
        cases.append((label, (batch, 3, size, size), steps))
    return cases


def model_rows(cases, memory, device, quick) -> list:
    rows = []
    for label, shape, steps in cases:
        times = {name: [] for name in steps}
        rounds = 3 if quick else 5
        for r in range(rounds + 1):  # round-robin; the first round warms up
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                if r:
                    times[name].append((time.perf_counter() - start) * 1e3)
        plain_ms = statistics.median(times["plain"])
        for name, t in times.items():
            stats = {"median": statistics.median(t), "p20": min(t), "p80": max(t)}
            metric, mib = memory[label, name]
            rows.append(row(f"vit_tiny_step_{label}", name, shape, torch.float32, "time_ms", stats, device))
            rows.append(row(f"vit_tiny_step_{label}", name, shape, torch.float32, metric, _flat(mib), device))
            ratio = stats["median"] / plain_ms
            rows.append(
                row(f"vit_tiny_step_{label}", name, shape, torch.float32, "ratio_vs_plain", _flat(ratio), device)
            )
            print(f"vit_tiny {label:<16} {name:<22} {stats['median']:>9.1f} ms {ratio:>6.2f}x plain {mib:>8.1f} MiB")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N = 65 and one small ViT batch only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", choices=("all", "op", "model"), default="all", help="which rows to measure")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"device {device}, {torch.get_num_threads()} threads")
    if device.type == "cpu":
        # memory first, with every allocation of 64 KiB or more given back on free (resident memory
        # follows the live tensors); then the timings with glibc's usual behaviour, which that
        # setting would slow down, the double backward more than the plain step (bench.regularizers)
        set_mmap_threshold(64 * 1024)
    ops = op_cases(device, args.quick) if args.rows in ("all", "op") else []
    models = model_cases(device, args.quick) if args.rows in ("all", "model") else []
    memory = {}
    for name, provider, shape, run in ops:
        run()  # warm-up, as for the steps below
        memory[name, provider, shape] = peak_memory(run, device)
    for label, _, steps in models:
        for name, step in steps.items():
            step()  # warm-up: lazily allocated state (optimizer, oneDNN) is not the step's
            memory[label, name] = peak_memory(step, device)
    if device.type == "cpu":
        set_mmap_threshold(32 * 2**20)
    rows = op_rows(ops, memory, device, args.quick) + model_rows(models, memory, device, args.quick)
    save_results(rows, device, quick=args.quick)


if __name__ == "__main__":
    main()
