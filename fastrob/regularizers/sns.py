"""SNS, sensitive neuron stabilizing (Zhang, Liu et al., IEEE TIP; arXiv 1909.06978): adversarial
training plus a penalty that makes the most sensitive channels behave the same on x and x'.
docs/methods.md#neuron-sensitivity: the paper's exact loss and selection rule were not recoverable, so this is
fastrob's documented default."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastrob import functional as Fn
from fastrob._checks import check_float
from fastrob.attacks import AttackConfig, pgd
from fastrob.distributed import unwrap
from fastrob.metrics.sensitivity import FeatureRecorder, channel_deviation, resolve_layers, top_k_count, top_k_sensitive
from fastrob.objective import Objective
from fastrob.regularizers.input_gradient import check_backend


class SNSRegularizer:
    """loss = mean_b CE(f(x'_b), y_b) + lam * penalty, with

        penalty = sum_l mean_{c in S_l} sigma_B(l, c),
        sigma_B(l, c) = (1/B) sum_b ||F_lc(x'_b) - F_lc(x_b)||_1 / dim(F_lc),

    x' = attack(x, y) (default: PGD, ``fastrob.attacks.pgd``, model in eval mode, no gradient
    into the attack), F_l the output of watched layer l (``fastrob.metrics.sensitivity``: by
    default every activation module), and S_l the top-k fraction of layer l's channels by
    sigma_B measured on this batch. The selection is not differentiated through (the indices come
    from the detached sigma_B); the penalty is differentiated through both F(x) and F(x'), so both
    move toward each other. The adversarial CE and the logits are those of x'.

    The forward of x runs in the model's mode but does not move BatchNorm's running statistics
    (they move once, from the adversarial batch, as in PGD adversarial training); with BatchNorm
    in train mode each of the two forwards normalises with its own batch's statistics. Hooks are
    registered for the two forwards of each call and removed afterwards, also after an exception.

    The penalty can be lowered by switching channels off (a channel that is 0 on both x and x' has
    sigma 0), so too large a lam kills the network: on digits (MLP 64-128 wide, eps 0.1, Adam
    2e-3) lam = 1 trained well with ReLU (test accuracy 0.90 after 4 epochs, like PGD-AT) but
    collapsed to chance with the half-Huber ReLU, whose slope vanishes at 0, even with the
    pre-activation Linear outputs watched; lam = 0.05 trained there (0.87). Check the clean
    accuracy, and lower lam if it falls to chance.

    Args:
        attack: a callable attack(x, y) -> x_adv (e.g. ``fastrob.attacks.PGD(model, ...)``); None
            (default) runs ``pgd`` with the next four arguments.
        eps, alpha, steps, norm: the default PGD adversary (alpha None: fastrob.attacks.default_alpha; random
            start). Defaults eps = 0.1, 7 steps, "linf" (fastrob train's defaults on digits).
        lam: the penalty weight, >= 0 (default 1.0: not fixed by the paper; fastrob's choice).
        k: the top-k fraction in (0, 1] (default 0.1), or an int count of channels per layer.
        layers: the watched layers (None: the defaults of ``fastrob.metrics.sensitivity``), as
            module names or modules of the model the regularizer is called with (of its wrapped
            module under DistributedDataParallel).
        generator: torch.Generator for the default PGD's random start.
        backend: "auto" | "torch" | "triton" | "cuda", for the cross-entropy and the default PGD's
            fused step (``check_backend``).
    """

    def __init__(
        self,
        attack: Callable | None = None,
        *,
        eps: float = 0.1,
        alpha: float | None = None,
        steps: int = 7,
        norm: str = "linf",
        lam: float = 1.0,
        k=0.1,
        layers=None,
        generator: torch.Generator | None = None,
        backend: str = "auto",
    ):
        if attack is not None and not callable(attack):
            raise TypeError(f"attack must be callable as attack(x, y) -> x_adv, got {type(attack).__name__}")
        self.attack = attack
        config = AttackConfig(eps=eps, alpha=alpha, steps=steps, norm=norm)  # the default PGD adversary
        self.eps, self.alpha, self.steps, self.norm = config.eps, config.step_size, config.steps, config.norm
        self.lam = check_float("lam", lam, min_value=0.0)
        top_k_count(1, k)  # checks k
        self.k = k
        self.layers = layers
        self.generator = generator
        self.backend = check_backend(backend, "SNSRegularizer")

    def __repr__(self):
        adversary = (
            repr(self.attack)
            if self.attack is not None
            else (f"PGD(eps={self.eps}, alpha={self.alpha}, steps={self.steps}, norm={self.norm!r})")
        )
        return f"SNSRegularizer({adversary}, lam={self.lam}, k={self.k}, layers={self.layers!r})"

    def adversary(self, model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.attack is not None:
            return self.attack(x, y)
        return pgd(
            model,
            x,
            y,
            eps=self.eps,
            alpha=self.alpha,
            steps=self.steps,
            norm=self.norm,
            backend=self.backend,
            generator=self.generator,
        )

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor) -> Objective:
        x, y = Fn.check_inputs(model, x, y)
        x = x.detach()  # no input gradient is needed here
        # Under DDP the layers are the wrapped module's, and the clean forward skips the wrapper:
        # the step makes one DDP forward (the loss's, at x_adv), whose backward all-reduces once.
        module = unwrap(model)
        names = [name for name, _ in resolve_layers(module, self.layers)]
        x_adv = self.adversary(model, x, y).detach()
        if x_adv.shape != x.shape:
            raise ValueError(f"attack must return x_adv of x's shape {tuple(x.shape)}, got {tuple(x_adv.shape)}")
        with FeatureRecorder(module, names) as rec:
            with Fn.preserved_buffers(module):
                module(x)
            clean = rec.features
            rec.clear()
            logits = Fn.forward(model, x_adv, y)
            adv = rec.features
        if clean.keys() != adv.keys():
            raise ValueError(f"the watched layers ran differently on x and x_adv: {sorted(clean)} vs {sorted(adv)}")
        penalty = logits.new_zeros((), dtype=torch.promote_types(logits.dtype, torch.float32))
        for name in clean:
            sigma = channel_deviation(adv[name], clean[name]).mean(0)  # [C], differentiable
            chosen = top_k_sensitive(sigma.detach(), self.k)
            penalty = penalty + sigma[chosen].mean()
        ce = Fn.per_sample_cross_entropy(logits, y, self.backend).mean()
        return Objective(ce + self.lam * penalty, ce, penalty, logits)
