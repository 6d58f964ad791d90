"""Fused ops. Each has one public function with ``backend="auto"|"torch"|"triton"|"cuda"`` and a
pure-torch ``*_reference`` that defines what it computes (docs/design.md#backends-and-dispatch)."""

from fastrob.ops.attention import attention, attention_reference
from fastrob.ops.batch_norm import batch_norm, batch_norm_reference
from fastrob.ops.bias_act import bias_act, bias_act_reference
from fastrob.ops.cross_entropy import cross_entropy, cross_entropy_reference
from fastrob.ops.layer_norm import layer_norm, layer_norm_reference
from fastrob.ops.pgd_step import pgd_step, pgd_step_reference
from fastrob.ops.sqnorm import sqnorm, sqnorm_reference

__all__ = [
    "attention",
    "attention_reference",
    "batch_norm",
    "batch_norm_reference",
    "bias_act",
    "bias_act_reference",
    "cross_entropy",
    "cross_entropy_reference",
    "layer_norm",
    "layer_norm_reference",
    "pgd_step",
    "pgd_step_reference",
    "sqnorm",
    "sqnorm_reference",
]
