"""The forwards that a gradient penalty differentiates twice, routed to ops whose backward is
differentiable, and cheaply so.

Two of torch's ops make the double backward of a modern model fail or crawl:

- attention: torch's flash and memory-efficient kernels (what ``F.scaled_dot_product_attention``
  picks on CPU and on most GPUs) have no derivative of their backward, so a penalty on an input
  gradient of a ViT fails at the user's ``loss.backward()``. Inside ``twice_differentiable()`` it
  runs ``fastrob.ops.attention``, whose backward is differentiable: the Triton kernels on a GPU
  once they passed their self-check, else the math formula. docs/attention.md.
- grouped convolution (depthwise ones in ConvNeXt, EfficientNet, MobileNet): torch differentiates
  its backward with one convolution per group. Inside the block ``conv1d/2d/3d`` with groups > 1
  runs ``fastrob.grouped_conv.grouped_conv``, whose derivatives stay on native grouped kernels.

The graph either builds is made of ordinary autograd nodes, so it stays valid after the block: the
later ``loss.backward()`` needs no context. It is a ``TorchFunctionMode``, so no module and no
attribute of torch is changed; models whose attention is written out (softmax of q k^T) are
unaffected, and so is every other op.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fastrob._backend import check_backend_name
from fastrob.grouped_conv import grouped_conv
from fastrob.ops.attention import attention

_SDPA = F.scaled_dot_product_attention  # the same object as torch._C._nn.scaled_dot_product_attention
_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}  # the same objects as torch.conv1d, ...: spatial dims
_active = threading.local()

# the autograd nodes of torch's fused attention, whose backward has no derivative
_FUSED_NODES = ("ScaledDotProductFlash", "ScaledDotProductEfficient", "ScaledDotProductCudnn", "FlashAttention")


class _Route(TorchFunctionMode):
    def __init__(self, backend: str):
        super().__init__()
        self.backend = backend

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            return _routed_attention(*args, backend=self.backend, **kwargs)
        if func in _CONVS:
            out = _routed_conv(*args, dims=_CONVS[func], **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


def _routed_conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, dims):
    """grouped_conv where torch's double backward loops over groups and a graph is being built;
    None for torch's own convolution (groups = 1 is fast there, and so is a forward without grad)."""
    if groups == 1 or not torch.is_grad_enabled() or not isinstance(input, torch.Tensor):
        return None
    if not any(t is not None and t.requires_grad for t in (input, weight, bias)):
        return None
    return grouped_conv(input, weight, bias, stride, padding, dilation, groups, dims=dims)


def _routed_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *, backend
):
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        # grouped-query attention: each key/value head serves query.shape[-3] / key.shape[-3] query heads
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    return attention(query, key, value, attn_mask, dropout_p, is_causal, scale, backend=backend)


@contextlib.contextmanager
def twice_differentiable(backend: str = "auto"):
    """Within the block, ``F.scaled_dot_product_attention`` runs ``fastrob.ops.attention`` with
    ``backend`` ("auto" | "torch" | "triton"; "cuda" means "auto": the op has no CUDA twin), and
    grouped convolutions run ``fastrob.grouped_conv`` (module docstring). Nested blocks route once
    (the outermost block's backend)."""
    backend = check_backend_name(backend)  # refused at the block, not at the first attention call
    if getattr(_active, "on", False):
        yield
        return
    backend = "auto" if backend == "cuda" else backend
    _active.on = True
    try:
        with _Route(backend):
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
                f"{what} were computed with torch's fused attention ({name}), whose backward has no "
                "derivative, so a gradient penalty or gradient maps built on them cannot be differentiated. "
                "Run the model's forward inside `with fastrob.routing.twice_differentiable():` (or under "
                "torch.nn.attention.sdpa_kernel(SDPBackend.MATH))"
            )
        stack.extend(next_node for next_node, _ in node.next_functions)


__all__ = ["check_twice_differentiable", "twice_differentiable"]
