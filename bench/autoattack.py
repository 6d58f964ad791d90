"""AutoAttack time and strength: fastrob versus torchattacks in the same process, on the same
digits models (plain, PGD-trained, input-gradient penalty) and the same inputs.

    python -m bench.autoattack [--quick] [--n N]

Rows (bench/results/<device>.csv), per model, for three providers:
  fastrob-standard      fastrob.attacks.AutoAttack(version="standard"): 100 iterations, 5000 queries
  torchattacks-matched  torchattacks.MultiAttack of APGD(ce, 100), APGDT(100), FAB(multi_targeted, 100),
                        Square(5000): the same settings
  torchattacks-aa       torchattacks.AutoAttack(version="standard"), whose parts run 10 iterations
  fastrob-aa10          fastrob.attacks.AutoAttack(steps=10): torchattacks-aa's settings
metrics: seconds (one call, wall clock) and robust_acc.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.common import row, save_results
from fastrob.data import load_digits

EPS = 0.1


def digits_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    )


def _fit(model, x, y, objective, epochs, batch=128, lr=3e-3):
    opt = torch.optim.Adam(model.parameters(), lr)
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(perm), batch):
            b = perm[i : i + batch]
            loss = objective(model, x[b], y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _ce(model, x, y):
    return F.cross_entropy(model(x), y)


def _pgd_trained(model, x, y):
    from fastrob.attacks import pgd

    model.eval()
    x_adv = pgd(model, x, y, eps=EPS, alpha=EPS / 4, steps=5)
    model.train()
    return F.cross_entropy(model(x_adv), y)


def _gradient_penalty(model, x, y, lam=1.0):
    """CE + lam·mean_i ‖∇_x CE_i‖² (double backpropagation, Drucker & LeCun 1992)."""
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), x, create_graph=True)
    return loss.mean() + lam * grad.flatten(1).pow(2).sum(1).mean()


def digits_models(digits, epochs=12):
    """{"plain", "pgd", "gradpen"}: three small CNNs trained on the digits (seeded, eval mode)."""
    models = {}
    for name, objective in (("plain", _ce), ("pgd", _pgd_trained), ("gradpen", _gradient_penalty)):
        torch.manual_seed(0)
        models[name] = _fit(digits_cnn(), digits.x_train, digits.y_train, objective, epochs)
        for p in models[name].parameters():
            p.grad = None
    return models


def robust_acc(model, x_adv, y):
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


def providers(model, eps, steps=100, n_queries=5000):
    import torchattacks

    import fastrob.attacks as fa

    matched = torchattacks.MultiAttack(
        [
            torchattacks.APGD(model, eps=eps, steps=steps, loss="ce", seed=0),
            torchattacks.APGDT(model, eps=eps, steps=steps, seed=0),
            torchattacks.FAB(model, eps=eps, steps=steps, multi_targeted=True, seed=0),
            torchattacks.Square(model, eps=eps, n_queries=n_queries, seed=0),
        ]
    )
    return {
        "fastrob-standard": fa.AutoAttack(model, eps=eps, seed=0, quiet=True, steps=steps),
        "torchattacks-matched": matched,
        "torchattacks-aa": torchattacks.AutoAttack(model, eps=eps, seed=0),
        # torchattacks.AutoAttack's settings (its parts' 10 iterations, Square's 5000 queries)
        "fastrob-aa10": fa.AutoAttack(model, eps=eps, seed=0, quiet=True, steps=10, n_queries=n_queries),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32 samples, 10 iterations, 200 queries")
    parser.add_argument("--n", type=int, default=100, help="test samples per model")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    torch.set_num_threads(1)  # a shared machine: one thread was the faster for these small models
    digits = load_digits()
    models = digits_models(digits, epochs=3 if args.quick else 12)
    n = 32 if args.quick else args.n
    x, y = digits.x_test[:n], digits.y_test[:n]
    rows = []
    for name, model in models.items():
        shape = (f"digits-{name}",) + tuple(x.shape)
        clean = robust_acc(model, x, y)
        for provider, attack in providers(model, EPS, *((10, 200) if args.quick else ())).items():
            start = time.perf_counter()
            adv = attack(x, y)
            seconds = time.perf_counter() - start
            acc = robust_acc(model, adv, y)
            for metric, value in (("seconds", seconds), ("robust_acc", acc)):
                rows.append(
                    row(
                        "autoattack_linf0.1",
                        provider,
                        shape,
                        x.dtype,
                        metric,
                        {"median": value, "p20": value, "p80": value},
                        device,
                    )
                )
            print(f"{name:8s} clean {clean:.3f}  {provider:22s} {seconds:8.2f} s  robust acc {acc:.3f}", flush=True)
    save_results(rows, device, quick=args.quick)


if __name__ == "__main__":
    main()
