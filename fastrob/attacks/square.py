"""Square Attack (Andriushchenko et al. 2020): a score-based, gradient-free attack, Linf and L2,
with torchattacks.Square's constructor arguments and call convention.

Random search on the margin m(x') = z_y - max_{j≠y} z_j (loss "margin", or -CE with loss "ce";
targeted: m = max_{j≠t} z_j - z_t), minimised. Each iteration proposes, for every still-robust sample,
a change confined to one random square window of side s = round(√(p·H·W)) and keeps it when the
loss decreases (or the sample becomes misclassified); samples with m <= 0 are no longer queried.
  Linf: start from vertical stripes x + eps·(±1 per channel and column); the window is set to a
        random ±eps per channel, then projected onto the ball and the box.
  L2:   start from a grid of ±"pseudo-Gaussian" blocks scaled to norm eps; a proposal moves the
        perturbation mass of a second random window into the first, with a fresh ±block.
p starts at ``p_init`` and halves at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000
of a 10 000-query budget (rescaled to ``n_queries`` with ``resc_schedule``).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from fastrob._checks import check_float, check_int, check_logits
from fastrob.attacks.config import torchattacks_norm
from fastrob.attacks.losses import margin_loss
from fastrob.attacks.numerics import DIVISION_EPS
from fastrob.attacks.starts import make_generator
from fastrob.attacks.state import attack_context, check_attack_inputs
from fastrob.attacks.torchattacks_compat import Attack
from fastrob.ops.pgd_step import fit_into_ball

SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(p_init: float, iteration: int, n_queries: int, rescale: bool = True) -> float:
    """The fraction of pixels changed at ``iteration``: p_init halved once per mark of SCHEDULE passed."""
    it = int(iteration / n_queries * 10000) if rescale else iteration
    return p_init / 2 ** sum(it > mark for mark in SCHEDULE)


def _margin_and_loss(logits, y, loss, targeted):
    """(margin, loss) per sample, both minimised; margin <= 0 means success."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    # margin_loss is max_{j≠y} z_j - z_y; negated (exactly) it is the untargeted margin
    margin = margin_loss(logits, y) if targeted else -margin_loss(logits, y)
    if loss == "margin":
        return margin, margin
    ce = F.cross_entropy(logits, y, reduction="none")
    return margin, ce if targeted else -ce


def _windows(rows, h, w, s, generator, device):
    """Per row a random top-left corner (vh, vw) of an s×s window, as a [rows, 1, h, w] bool mask
    plus the window-local coordinates of each pixel."""
    vh = torch.randint(0, h - s + 1, (rows, 1, 1, 1), device=device, generator=generator)
    vw = torch.randint(0, w - s + 1, (rows, 1, 1, 1), device=device, generator=generator)
    ii = torch.arange(h, device=device).view(1, 1, h, 1) - vh
    jj = torch.arange(w, device=device).view(1, 1, 1, w) - vw
    mask = (ii >= 0) & (ii < s) & (jj >= 0) & (jj < s)
    return mask, ii.clamp(0, s - 1), jj.clamp(0, s - 1)


def _signs(shape, generator, device, dtype):
    return torch.randint(0, 2, shape, device=device, generator=generator).to(dtype) * 2 - 1


def _eta_rectangles(a, b, device, dtype):
    delta = torch.zeros(a, b, device=device, dtype=dtype)
    ca, cb = a // 2 + 1, b // 2 + 1
    i0, j0 = ca - 1, cb - 1
    for k in range(max(ca, cb)):
        delta[max(i0, 0) : min(i0 + 2 * k + 1, a), max(j0, 0) : min(j0 + 2 * k + 1, b)] += 1.0 / (k + 1) ** 2
        i0, j0 = i0 - 1, j0 - 1
    return delta / delta.norm()


