"""Logits from any model output: ``logits_of(model, key)`` wraps a model that returns a tuple, a
dict or an output object (HuggingFace's ``ModelOutput``, a dataclass, a named tuple) so that it
returns the logits tensor alone, which is what every regularizer, attack and metric takes.

A wrapper module is the one way for all of them: each takes a model, so the wrapped model goes
anywhere the plain one would (``Objective``, ``PGD``, ``robust_accuracy``, ``Trainer``), and it
keeps the wrapped model's parameters, buffers, modes and ``state_dict`` (under ``model.``)::

    net = fastrob.logits_of(hf_model, "logits")      # out.logits / out["logits"]
    net = fastrob.logits_of(two_head_model, 0)       # out[0]
    net = fastrob.logits_of(model, lambda out: out["heads"]["cls"])

``describe_output`` is what the package's output checks say about an output that is not a tensor:
its type, the keys or attributes it offers, and the ``logits_of`` call that picks one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

Key = int | str | Callable


def _fields(output) -> list[str]:
    """The names an output offers: a mapping's keys, a dataclass's or named tuple's fields."""
    if isinstance(output, Mapping):
        return [str(k) for k in output.keys()]
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return [f.name for f in dataclasses.fields(output)]
    if isinstance(output, tuple) and hasattr(output, "_fields"):
        return list(output._fields)
    if hasattr(output, "__dict__"):
        return [name for name, value in vars(output).items() if isinstance(value, torch.Tensor)]
    return []


def _tensor_names(output) -> list[str]:
    """The fields of ``output`` that hold tensors (the candidates for the logits), else all fields."""
    names = _fields(output)
    tensors = [n for n in names if isinstance(_get(output, n, strict=False), torch.Tensor)]
    return tensors or names


def _get(output, name: str, strict: bool = True):
    # a mapping's entries only: its attributes are methods (a "values" key must not find dict.values)
    if isinstance(output, Mapping):
        if name in output:
            return output[name]
    elif hasattr(output, name):
        return getattr(output, name)
    if strict:
        raise KeyError(name)
    return None


def describe_output(output) -> str:
    """A sentence for an error: what the model returned and how to pick its logits."""
    kind = type(output).__name__
    if isinstance(output, (tuple, list)):
        names = _tensor_names(output) if hasattr(output, "_fields") else []
        if names:
            return f"{kind} with fields {names}: wrap the model as fastrob.logits_of(model, {names[0]!r})"
        tensors = [i for i, v in enumerate(output) if isinstance(v, torch.Tensor)]
        at = f" (tensors at positions {tensors})" if tensors else ""
        first = tensors[0] if tensors else 0
        return f"{kind} of {len(output)} items{at}: wrap the model as fastrob.logits_of(model, {first})"
    names = _tensor_names(output)
    if names:
        pick = "logits" if "logits" in names else names[0]
        return f"{kind} with keys {names}: wrap the model as fastrob.logits_of(model, {pick!r})"
    return (
        f"{kind}: wrap the model as fastrob.logits_of(model, key) with key an int index, a key or "
        "attribute name, or a function of the output that returns the logits"
    )


def select(output, key: Key):
    """``output[key]`` for an int; the key or attribute ``key`` for a str; ``key(output)`` for a
    callable. A missing key raises an error listing what the output offers."""
    if callable(key) and not isinstance(key, (int, str)):
        return key(output)
    if isinstance(key, int):
        if not isinstance(output, Sequence) or isinstance(output, str):
            raise TypeError(f"logits_of: key {key} is an index, but the model returned a {describe_output(output)}")
        if not -len(output) <= key < len(output):
            raise IndexError(
                f"logits_of: key {key} is out of range for the model's {type(output).__name__} of {len(output)} items"
            )
        return output[key]
    try:
        return _get(output, key)
    except KeyError:
        raise KeyError(
            f"logits_of: the model's output has no key or attribute {key!r}; it is a {describe_output(output)}"
        ) from None


class LogitsOf(nn.Module):
    """``select(model(*args, **kwargs), key)``: the logits tensor of a model whose output is a
    tuple, a dict or an object (see the module docstring). Built by ``logits_of``."""

    def __init__(self, model, key: Key = "logits"):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be callable (an nn.Module), got {type(model).__name__}")
        if isinstance(key, bool) or not (isinstance(key, (int, str)) or callable(key)):
            raise TypeError(
                f"key must be an int index, a str key or attribute name, or a callable of the output, "
                f"got {type(key).__name__}"
            )
        self.model = model  # a Module is registered as a child; a plain function is kept as is
        self.key = key

    def forward(self, *args, **kwargs):
        return select(self.model(*args, **kwargs), self.key)

    def extra_repr(self) -> str:
        return f"key={self.key!r}" if isinstance(self.key, (int, str)) else f"key={getattr(self.key, '__name__', 'fn')}"


def logits_of(model, key: Key = "logits") -> LogitsOf:
    """The model returning only its logits: ``key`` is an int index (tuple or list output), a str
    key or attribute name (dict, ``ModelOutput``, dataclass, named tuple; default "logits"), or a
    callable that takes the output and returns the logits. See the module docstring."""
    return LogitsOf(model, key)
