"""Pictures (matplotlib, Agg backend, PNG): training curves, accuracy-vs-eps for several models,
ARA curves with their area shaded, Yu et al.'s (2019) decision and loss surfaces, and saliency/CAM grids.

Each ``plot`` function writes one PNG and returns its path; the computations behind the surfaces
and maps (``surface``, ``saliency``) are plain functions returning tensors, for users who plot
their own way.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from fastrob import interpret
from fastrob._atomic import atomic_path
from fastrob._optional import require
from fastrob.attacks.losses import margin_loss
from fastrob.attacks.state import attack_context


@functools.cache
def _pyplot():
    """matplotlib.pyplot with the Agg backend (files only: no display is needed or wanted), imported
    on first use, so that ``import fastrob.plots`` (and the commands that import it) work without
    matplotlib until a picture is drawn; a missing matplotlib is then a ``MissingDependency``."""
    require("matplotlib", "fastrob's plots").use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


class _LazyPyplot:
    def __getattr__(self, name):
        return getattr(_pyplot(), name)


plt = _LazyPyplot()


def _save(fig, path: str) -> str:
    """Saves ``fig`` as a PNG at ``path`` atomically (``fastrob._atomic``) and closes it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def training_curves(history: Sequence[Mapping], path: str, title: str = "") -> str:
    """Loss (with its CE and penalty parts) and train/test accuracy per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(epochs, [h["loss"] for h in history], "o-", label="objective")
    a.plot(epochs, [h["ce"] for h in history], "s--", label="cross-entropy")
    if any(h["penalty"] for h in history):
        a.plot(epochs, [h["penalty"] for h in history], "^:", label="penalty (unweighted)")
    a.set(xlabel="epoch", ylabel="training loss", title="loss")
    a.legend()
    b.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train (clean)")
    b.plot(epochs, [h["test_accuracy"] for h in history], "s-", label="test (clean)")
    b.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    b.legend(loc="lower right")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def accuracy_curves(curves: Mapping[str, object], path: str, title: str = "") -> str:
    """Robust accuracy vs eps, one line per model (``curves``: name -> AccuracyCurve; the eps = 0
    point is the clean accuracy), all on one axis."""
    fig, ax = plt.subplots(figsize=(6, 4))
    norms = set()
    for name, c in curves.items():
        eps = [0.0] + [e for e in c.eps if e > 0]
        acc = [c.clean_accuracy] + [a for e, a in zip(c.eps, c.accuracy) if e > 0]
        ax.plot(eps, acc, "o-", label=name)
        norms.add(c.norm)
    ax.set(
        xlabel=f"eps ({' / '.join(sorted(norms))} radius)",
        ylabel="robust accuracy (PGD)",
        ylim=(-0.02, 1.02),
        title=title or "accuracy under attack",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def ara_curves(results: Mapping[str, object], path: str, title: str = "") -> str:
    """acc(r) = fraction of samples whose minimal RMSE perturbation exceeds r: one panel per model,
    its area above chance (the ARA) shaded and quoted, the other models' curves in grey for
    comparison (shaded areas on one axis would hide each other)."""
    k = len(results)
    cols = min(k, 2)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.3 * rows), squeeze=False, sharex=True, sharey=True)
    curves = {name: res.curve() for name, res in results.items()}
    r_max = max([float(r[-1]) for r, _ in curves.values() if len(r)] + [1e-3])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, res) in enumerate(results.items()):
        ax = axes[i // cols, i % cols]
        chance = 1.0 / res.num_classes
        for other, (r, acc) in curves.items():
            if other != name:
                ax.step(r.numpy(), acc.numpy(), where="post", color="0.75", lw=1)
        r, acc = curves[name]
        color = colors[i % len(colors)]
        ax.step(r.numpy(), acc.numpy(), where="post", color=color, lw=2, label=name)
        ax.fill_between(
            r.numpy(),
            chance,
            acc.numpy(),
            where=(acc.numpy() > chance),
            step="post",
            color=color,
            alpha=0.3,
            label=f"ARA = {res.ara:.4f}",
        )
        ax.axhline(chance, color="k", ls=":", lw=1, label=f"chance 1/C = {chance:.2f}")
        ax.set(xlim=(0, r_max * 1.02), ylim=(0, 1.02))
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
        if i % cols == 0:
            ax.set_ylabel("accuracy at radius r")
        if i // cols == rows - 1:
            ax.set_xlabel("perturbation r (RMSE = ||delta||_2 / sqrt(d))")
    for j in range(k, rows * cols):
        axes[j // cols, j % cols].axis("off")
    fig.suptitle(
        title or f"accuracy-robustness area ({next(iter(results.values())).kind} ARA; grey: the other models)",
        fontsize=11,
    )
    fig.tight_layout()
    return _save(fig, path)


def surface(model, x: torch.Tensor, y: torch.Tensor, span: float = 0.3, resolution: int = 41, seed: int = 0) -> dict:
    """Yu et al.'s (2019) input-space view around each sample: over the plane x + a·u + b·v,
    a, b in [-span, span], u = sign(∇ₓ CE) (the FGSM direction) and v a random ±1 vector, so that u
    and v have the same norms (Linf 1, L2 √d) and (a, b) read as Linf distances. Returns
    {"a": [R], "b": [R], "margin": [B, R, R], "loss": [B, R, R]} with the decision surface
    margin = z_y - max_{j≠y} z_j (its zero level set is the decision boundary) and the loss surface
    CE, indexed [sample, b, a]. Points are not clamped to [0, 1]: the plane is the object of study."""
    x = x.detach()
    with attack_context(model):
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
        u = grad.sign()
        g = torch.Generator(device=x.device).manual_seed(seed)
        v = torch.randint(0, 2, x.shape, generator=g, device=x.device).to(x.dtype) * 2 - 1
        t = torch.linspace(-span, span, resolution, device=x.device, dtype=x.dtype)
        bb, aa = torch.meshgrid(t, t, indexing="ij")
        margins, losses = [], []
        with torch.no_grad():
            for i in range(len(y)):
                pts = x[i] + aa.reshape(-1, *[1] * (x.dim() - 1)) * u[i] + bb.reshape(-1, *[1] * (x.dim() - 1)) * v[i]
                logits = torch.cat([model(c) for c in pts.split(1024)]).float()
                labels = y[i].expand(len(pts))
                margins.append((-margin_loss(logits, labels)).view(resolution, resolution))
                losses.append(F.cross_entropy(logits, labels, reduction="none").view(resolution, resolution))
    return {"a": t.cpu(), "b": t.cpu(), "margin": torch.stack(margins).cpu(), "loss": torch.stack(losses).cpu()}


def surfaces(
    models: Mapping[str, torch.nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    path: str,
    span: float = 0.3,
    resolution: int = 41,
    seed: int = 0,
) -> str:
    """For each sample (rows) and model: the decision surface (margin, diverging colours, the
    boundary margin = 0 drawn black) and the loss surface (CE, log colour scale) over the plane of
    ``surface``. The sample itself sits at (0, 0)."""
    import numpy as np

    _pyplot()  # matplotlib present, or a MissingDependency naming it
    from matplotlib.colors import LogNorm, TwoSlopeNorm

    data = {name: surface(m, x, y, span, resolution, seed) for name, m in models.items()}
    n, k = len(y), len(models)
    fig, axes = plt.subplots(n, 1 + 2 * k, figsize=(2.3 * (1 + 2 * k) + 1, 2.3 * n + 0.6), squeeze=False)
    extent = (-span, span, -span, span)
    for i in range(n):
        _show_image(axes[i, 0], x[i])
        axes[i, 0].set_title(f"input, label {int(y[i])}", fontsize=9)
        for j, (name, s) in enumerate(data.items()):
            m = s["margin"][i].numpy()
            lim = max(float(np.abs(m).max()), 1e-6)
            ax = axes[i, 1 + 2 * j]
            im = ax.imshow(m, origin="lower", extent=extent, cmap="RdBu", norm=TwoSlopeNorm(0.0, -lim, lim))
            if m.min() < 0 < m.max():
                ax.contour(s["a"].numpy(), s["b"].numpy(), m, levels=[0.0], colors="k", linewidths=1.2)
            ax.plot(0, 0, "k+")
            ax.set_title(f"{name}\ndecision (margin)", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
            ax = axes[i, 2 + 2 * j]
            loss = s["loss"][i].numpy().clip(1e-4, None)
            im = ax.imshow(
                loss,
                origin="lower",
                extent=extent,
                cmap="viridis",
                norm=LogNorm(vmin=loss.min(), vmax=max(loss.max(), loss.min() * 1.01)),
            )
            ax.plot(0, 0, "w+")
            ax.set_title(f"{name}\nloss (CE, log)", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
            for ax in axes[i, 1 + 2 * j : 3 + 2 * j]:
                ax.set_xlabel("a (gradient-sign dir.)", fontsize=8)
                ax.set_ylabel("b (random dir.)", fontsize=8)
                ax.tick_params(labelsize=7)
    fig.suptitle(
        "margin z_y - max_{j!=y} z_j (blue: correct; black line: decision boundary) and loss over x + a*u + b*v",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, path)


def saliency(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Input-gradient saliency |∂z_y/∂x|, max over channels: [B, H, W] (Simonyan et al. 2014;
    ``fastrob.interpret.saliency`` with the model in eval mode and its parameters frozen)."""
    with attack_context(model):
        maps = interpret.saliency(model, x.detach(), y, create_graph=False)  # [B, 1, C, H, W]
    return maps[:, 0].abs().amax(1).detach()