@functools.lru_cache(maxsize=64)
def _eta(s, transpose, device, dtype):
    """The s×s L2 block: two nested-rectangle halves of opposite sign, unit norm (cached: only its
    orientation is random, and building it is a Python loop)."""
    delta = torch.zeros(s, s, device=device, dtype=dtype)
    delta[: s // 2] = _eta_rectangles(s // 2, s, device, dtype)
    delta[s // 2 :] = -_eta_rectangles(s - s // 2, s, device, dtype)
    delta = delta / delta.norm()
    return delta.t() if transpose else delta


def _norm(t):
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _linf_init(x, eps, generator):
    b, c, _, w = x.shape
    return torch.clamp(x + eps * _signs((b, c, 1, w), generator, x.device, x.dtype), 0, 1)


def _linf_proposal(x, x_best, eps, p, generator):
    b, c, h, w = x.shape
    s = min(max(int(round(math.sqrt(p * h * w))), 1), h, w)
    mask, _, _ = _windows(b, h, w, s, generator, x.device)
    signs = _signs((b, c, 1, 1), generator, x.device, x.dtype)
    new = torch.where(mask, x + eps * signs, x_best)
    return torch.clamp(new, 0, 1)


def _l2_init(x, eps, generator):
    b, c, h, w = x.shape
    delta = torch.zeros_like(x)
    s = max(h // 5, 1)
    start = (h - s * 5) // 2 if h >= 5 else 0
    block = _eta(s, False, x.device, x.dtype).view(1, 1, s, s)
    vh = start
    for _ in range(h // s):
        vw = start
        for _ in range(w // s):
            delta[:, :, vh : vh + s, vw : vw + s] += block * _signs((b, c, 1, 1), generator, x.device, x.dtype)
            vw += s
        vh += s
    return torch.clamp(x + delta / (_norm(delta) + DIVISION_EPS) * eps, 0, 1)


def _l2_proposal(x, x_best, eps, p, generator):
    b, c, h, w = x.shape
    s = max(int(round(math.sqrt(p * h * w))), 3)
    s = min(s + 1 if s % 2 == 0 else s, h, w)
    delta = x_best - x
    mask1, ii, jj = _windows(b, h, w, s, generator, x.device)
    mask2, _, _ = _windows(b, h, w, s, generator, x.device)
    transpose = bool(torch.rand((), device=x.device, generator=generator) > 0.5)
    eta = _eta(s, transpose, x.device, x.dtype)
    block = eta[ii, jj] * _signs((b, c, 1, 1), generator, x.device, x.dtype)  # the block placed in window 1
    m1 = mask1.to(x.dtype)
    window_norm = (delta * m1).flatten(2).norm(dim=2).view(b, c, 1, 1)  # per channel
    norms_image = _norm(delta)
    norms_windows = _norm(delta * (mask1 | mask2).to(x.dtype))
    new = block + delta / (DIVISION_EPS + window_norm)
    new_norm = (new * m1).flatten(2).norm(dim=2).view(b, c, 1, 1)
    budget = (torch.clamp(eps**2 - norms_image**2, min=0) / c + norms_windows**2).sqrt()
    new = new / (DIVISION_EPS + new_norm) * budget
    delta = torch.where(mask2, 0.0, delta)
    delta = torch.where(mask1, new, delta)
    return torch.clamp(x + delta / (_norm(delta) + DIVISION_EPS) * eps, 0, 1)


def _logits(forward, x):
    logits = forward(x)
    check_logits(logits, x.shape[0], where="the attack's queries")
    return logits


def _single_run(forward, x, y, eps, norm, n_queries, p_init, loss, targeted, rescale, generator):
    """One run of the random search; returns (x_best, fooled). The still-robust rows are kept as a
    compact working set that shrinks only when some row succeeds (no gather/scatter per query)."""
    init, propose = (_linf_init, _linf_proposal) if norm == "linf" else (_l2_init, _l2_proposal)
    x_best = init(x, eps, generator)
    margin, loss_min = _margin_and_loss(_logits(forward, x_best), y, loss, targeted)
    fooled = margin <= 0
    live = (~fooled).nonzero().squeeze(1)
    x_cur, best_cur, y_cur, loss_cur = x[live], x_best[live], y[live], loss_min[live]
    for i in range(n_queries):
        if live.numel() == 0:
            break
        x_new = propose(x_cur, best_cur, eps, p_selection(p_init, i, n_queries, rescale), generator)
        m_new, l_new = _margin_and_loss(_logits(forward, x_new), y_cur, loss, targeted)
        success = m_new <= 0
        accept = (l_new < loss_cur) | success
        loss_cur = torch.where(accept, l_new, loss_cur)
        best_cur = torch.where(accept.view(-1, *([1] * (x.dim() - 1))), x_new, best_cur)
        if bool(success.any()):
            x_best[live] = best_cur
            fooled[live[success]] = True
            keep = ~success
            live, x_cur, best_cur = live[keep], x_cur[keep], best_cur[keep]
            y_cur, loss_cur = y_cur[keep], loss_cur[keep]
    x_best[live] = best_cur
    return x_best, fooled


@torch.no_grad()
def square(
    model,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    eps=8 / 255,
    norm: str = "Linf",
    n_queries: int = 5000,
    n_restarts: int = 1,
    p_init: float = 0.8,
    loss: str = "margin",
    resc_schedule: bool = True,
    seed: int | None = 0,
    targeted: bool = False,
    model_training=False,
    return_fooled: bool = False,
):
    """Square Attack on NCHW inputs (module docstring). y: true labels (target labels when
    ``targeted``; None: the predictions). Later restarts run only on samples still robust. Returns
    x_adv: per sample the first point that succeeds, else the lowest-loss point of the last run."""
    check_attack_inputs(model, x, y, clamp_input=None, name="Square", needs_grad=False)
    if x.dim() != 4:
        raise ValueError(f"x must be NCHW images [B, C, H, W], got shape {tuple(x.shape)}")
    norm = torchattacks_norm(norm)
    eps = check_float("eps", eps, min_value=0.0)
    n_queries = check_int("n_queries", n_queries, 0)
    n_restarts = check_int("n_restarts", n_restarts, 1)
    p_init = check_float("p_init", p_init)
    if not 0 < p_init <= 1:
        raise ValueError(f"p_init must be in (0, 1], got {p_init}")
    if loss not in ("margin", "ce"):
        raise ValueError(f"loss must be 'margin' or 'ce', got {loss!r}")
    generator = make_generator(seed, x.device)
    x = x.detach()
    with attack_context(model, model_training):
        clean = model(x)
        check_logits(clean, x.shape[0], y, where="clean inputs")
        if y is None:
            if targeted:
                raise ValueError("targeted=True needs target labels y")
            y = clean.argmax(1)
        y = y.to(device=x.device, dtype=torch.long)
        pred = clean.argmax(1)
        done = pred == y if targeted else pred != y
        out = x.clone()
        for _ in range(n_restarts):
            live = (~done).nonzero().squeeze(1)
            if live.numel() == 0:
                break
            adv, fooled = _single_run(
                model, x[live], y[live], eps, norm, n_queries, p_init, loss, targeted, resc_schedule, generator
            )
            out[live] = adv
            done[live] = fooled
        fitted = fit_into_ball(out, x, eps, norm)  # float16/bfloat16 rounding
        if fitted is not out:  # a coordinate moved by one unit: decide again on those samples
            moved = (fitted != out).flatten(1).any(1)
            with torch.no_grad():
                logits = model(fitted[moved])
            check_logits(logits, int(moved.sum()), where="the attack's result")
            pred = logits.argmax(1)
            done[moved] = pred == y[moved] if targeted else pred != y[moved]
            out = fitted
        if return_fooled:
            return out, done
        return out


class Square(Attack):
    """Square Attack with torchattacks.Square's signature; the attributes (``eps``, ``n_queries``,
    ...) are read at each call. Supports the default and the targeted modes."""

    options = ("eps", "n_queries", "n_restarts", "p_init", "loss", "seed")

    def __init__(
        self,
        model,
        norm="Linf",
        eps=8 / 255,
        n_queries=5000,
        n_restarts=1,
        p_init=0.8,
        loss="margin",
        resc_schedule=True,
        seed=0,
        verbose=False,
    ):
        super().__init__("Square", model)
        torchattacks_norm(norm)
        self.norm, self.eps, self.n_queries, self.n_restarts, self.p_init = norm, eps, n_queries, n_restarts, p_init
        self.loss, self.rescale_schedule, self.seed, self.verbose = loss, resc_schedule, seed, verbose

    def settings(self) -> dict:
        # torchattacks names the attribute rescale_schedule and the argument resc_schedule
        return dict(super().settings(), resc_schedule=self.rescale_schedule)

    def _attack(self, model, images, labels, options):
        return square(model, images, labels, targeted=self.targeted, model_training=self._training, **options)
