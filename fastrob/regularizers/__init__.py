"""Regularizers: called on (model, x, y), each returns the whole training objective
(``fastrob.objective.Objective``: loss, ce, penalty, logits). See docs/regularizers.md."""

from fastrob.regularizers.input_gradient import InputGradientRegularizer
from fastrob.regularizers.interpretation import InterpretationRegularizer
from fastrob.regularizers.jacobian import JacobianRegularizer
from fastrob.regularizers.jsigr import JSIGRRegularizer
from fastrob.regularizers.lipschitz import LipschitzRegularizer
from fastrob.regularizers.sns import SNSRegularizer

__all__ = [
    "InputGradientRegularizer",
    "InterpretationRegularizer",
    "JacobianRegularizer",
    "JSIGRRegularizer",
    "LipschitzRegularizer",
    "SNSRegularizer",
]
