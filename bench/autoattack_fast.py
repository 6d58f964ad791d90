"""AutoAttack's "fast" version against the standard one: robust accuracy and time per model, and the
measurement behind its targeting (how many MALT targets, among how many candidate classes).

    python -m bench.autoattack_fast [--quick] [--n N] [--epochs E] [--original]

Models: the demo's four MLPs (``fastrob demo``'s training configs: plain, input-gradient penalty,
Jacobian penalty, TRADES), the PGD-trained CNN of bench/autoattack.py, and two planted-masking
models on the plain MLP (logits x1000; input rounded to 1/8). Linf 0.1 on the first N digits test
images (default 150), one thread, each attack run once (seed 0).

Per model:
  standard  fastrob.attacks.AutoAttack(version="standard"), timed.
  targets   the targeting sweep: every point that APGD-CE leaves robust is attacked by APGD-T once per
            target class (one class per run, 100 iterations), so that the robust accuracy of APGD-CE
            + APGD-T on any ranked subset of targets can be read off: the k best by MALT's distance
            among the c most confident classes (c = k is the confidence ranking of standard APGD-T).
  fast      fastrob.attacks.AutoAttack(version="fast") with the module's FAST_TARGETS/FAST_CANDIDATES,
            timed, and whether its guard fired.
With --original, only the original AutoAttack (standard version, the ``pyautoattack`` package, which
packages Croce & Hein's code) runs, on the same models and images (the training is seeded): provider
original-standard.
Rows (bench/results/<device>.csv), op "autoattack_fast_linf0.1": providers fastrob-standard and
fastrob-fast with metrics seconds (wall clock), cpu_seconds (this process's CPU time: on a shared
machine the steadier of the two) and robust_acc, and sweep-k{k}-c{c} with robust_acc.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn as nn

from bench.autoattack import _fit, _pgd_trained, digits_cnn
from bench.common import row, save_results
from fastrob.attacks import AutoAttack
from fastrob.attacks.apgd import apgd
from fastrob.attacks.autoattack import FAST_CANDIDATES, FAST_TARGETS
from fastrob.attacks.malt import malt_scores

EPS = 0.1
SWEEP = [(k, c) for c in (1, 2, 3, 4, 5, 9) for k in (1, 2, 3, 4, 5, 9) if k <= c]


class Planted(nn.Module):
    """A model with gradient masking planted: "scaled" (logits x1000) or "rounded" (input to 1/8)."""

    def __init__(self, model, kind):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x):
        if self.kind == "rounded":
            return self.model(torch.round(x * 8) / 8)
        return 1000 * self.model(x)


def bench_models(epochs: int, seed: int = 0):
    """{name: model} (module docstring) and the demo's test images and labels."""
    from fastrob.data import load_dataset
    from fastrob.demo import MODELS
    from fastrob.trainer import TrainConfig, train

    dataset = load_dataset("digits", seed=seed)
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, params in MODELS:
            config = TrainConfig(activation="half_huber", epochs=epochs, lr=3e-3, seed=seed, **params)
            models[f"mlp-{key}"] = train(config, f"{tmp}/{key}", quiet=True, dataset=dataset)[0].eval()
    split = dataset.split
    torch.manual_seed(seed)
    models["cnn-pgd"] = _fit(digits_cnn(), split.x_train, split.y_train, _pgd_trained, 12)
    models["mlp-plain-x1000"] = Planted(models["mlp-plain"], "scaled").eval()
    models["mlp-plain-round8"] = Planted(models["mlp-plain"], "rounded").eval()
    return models, split.x_test, split.y_test


def targeting_sweep(model, x, y, ce_robust, steps):
    """{(k, c): robust accuracy of APGD-CE + APGD-T on the k MALT-best of the c most confident classes}."""
    with torch.no_grad():
        clean = model(x)
    ranked = clean.scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)[:, : clean.shape[1] - 1]
    live = ce_robust.nonzero().squeeze(1)
    fooled = torch.zeros(len(y), ranked.shape[1], dtype=torch.bool)  # [sample, confidence rank]
    if len(live):
        for j in range(ranked.shape[1]):
            _, hit = apgd(
                model,
                x[live],
                y[live],
                eps=EPS,
                loss="dlr-targeted",
                targets=ranked[live, j : j + 1],
                steps=steps,
                seed=0,
                return_fooled=True,
            )
            fooled[live, j] = hit
    scores = malt_scores(model, x, y, ranked, "Linf")  # [sample, confidence rank]
    result = {}
    for k, c in SWEEP:
        order = scores[:, :c].argsort(dim=1, stable=True)[:, :k]  # confidence ranks of the k MALT-best
        broken = fooled.gather(1, order).any(1)
        result[(k, c)] = (ce_robust & ~broken).float().mean().item()
    return result