def cam(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """The class activation map of class y (``fastrob.interpret.cam``) upsampled to the input size,
    [B, H, W], for models with a CAM head (``.features`` and an ``nn.Linear`` ``.head``, as
    ``fastrob.models.SmallCNN``); None for others."""
    if interpret.cam_parts(model) is None:
        return None
    with torch.no_grad(), attack_context(model):
        maps = interpret.cam(model, x, y)
    return F.interpolate(maps, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]


def saliency_grid(models: Mapping[str, torch.nn.Module], x: torch.Tensor, y: torch.Tensor, path: str) -> str:
    """Rows: samples. Columns: the input, then per model its input-gradient saliency (and its CAM
    when the model has a CAM head). Each map is scaled to its own maximum (bright = large)."""
    columns = [("input", None, None)]
    for name, m in models.items():
        columns.append((name, "saliency |dz_y/dx|", saliency(m, x, y)))
        c = cam(m, x, y)
        if c is not None:
            columns.append((name, "CAM of class y", c))
    n = len(y)
    fig, axes = plt.subplots(n, len(columns), figsize=(1.9 * len(columns), 1.9 * n + 0.4), squeeze=False)
    for i in range(n):
        for j, (name, kind, maps) in enumerate(columns):
            ax = axes[i, j]
            if maps is None:
                _show_image(ax, x[i])
                ax.set_ylabel(f"label {int(y[i])}", fontsize=9)
            else:
                ax.imshow(maps[i].cpu().numpy(), cmap="inferno")
                ax.set_xticks([])
                ax.set_yticks([])
            if i == 0:
                ax.set_title(name if maps is None else f"{name}\n{kind}", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _show_image(ax, img: torch.Tensor) -> None:
    img = img.detach().cpu()
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def explanation_grid(
    model,
    x: torch.Tensor,
    target,
    path: str,
    rho: float = 0.1,
    overshoot: float = 5.0,
    steps: int = 35,
    title: str = "",
) -> str:
    """Woods et al.'s adversarial explanations (``fastrob.attacks.explanation``) for a batch: one row
    per sample, columns original, explanation (x moved toward ``target`` within RMSE ``rho``) and
    difference (explanation - original; red where the explanation adds, blue where it removes,
    symmetric scale per row). Titles give the target's probability before and after."""
    from fastrob.attacks.explanation import adversarial_explanation, check_targets, rmse

    x = x.detach()
    target = check_targets(target, x.shape[0], x.device)
    expl = adversarial_explanation(model, x, target, rho=rho, overshoot=overshoot, steps=steps)
    with torch.no_grad(), attack_context(model):
        p0 = F.softmax(model(x).float(), 1).gather(1, target[:, None])[:, 0]
        p1 = F.softmax(model(expl).float(), 1).gather(1, target[:, None])[:, 0]
    diff = (expl - x).cpu()
    dist = rmse(expl - x).cpu()
    n = x.shape[0]
    fig, axes = plt.subplots(n, 3, figsize=(6.3, 2.0 * n + 0.5), squeeze=False)
    for i in range(n):
        t = int(target[i])
        _show_image(axes[i, 0], x[i])
        axes[i, 0].set_title(f"original: p({t}) = {float(p0[i]):.2f}", fontsize=8)
        _show_image(axes[i, 1], expl[i])
        axes[i, 1].set_title(f"explanation of {t}: p = {float(p1[i]):.2f}", fontsize=8)
        d = diff[i].mean(0) if diff.shape[1] > 1 else diff[i, 0]  # channels averaged for colour images
        lim = max(float(d.abs().max()), 1e-6)
        im = axes[i, 2].imshow(d.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[i, 2].set_xticks([])
        axes[i, 2].set_yticks([])
        axes[i, 2].set_title(f"difference, RMSE {float(dist[i]):.3f}", fontsize=8)
        fig.colorbar(im, ax=axes[i, 2], fraction=0.046, pad=0.03)
    fig.suptitle(title or f"adversarial explanations (rho = {rho:g}, {steps} steps)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
