"""What every attack does around its loop: the model in eval mode with its parameters frozen (and
both restored afterwards), and the checks of the model and the input that an attack needs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from fastrob._checks import check_labels, check_model, check_model_input, check_tensor


@contextlib.contextmanager
def attack_context(model, training: bool | Callable = False):
    """Runs the block with ``model`` in eval mode (``training=True``: train mode; a callable:
    called with the model to set modes itself) and every parameter's requires_grad off, so the
    backward computes input gradients only. Restores each module's ``training`` and each
    parameter's ``requires_grad`` on exit, also after an exception."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in params:
            p.requires_grad_(False)
        if callable(training):
            training(model)
        else:
            model.train(bool(training))
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in params:
            p.requires_grad_(flag)


def amp_forward(model, amp, device_type: str) -> Callable:
    """model's forward, under bfloat16 autocast on ``device_type`` when amp == "bf16" (amp as
    checked by ``config.check_amp``)."""
    if amp is None:
        return model

    def forward(inp):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return model(inp)

    return forward


def check_grad_mode(name: str = "the attack") -> None:
    """Attacks differentiate the model with respect to its input: not possible under inference mode."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{name} needs input gradients and cannot run under torch.inference_mode(); "
            "call it outside the inference_mode block (torch.no_grad() is fine: attacks enable "
            "gradients themselves)"
        )


def check_attack_inputs(
    model,
    x: torch.Tensor,
    y,
    clamp_input: bool | None = False,
    name: str = "the attack",
    x_name: str = "x",
    needs_grad: bool = True,
) -> None:
    """The model, x ([B, ...], no NaN, in [0, 1] unless ``clamp_input``; None: the attack has no
    clamp_input option) and the labels y [B] (or None). ``needs_grad``: the attack differentiates
    the model (a score-based attack such as Square does not, and runs under inference mode)."""
    check_model(model)
    check_tensor(x_name, x, min_dim=2)
    check_model_input(model, x, allow_autocast=False)
    if needs_grad:
        check_grad_mode(name)
    if bool(torch.isnan(x).any()):
        raise ValueError(f"{x_name} contains NaN")
    if not clamp_input and x.numel() and (bool(x.min() < 0) or bool(x.max() > 1)):
        hint = "; pass clamp_input=True to clamp it" if clamp_input is False else ""
        raise ValueError(
            f"{x_name} must lie in [0, 1] (got values in [{x.min().item():.4g}, {x.max().item():.4g}]){hint}"
        )
    if y is not None:
        check_labels(y, x.shape[0])
