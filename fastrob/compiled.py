"""Compiled models (``torch.compile``) in the double-backward paths.

A penalty on an input gradient differentiates a backward pass: its parameter gradient is a double
backward through the model. The graph ``torch.compile`` builds (AOTAutograd) has no double
backward: the user's ``loss.backward()`` fails with "torch.compile with aot_autograd does not
currently support double backward", after the minutes the compile took.

fastrob therefore looks at the model before anything runs: a compiled module (torch's
``OptimizedModule``) is replaced, for the double-backward paths only, by the module it wraps
(``model._orig_mod``: the same parameters, buffers and modes, so the gradients are the ones the
compiled model would have had), with one warning per regularizer class and process. The
first-order paths keep the compiled model: the attacks, the metrics and
``InputGradientRegularizer(mode="fd")``, whose finite difference needs no double backward.
"""

from __future__ import annotations

import warnings

import torch

from fastrob.model_output import LogitsOf

_warned: set[str] = set()


def is_compiled(model) -> bool:
    """Whether ``model`` is the module ``torch.compile(module)`` returned (no compile work is done:
    torch compiles at the first call, not at ``torch.compile``)."""
    optimized = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    optimized = getattr(optimized, "OptimizedModule", None)
    return optimized is not None and isinstance(model, optimized)


def eager_for_double_backward(model, who: str):
    """``model``, or the module inside it when it is compiled (see the module docstring); ``who``
    names the caller in the one-time warning."""
    if isinstance(model, LogitsOf) and is_compiled(model.model):  # logits_of(torch.compile(net))
        eager = LogitsOf(eager_for_double_backward(model.model, who), model.key)
        eager.training = model.training  # its own flag only: .train() would reset the inner modules' modes
        return eager
    if not is_compiled(model):
        return model
    if who not in _warned:
        _warned.add(who)
        warnings.warn(
            f"{who}: the model is compiled (torch.compile), and a compiled graph cannot be "
            "differentiated twice (torch's AOTAutograd has no double backward); the penalty runs the "
            "original module (model._orig_mod, the same parameters) eagerly. "
            'InputGradientRegularizer(mode="fd") needs no double backward and keeps the compiled model.',
            stacklevel=3,
        )
    return model._orig_mod
