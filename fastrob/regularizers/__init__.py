"""Regularizers: called on (model, x, y), each returns the whole training objective
(``fastrob.objective.Objective``: loss, ce, penalty, logits). See docs/regularizers.md."""

from fastrob.regularizers.input_gradient import InputGradientRegularizer
from fastrob.regularizers.jacobian import JacobianRegularizer
from fastrob.regularizers.jsigr import JSIGRRegularizer

__all__ = ["InputGradientRegularizer", "JacobianRegularizer", "JSIGRRegularizer"]
