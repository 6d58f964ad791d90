"""``fastrob demo``: an end-to-end PGD evaluation on the built-in digits data.

Trains a small MLP on the scikit-learn digits set, then attacks its test set with PGD (Linf and
L2, ``fastrob.attacks.pgd``, every step through the fused ``pgd_step``) at several radii, and
prints a table of robust accuracy. (The full demo, comparing regularized models, arrives with ``fastrob train``
and ``fastrob eval``.)
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fastrob import _backend
from fastrob.attacks import pgd
from fastrob.data import load_digits

LINF_EPS = (0.05, 0.1, 0.2, 0.3)
L2_EPS = (0.5, 1.0, 2.0)
STEPS = 20


def small_mlp(n_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, n_classes))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=generator).split(64):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    model.eval()


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str, steps: int,
                 seed: int) -> float:
    """Robust accuracy under PGD with a random start and step size 2.5 * eps / steps (Madry et al.)."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    _, fooled = pgd(model, x, y, eps=eps, alpha=2.5 * eps / steps, steps=steps, norm=norm, generator=generator,
                    return_fooled=True)
    return 1.0 - fooled.float().mean().item()


def run(*, epochs: int = 30, seed: int = 0, device: str = "cpu", quiet: bool = False) -> list[dict]:
    """Trains, attacks and prints the table; returns its rows."""
    torch.manual_seed(seed)
    data = load_digits(seed=seed)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    model = small_mlp().to(device)
    start = time.perf_counter()
    train(model, x_train, y_train, epochs=epochs, seed=seed)
    train_seconds = time.perf_counter() - start
    with torch.no_grad():
        clean = (model(x_test).argmax(1) == y_test).float().mean().item()
    backend = _backend.resolve("auto", x_test.device, x_test.dtype, op="pgd_step")
    print(f"fastrob demo: MLP on the scikit-learn digits ({len(y_train)} train / {len(y_test)} test images, "
          f"1x8x8), device {device}")
    print(f"trained {epochs} epochs in {train_seconds:.1f} s; clean test accuracy {clean:.1%}")
    print(f"PGD with {STEPS} steps, random start, step 2.5*eps/{STEPS}; fused pgd_step backend: {backend}\n")
    settings = [("linf", eps) for eps in LINF_EPS] + [("l2", eps) for eps in L2_EPS]
    rows = []
    for norm, eps in tqdm(settings, desc="attacking", disable=quiet, leave=False):
        start = time.perf_counter()
        acc = pgd_accuracy(model, x_test, y_test, eps=eps, norm=norm, steps=STEPS, seed=seed)
        rows.append({"norm": norm, "eps": eps, "robust_accuracy": acc, "seconds": time.perf_counter() - start})
    print(f"{'norm':<6}{'eps':>6}{'robust acc':>12}{'time (s)':>10}")
    print(f"{'none':<6}{0.0:>6.2f}{clean:>12.1%}{'':>10}")
    for r in rows:
        print(f"{r['norm']:<6}{r['eps']:>6.2f}{r['robust_accuracy']:>12.1%}{r['seconds']:>10.2f}")
    return rows
