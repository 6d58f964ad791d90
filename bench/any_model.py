"""Regularized steps on modern architectures, each against a plain step of the same model.

    python -m bench.any_model [--quick]

Rows (op ``any_model``, metrics ms and ratio_vs_plain):
- ``resnet18_jsigr_patch{4,8}``: a J-SIGR training step of PreAct-ResNet-18 (BatchNorm, softplus)
  at 32x32 ÷ a plain step. The saliency costs one no-grad forward of every image with one square
  replaced: (32/patch)^2 forwards of the batch (on CPU one forward per square, J-SIGR's default
  ``chunk``; on a GPU 4096 images a pass, 32 squares of a batch of 128), so the ratio follows the
  patch size, with a floor of about (32/patch)^2 / 3 since a plain step costs about 3 forwards
  (21x at patch 4, 5x at 8).
  ``resnet18_jsigr_linear_patch4``: the same step with ``saliency_estimate="linear"``, the
  first-order estimate of those forwards (no extra forward).
- ``convnext_atto_input_grad_exact``: the exact input-gradient step of a ConvNeXt-atto-like model
  (stem 4x4/4, depthwise 7x7 blocks with channels-first LayerNorm and GELU, dims 40-80-160-320,
  depths 2-2-2-2 instead of atto's 2-2-6-2 to keep the CPU run short) ÷ a plain step. Its
  depthwise convolutions run on fastrob.grouped_conv inside the regularizer (fastrob.routing), and
  ``convnext_atto_input_grad_eager`` is the same penalty written by hand (torch's grouped
  convolution, whose double backward loops over the groups).
CPU: batch 16x3x32x32 (--quick: 4x3x32x32); on a GPU 128. Providers run round-robin (median over
rounds). Rows are appended to bench/results/<device>.csv.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.common import row, save_results
from fastrob.models import PreActResNet18
from fastrob.regularizers import InputGradientRegularizer, JSIGRRegularizer


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(
            0, 3, 1, 2
        )


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1, self.act, self.pw2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, x):
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.pw2(self.act(self.pw1(self.norm(h)))) * self.gamma
        return x + h.permute(0, 3, 1, 2)


def convnext_atto_like(classes=10, dims=(40, 80, 160, 320), depths=(2, 2, 2, 2)) -> nn.Module:
    layers = [nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0])]
    for i, (dim, depth) in enumerate(zip(dims, depths)):
        if i:
            layers += [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, stride=2)]
        layers += [Block(dim) for _ in range(depth)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(dims[-1]), nn.Linear(dims[-1], classes)]
    return nn.Sequential(*layers)


def plain(model, x, y):
    return F.cross_entropy(model(x), y)


LAM = 0.1  # the input-gradient penalty's weight, both providers


def input_grad_eager(model, x, y):
    """The exact input-gradient penalty as a user writes it (torch's own grouped convolution)."""
    x = x.clone().requires_grad_(True)
    ce = F.cross_entropy(model(x), y, reduction="none")
    (g,) = torch.autograd.grad(ce.sum(), x, create_graph=True)
    return ce.mean() + LAM * g.square().sum((1, 2, 3)).mean()


def objective_of(reg):
    return lambda model, x, y: reg(model, x, y).loss


PROVIDERS = {
    # name: (model builder, objective, the plain provider it is divided by)
    "resnet18_plain": (lambda: PreActResNet18(10, 3, activation_name="softplus"), plain, None),
    "resnet18_jsigr_patch4": (
        lambda: PreActResNet18(10, 3, activation_name="softplus"),
        objective_of(JSIGRRegularizer(patch=4)),
        "resnet18_plain",
    ),
    "resnet18_jsigr_patch8": (
        lambda: PreActResNet18(10, 3, activation_name="softplus"),
        objective_of(JSIGRRegularizer(patch=8)),
        "resnet18_plain",
    ),
    "resnet18_jsigr_linear_patch4": (
        lambda: PreActResNet18(10, 3, activation_name="softplus"),
        objective_of(JSIGRRegularizer(patch=4, saliency_estimate="linear")),
        "resnet18_plain",
    ),
    "convnext_atto_plain": (convnext_atto_like, plain, None),
    "convnext_atto_input_grad_exact": (
        convnext_atto_like,
        objective_of(InputGradientRegularizer(LAM)),
        "convnext_atto_plain",
    ),
    "convnext_atto_input_grad_eager": (convnext_atto_like, input_grad_eager, "convnext_atto_plain"),
}


def setup(name, shape, device):
    torch.manual_seed(0)
    build, objective, _ = PROVIDERS[name]
    model = build().to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.rand(shape, device=device)
    y = torch.randint(0, 10, (shape[0],), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        objective(model, x, y).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4x3x32x32 batches on CPU, 3 rounds")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 5, --quick 3)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = (128, 3, 32, 32) if device.type == "cuda" else (4, 3, 32, 32) if args.quick else (16, 3, 32, 32)
    rounds = args.reps or (3 if args.quick else 5)
    steps = {name: setup(name, shape, device) for name in PROVIDERS}
    times = {name: [] for name in PROVIDERS}
    for r in range(rounds + 1):  # the first round warms up
        for name, step in steps.items():  # round-robin: load changes hit every provider alike
            start = time.perf_counter()
            step()
            if r:
                times[name].append((time.perf_counter() - start) * 1e3)
    rows = []
    print(f"{'x'.join(map(str, shape))} on {device}, {rounds} rounds, {torch.get_num_threads()} threads")
    for name, (_, _, base) in PROVIDERS.items():
        ms = statistics.median(times[name])
        rows.append(row("any_model", name, shape, torch.float32, "ms", {"median": ms, "p20": ms, "p80": ms}, device))
        ratio = ms / statistics.median(times[base]) if base else 1.0
        stats = {"median": ratio, "p20": ratio, "p80": ratio}
        rows.append(row("any_model", name, shape, torch.float32, "ratio_vs_plain", stats, device))
        print(f"{name:34s} {ms:9.1f} ms {ratio:7.2f}x plain")
    save_results(rows, device, quick=args.quick)
    return rows


if __name__ == "__main__":
    main()
