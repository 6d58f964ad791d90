"""fastrob: fast robust and interpretable classification for PyTorch.

Regularizers, attacks and metrics for robust classifiers, with the double backprop and the PGD
step fused into Triton and CUDA kernels behind pure-torch references. See the README.
"""

from importlib.metadata import PackageNotFoundError, version

from fastrob import attacks, data, distributed, functional, metrics, models, nn, ops, regularizers, training
from fastrob.attacks import FGSM, PGD, PGDL2, pgd
from fastrob.metrics import accuracy_curve, ara, kl_robustness, robust_accuracy
from fastrob.objective import Objective
from fastrob.ops import bias_act, cross_entropy, pgd_step, sqnorm
from fastrob.regularizers import InputGradientRegularizer, JacobianRegularizer, JSIGRRegularizer
from fastrob.training import adversarial_loss

try:
    __version__ = version("fastrob")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "attacks", "data", "distributed", "functional", "metrics", "models", "nn", "ops", "regularizers", "training",
    "InputGradientRegularizer", "JacobianRegularizer", "JSIGRRegularizer",
    "FGSM", "PGD", "PGDL2", "pgd", "adversarial_loss",
    "accuracy_curve", "ara", "kl_robustness", "robust_accuracy",
    "Objective", "bias_act", "cross_entropy", "pgd_step", "sqnorm",
    "__version__",
]
