"""Attention whose backward can be differentiated, for the forwards that a gradient penalty runs.

torch's flash and memory-efficient attention kernels (what ``F.scaled_dot_product_attention``
picks on CPU and on most GPUs) have no derivative of their backward: a penalty on an input
gradient of a ViT fails at the user's ``loss.backward()``. Inside ``twice_differentiable_attention()``
every call of ``torch.nn.functional.scaled_dot_product_attention`` (also as
``torch._C._nn.scaled_dot_product_attention`` or imported under another name) runs
``fastrob.ops.attention`` instead, whose backward is differentiable: the Triton kernels on a GPU
once they passed their self-check, else the math formula. The graph it builds is made of ordinary
autograd nodes, so it stays valid after the block: the later ``loss.backward()`` needs no context.

It is a ``TorchFunctionMode``, so no module and no attribute of torch is changed; models whose
attention is written out (softmax of q k^T) are unaffected. docs/attention.md.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fastrob.ops.attention import attention

_SDPA = F.scaled_dot_product_attention  # the same object as torch._C._nn.scaled_dot_product_attention
_active = threading.local()

# the autograd nodes of torch's fused attention, whose backward has no derivative
_FUSED_NODES = ("ScaledDotProductFlash", "ScaledDotProductEfficient", "ScaledDotProductCudnn", "FlashAttention")


class _RouteAttention(TorchFunctionMode):
    def __init__(self, backend: str):
        super().__init__()
        self.backend = backend

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _SDPA:
            return func(*args, **kwargs)
        return _routed(*args, backend=self.backend, **kwargs)


def _routed(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *, backend
):
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        # grouped-query attention: each key/value head serves query.shape[-3] / key.shape[-3] query heads
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    return attention(query, key, value, attn_mask, dropout_p, is_causal, scale, backend=backend)


@contextlib.contextmanager
def twice_differentiable_attention(backend: str = "auto"):
    """Within the block, ``F.scaled_dot_product_attention`` runs ``fastrob.ops.attention`` with
    ``backend`` ("auto" | "torch" | "triton"; "cuda" means "auto": the op has no CUDA twin).
    Nested blocks route once (the outermost block's backend)."""
    if getattr(_active, "on", False):
        yield
        return
    backend = "auto" if backend == "cuda" else backend
    _active.on = True
    try:
        with _RouteAttention(backend):
            yield
    finally:
        _active.on = False


def check_twice_differentiable(out: torch.Tensor, what: str = "the outputs") -> None:
    """Raises a RuntimeError naming the fix when ``out``'s graph holds torch's fused attention, whose
    backward cannot be differentiated (the double backward would fail later, at the user's
    ``loss.backward()``, with no hint). A walk over the graph's nodes, each once."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = type(node).__name__
        if any(name.startswith(prefix) for prefix in _FUSED_NODES):
            raise RuntimeError(
                f"{what} were computed with torch's fused attention ({name}), whose backward cannot be "
                "differentiated, so this penalty could not be trained. Run the model's forward inside "
                "`with fastrob.attention_routing.twice_differentiable_attention():` (or under "
                "torch.nn.attention.sdpa_kernel(SDPBackend.MATH))"
            )
        stack.extend(next_node for next_node, _ in node.next_functions)


__all__ = ["check_twice_differentiable", "twice_differentiable_attention"]
