"""fastrob: fast robust and interpretable classification for PyTorch.

Regularizers, attacks and metrics for robust classifiers, with the double backprop and the PGD
step fused into Triton and CUDA kernels behind pure-torch references. See the README.
"""

from importlib.metadata import PackageNotFoundError, version

from fastrob import (
    adversarial_training,
    attacks,
    data,
    distributed,
    functional,
    interpret,
    methods,
    metrics,
    models,
    nn,
    ops,
    regularizers,
    verify,  # noqa: F401  (registers backend="auto"'s kernel-trust policy: _backend.set_trust_policy)
)
from fastrob.adversarial_training import adversarial_loss
from fastrob.attacks import FGSM, PGD, PGDL2, adversarial_explanation, isa, pgd
from fastrob.metrics import (
    accuracy_curve,
    ara,
    interpretation_discrepancy,
    kl_robustness,
    neuron_sensitivity,
    neuron_sensitivity_metric,
    robust_accuracy,
)
from fastrob.objective import Objective
from fastrob.ops import batch_norm, bias_act, cross_entropy, pgd_step, sqnorm
from fastrob.regularizers import (
    InputGradientRegularizer,
    InterpretationRegularizer,
    JacobianRegularizer,
    JSIGRRegularizer,
    LipschitzRegularizer,
    SNSRegularizer,
)

try:
    __version__ = version("fastrob")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "adversarial_training",
    "attacks",
    "data",
    "distributed",
    "functional",
    "interpret",
    "methods",
    "metrics",
    "models",
    "nn",
    "ops",
    "regularizers",
    "InputGradientRegularizer",
    "InterpretationRegularizer",
    "JacobianRegularizer",
    "JSIGRRegularizer",
    "LipschitzRegularizer",
    "SNSRegularizer",
    "FGSM",
    "PGD",
    "PGDL2",
    "adversarial_explanation",
    "isa",
    "pgd",
    "adversarial_loss",
    "accuracy_curve",
    "ara",
    "interpretation_discrepancy",
    "kl_robustness",
    "neuron_sensitivity",
    "neuron_sensitivity_metric",
    "robust_accuracy",
    "Objective",
    "batch_norm",
    "bias_act",
    "cross_entropy",
    "pgd_step",
    "sqnorm",
    "__version__",
]