def original_autoattack(model, x, y):
    """(seconds, CPU seconds, robust accuracy) of the original AutoAttack's standard version, seed 0."""
    import logging

    from pyautoattack import AutoAttack as OriginalAutoAttack

    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    atk = OriginalAutoAttack(model, eps=EPS, norm="Linf", seed=0, version="standard", device="cpu")
    atk.verbose = False
    start, start_cpu = time.perf_counter(), time.process_time()
    adv, _ = atk.run_standard_evaluation(x, y, batch_size=len(y))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    assert float((adv - x).abs().amax()) <= EPS + 1e-5 and 0 <= float(adv.min()) and float(adv.max()) <= 1
    with torch.no_grad():
        acc = (model(adv).argmax(1) == y).float().mean().item()
    return seconds, cpu_seconds, acc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32 samples, 3 epochs, 10 iterations, 200 queries")
    parser.add_argument("--n", type=int, default=150, help="test images per model (default 150)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs of the demo's MLPs (default 30)")
    parser.add_argument("--original", action="store_true", help="run only the original AutoAttack (pyautoattack)")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    torch.set_num_threads(1)  # a shared machine: one thread was the faster for these small models
    steps, queries = (10, 200) if args.quick else (100, 5000)
    models, x_test, y_test = bench_models(3 if args.quick else args.epochs)
    n = 32 if args.quick else args.n
    x, y = x_test[:n], y_test[:n]
    rows = []

    def add(model_name, provider, metric, value):
        stats = {"median": value, "p20": value, "p80": value}
        shape = (f"digits-{model_name}",) + tuple(x.shape)
        rows.append(row("autoattack_fast_linf0.1", provider, shape, x.dtype, metric, stats, device))

    if args.original:
        for name, model in models.items():
            seconds, cpu_seconds, acc = original_autoattack(model, x, y)
            for metric, value in (("seconds", seconds), ("cpu_seconds", cpu_seconds), ("robust_acc", acc)):
                add(name, "original-standard", metric, value)
            print(f"{name:18s} original AutoAttack standard {acc:.3f} ({seconds:6.1f} s, CPU {cpu_seconds:.1f} s)")
        save_results(rows, device, quick=args.quick)
        return
    print(f"fast version: {FAST_TARGETS} MALT targets among {FAST_CANDIDATES} candidates; n={n}, Linf {EPS}")
    for name, model in models.items():
        times, cpu, records = {}, {}, {}
        for version in ("standard", "fast"):
            atk = AutoAttack(model, eps=EPS, version=version, seed=0, steps=steps, n_queries=queries, quiet=True)
            start, start_cpu = time.perf_counter(), time.process_time()
            _, records[version] = atk.run(x, y)
            times[version] = time.perf_counter() - start
            cpu[version] = time.process_time() - start_cpu
            add(name, f"fastrob-{version}", "cpu_seconds", cpu[version])
            acc = records[version].robust.float().mean().item()
            add(name, f"fastrob-{version}", "seconds", times[version])
            add(name, f"fastrob-{version}", "robust_acc", acc)
        std, fast = records["standard"], records["fast"]
        ce_robust = torch.tensor([b not in ("clean", "apgd-ce") for b in std.broken_by])
        sweep = targeting_sweep(model, x, y, ce_robust, steps)
        for (k, c), acc in sweep.items():
            add(name, f"sweep-k{k}-c{c}", "robust_acc", acc)
        fired = [c for c, v in fast.guard.items() if v["verdict"] == "suspicious"]
        print(
            f"{name:18s} clean {std.clean_accuracy:.3f}  standard {std.robust.float().mean():.3f} "
            f"({times['standard']:6.1f} s; after APGD-CE {std.robust_accuracy['apgd-ce']:.3f}, APGD-T "
            f"{std.robust_accuracy['apgd-t']:.3f})  fast {fast.robust.float().mean():.3f} ({times['fast']:6.1f} s, "
            f"ratio {times['fast'] / times['standard']:.2f}, CPU {cpu['fast']:.1f}/{cpu['standard']:.1f} s = "
            f"{cpu['fast'] / cpu['standard']:.2f}; guard {'fired: ' + ','.join(fired) if fired else 'ok'})",
            flush=True,
        )
        print("    sweep (k targets, c candidates): " + "  ".join(f"k{k}c{c} {a:.3f}" for (k, c), a in sweep.items()))
    save_results(rows, device, quick=args.quick)


if __name__ == "__main__":
    main()
