"""Regularized training steps against a plain step and against the reference a user would write.

    python -m bench.regularizers [--quick]

CPU, a small conv net with BatchNorm and softplus, CIFAR-shaped batches (128x3x32x32; --quick:
32x3x16x16), float32. Each provider is a whole training step (zero_grad, objective, backward,
SGD step). References: eager double backprop for the input gradient; Hoffman et al.'s
jacobian_regularizer loop (one autograd.grad per projection) for the Jacobian, plus the two
other batchings one could write (is_grads_batched, and an input-space finite-difference
estimator). The paper methods (3-step PGD at eps 8/255): Int2 with 1-class saliency maps against
the eager version a user writes, Lipschitz (fixed psi) against Woods et al.'s eager double
backprop, SNS against eager PGD adversarial training. Providers are timed round-robin (median
over rounds), so that load on a shared machine hits them alike. Peak memory is the rise of the
process's resident memory over one step (sampled by a thread). Rows are appended
to bench/results/<device>.csv (metrics ms, peak_rss_rise_mib, ratio_vs_plain, speedup_vs_reference).

End to end (``resnet18_*`` rows, on the GPU when there is one): the exact input-gradient training
step of PreAct-ResNet-18 with BatchNorm and softplus (fastrob.models, whose BatchNorm2d and
activations are the fused ops on a GPU), 128x3x32x32, against a plain step of the same model and
against eager double backprop through torch's ops (the same model on backend="torch"). On CPU
the batch is 16x3x32x32 (--quick: 4x3x16x16).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench import any_model
from bench.common import peak_rss_rise_mib, row, save_results, time_ms
from fastrob.models import PreActResNet18
from fastrob.regularizers import (
    InputGradientRegularizer,
    InterpretationRegularizer,
    JacobianRegularizer,
    JSIGRRegularizer,
    LipschitzRegularizer,
    SNSRegularizer,
)

LAM = 0.1


def make_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.Softplus(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.BatchNorm2d(64),
        nn.Softplus(),
        nn.Conv2d(64, 128, 3, stride=2, padding=1),
        nn.BatchNorm2d(128),
        nn.Softplus(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def reference_input_gradient(model, x, y):
    """What a user writes: eager double backprop."""
    x = x.clone().requires_grad_(True)
    ce = F.cross_entropy(model(x), y)
    (g,) = torch.autograd.grad(ce * x.shape[0], x, create_graph=True)  # gradient of the summed CE
    return ce + LAM * g.pow(2).flatten(1).sum(1).mean()


def reference_jacobian_loop(n_proj):
    """facebookresearch/jacobian_regularizer: one autograd.grad per projection."""

    def loss(model, x, y):
        x = x.clone().requires_grad_(True)
        z = model(x)
        b, c = z.shape
        r = 0.0
        for _ in range(n_proj):
            v = torch.randn(b, c)
            v = v / v.norm(dim=1, keepdim=True)
            (g,) = torch.autograd.grad(z, x, v, retain_graph=True, create_graph=True)
            r = r + c * g.pow(2).sum() / (n_proj * b)
        return F.cross_entropy(z, y) + LAM * 0.5 * r

    return loss


def vmapped_jacobian(n_proj):
    """The "obvious" batching: all projections in one vmapped VJP (is_grads_batched)."""

    def loss(model, x, y):
        x = x.clone().requires_grad_(True)
        z = model(x)
        v = torch.randn(n_proj, *z.shape)
        v = v / v.norm(dim=-1, keepdim=True)
        (g,) = torch.autograd.grad(z, x, v, create_graph=True, is_grads_batched=True)
        return F.cross_entropy(z, y) + LAM * 0.5 * z.shape[1] * g.pow(2).sum() / (n_proj * z.shape[0])

    return loss


def input_space_fd_jacobian(n_proj, h=0.01):
    """The forward finite-difference estimator E_u ||(z(x + h u) - z(x)) / h||^2 ~ ||J||_F^2,
    u ~ N(0, I), the P perturbed batches in one forward. Timing only: biased O(h), and it lets
    the perturbed copies share BatchNorm statistics."""

    def loss(model, x, y):
        z = model(x)
        u = torch.randn(n_proj, *x.shape)
        z_h = model((x + h * u).flatten(0, 1)).view(n_proj, *z.shape)
        return F.cross_entropy(z, y) + LAM * 0.5 * ((z_h - z) / h).pow(2).sum() / (n_proj * z.shape[0])

    return loss


def plain(model, x, y):
    return F.cross_entropy(model(x), y)


# ---- the paper methods (docs/methods.md: Boopathy, Woods, Zhang-Liu et al.), short attacks for short CPU runs ----

SEED_EPS, SEED_STEPS, LAM_INT = 8 / 255, 3, 0.01


def eager_pgd(model, x, y):
    """The PGD a user writes: eval mode, uniform start, sign steps on the CE, clamp to the ball."""
    alpha = 2.5 * SEED_EPS / SEED_STEPS
    model.eval()
    x_adv = (x + torch.empty_like(x).uniform_(-SEED_EPS, SEED_EPS)).clamp(0, 1)
    for _ in range(SEED_STEPS):
        x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * g.sign(), x - SEED_EPS), x + SEED_EPS).clamp(0, 1)
    model.train()
    return x_adv


def reference_int2(model, x, y):
    """Int2 with 1-class saliency maps, as a user writes it: PGD on the CE, then
    CE(x) + lam * ||dz_y/dx(x*) - dz_y/dx(x)||_1 by double backprop through both forwards."""
    x_adv = eager_pgd(model, x, y)

    def saliency(inputs):
        inputs = inputs.clone().requires_grad_(True)
        z = model(inputs)
        (g,) = torch.autograd.grad(z.gather(1, y[:, None]).sum(), inputs, create_graph=True)
        return z, g

    z, g = saliency(x)
    _, g_adv = saliency(x_adv)
    return F.cross_entropy(z, y) + LAM_INT * (g_adv - g).abs().flatten(1).sum(1).mean()


def reference_lipschitz(model, x, y):
    """Woods et al.'s penalty as their code computes it: the input gradient of a random logit (the
    margin w.p. 0.2), psi * mean g^2, by eager double backprop (psi fixed at psi0 = 220)."""
    x = x.clone().requires_grad_(True)
    z = model(x)
    s = z.gather(1, torch.randint(0, z.shape[1], (z.shape[0], 1)))[:, 0]
    other = z.scatter(1, y[:, None], float("-inf")).amax(1)
    margin = torch.rand(z.shape[0]) < 0.2
    s = torch.where(margin, z.gather(1, y[:, None])[:, 0] - other, s)
    (g,) = torch.autograd.grad(s.sum(), x, create_graph=True)
    return F.cross_entropy(z, y) + 220.0 * g.pow(2).mean()


def pgd_at(model, x, y):
    return F.cross_entropy(model(eager_pgd(model, x, y)), y)


def fastrob_step(reg):
    return lambda model, x, y: reg(model, x, y).loss


PROVIDERS = {
    # name: (op, objective, baseline provider for "speedup_vs_reference")
    "plain": ("train_step", plain, None),
    "input_grad_reference_eager": ("input_gradient_exact", reference_input_gradient, None),
    "input_grad_exact": (
        "input_gradient_exact",
        fastrob_step(InputGradientRegularizer(LAM)),
        "input_grad_reference_eager",
    ),
    "input_grad_fd": (
        "input_gradient_fd",
        fastrob_step(InputGradientRegularizer(LAM, mode="fd")),
        "input_grad_reference_eager",
    ),
    "jacobian1_reference_loop": ("jacobian_nproj1", reference_jacobian_loop(1), None),
    "jacobian1": ("jacobian_nproj1", fastrob_step(JacobianRegularizer(LAM, n_proj=1)), "jacobian1_reference_loop"),
    "jacobian4_reference_loop": ("jacobian_nproj4", reference_jacobian_loop(4), None),
    "jacobian4_is_grads_batched": ("jacobian_nproj4", vmapped_jacobian(4), "jacobian4_reference_loop"),
    "jacobian4_input_space_fd": ("jacobian_nproj4", input_space_fd_jacobian(4), "jacobian4_reference_loop"),
    "jacobian4_graph": (
        "jacobian_nproj4",
        fastrob_step(JacobianRegularizer(LAM, n_proj=4, batching="graph")),
        "jacobian4_reference_loop",
    ),
    "jacobian4_replicate": (
        "jacobian_nproj4",
        fastrob_step(JacobianRegularizer(LAM, n_proj=4, batching="replicate")),
        "jacobian4_reference_loop",
    ),
    "jsigr": ("jsigr", fastrob_step(JSIGRRegularizer(0.01, LAM, patch=8)), "input_grad_reference_eager"),
    "int2_reference_eager": ("int2_saliency_1class", reference_int2, None),
    "int2": (
        "int2_saliency_1class",
        fastrob_step(
            InterpretationRegularizer(
                "int2", lam=LAM_INT, eps=SEED_EPS, steps=SEED_STEPS, map="saliency", discrepancy="1class"
            )
        ),
        "int2_reference_eager",
    ),
    "lipschitz_reference_eager": ("lipschitz", reference_lipschitz, None),
    "lipschitz": ("lipschitz", fastrob_step(LipschitzRegularizer(psi=220.0)), "lipschitz_reference_eager"),
    "pgd_at_eager": ("sns", pgd_at, None),
    "sns": ("sns", fastrob_step(SNSRegularizer(eps=SEED_EPS, steps=SEED_STEPS)), "pgd_at_eager"),
}


def setup(name, shape):
    torch.manual_seed(0)
    op, objective, _ = PROVIDERS[name]
    model = make_net().train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.rand(shape)
    y = torch.randint(0, 10, (shape[0],))

    def step():
        opt.zero_grad(set_to_none=True)
        objective(model, x, y).backward()
        opt.step()

    return step


def resnet_steps(device: torch.device, shape) -> dict:
    """name -> (one training step of PreAct-ResNet-18 with BN, baseline name or None)."""

    def step_of(objective, backend):
        torch.manual_seed(0)
        model = PreActResNet18(10, shape[1], activation_name="softplus").to(device).train()
        for m in model.modules():  # fastrob.nn.BatchNorm2d and BiasAct: the fused ops, or torch's
            if hasattr(m, "backend"):
                m.backend = backend
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        x = torch.rand(shape, device=device)
        y = torch.randint(0, 10, (shape[0],), device=device)

        def step():
            opt.zero_grad(set_to_none=True)
            objective(model, x, y).backward()
            opt.step()

        return step

    return {
        "resnet18_plain": (step_of(plain, "auto"), None),
        "resnet18_input_grad_reference_eager": (step_of(reference_input_gradient, "torch"), None),
        "resnet18_input_grad_exact": (
            step_of(fastrob_step(InputGradientRegularizer(LAM)), "auto"),
            "resnet18_input_grad_reference_eager",
        ),
    }


def resnet_rows(quick: bool) -> list:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = (128, 3, 32, 32) if device.type == "cuda" else (4, 3, 16, 16) if quick else (16, 3, 32, 32)
    steps = resnet_steps(device, shape)
    stats = {name: time_ms(step, device, warmup=1, reps=3 if quick else 10) for name, (step, _) in steps.items()}
    rows = []
    print(f"PreAct-ResNet-18 + BN, exact input gradient, {'x'.join(map(str, shape))} on {device}")
    for name, (_, ref) in steps.items():
        s, ratio = stats[name], stats[name]["median"] / stats["resnet18_plain"]["median"]
        rows.append(row("resnet18_input_gradient_exact", name, shape, torch.float32, "ms", s, device))
        rows.append(
            row(
                "resnet18_input_gradient_exact",
                name,
                shape,
                torch.float32,
                "ratio_vs_plain",
                {"median": ratio, "p20": ratio, "p80": ratio},
                device,
            )
        )
        speedup = ""
        if ref:
            sp = stats[ref]["median"] / s["median"]
            rows.append(
                row(
                    "resnet18_input_gradient_exact",
                    name,
                    shape,
                    torch.float32,
                    "speedup_vs_reference",
                    {"median": sp, "p20": sp, "p80": sp},
                    device,
                )
            )
            speedup = f"{sp:9.2f}"
        print(f"{name:36s} {s['median']:9.1f} ms {ratio:8.2f}x plain {speedup:>9s}")
    return rows


def summary(times: list) -> dict:
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return {"median": statistics.median(times), "p20": q[1], "p80": q[7]}


def set_mmap_threshold(nbytes: int) -> None:
    """glibc serves allocations of ``nbytes`` or more with mmap and gives them back on free.

    At 64 KiB (set before anything is allocated: chunks already in the heap's free lists are
    reused whatever the threshold) the process's resident memory follows the live tensors, which
    makes peak RSS a measure of a step's peak tensor memory. It also slows the steps down, so the
    timings run with 32 MiB, where glibc's own adaptive threshold ends up anyway."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, nbytes)
    libc.mallopt(m_trim_threshold, 2 * nbytes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32x3x16x16 batches, fewer repetitions")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 7, --quick 5)")
    args = parser.parse_args(argv)
    shape = (32, 3, 16, 16) if args.quick else (128, 3, 32, 32)
    rounds = args.reps or (5 if args.quick else 7)
    device = torch.device("cpu")
    set_mmap_threshold(64 * 1024)
    steps = {name: setup(name, shape) for name in PROVIDERS}
    memory = {}
    for name, step in steps.items():
        step()  # warm-up: lazily allocated state (optimizer, oneDNN) is not the step's
        memory[name] = peak_rss_rise_mib(step)
    set_mmap_threshold(32 * 2**20)
    # Round-robin, so that a load change on a shared machine hits every provider alike.
    times = {name: [] for name in PROVIDERS}
    for r in range(rounds + 2):  # the first two rounds warm up
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if r >= 2:
                times[name].append((time.perf_counter() - start) * 1e3)
    stats = {name: summary(t) for name, t in times.items()}
    rows = []
    print(f"{shape}, {rounds} rounds, {torch.get_num_threads()} threads")
    print(f"{'provider':30s} {'ms':>9s} {'x plain':>8s} {'ref/this':>9s} {'peak MiB':>9s}")
    for name, (op, _, ref) in PROVIDERS.items():
        s = stats[name]
        base = stats["plain"]["median"]
        rows.append(row(op, name, shape, torch.float32, "ms", s, device))
        rows.append(
            row(
                op,
                name,
                shape,
                torch.float32,
                "peak_rss_rise_mib",
                {"median": memory[name], "p20": memory[name], "p80": memory[name]},
                device,
            )
        )
        ratio = s["median"] / base
        rows.append(
            row(op, name, shape, torch.float32, "ratio_vs_plain", {"median": ratio, "p20": ratio, "p80": ratio}, device)
        )
        speedup = ""
        if ref:
            sp = stats[ref]["median"] / s["median"]
            rows.append(
                row(
                    op, name, shape, torch.float32, "speedup_vs_reference", {"median": sp, "p20": sp, "p80": sp}, device
                )
            )
            speedup = f"{sp:9.2f}"
        print(f"{name:30s} {s['median']:9.1f} {ratio:8.2f} {speedup:>9s} {memory[name]:9.1f}")
    save_results(rows, device, quick=args.quick)
    resnet = resnet_rows(args.quick)
    save_results(resnet, torch.device("cuda" if torch.cuda.is_available() else "cpu"), quick=args.quick)
    any_model.main(["--quick"] if args.quick else [])  # J-SIGR and ConvNeXt-like steps ÷ plain


if __name__ == "__main__":
    main()
