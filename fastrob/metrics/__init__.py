"""Robustness metrics. Each takes a model and ``data`` — a pair (x, y) of tensors or a DataLoader
of (x, y) batches — runs batched with a tqdm progress bar (``quiet=True`` hides it) and returns a
small dataclass with an ``as_dict()`` for JSON. Every attack inside goes through the PGD engine
``fastrob.attacks.pgd``. Each accepts a DistributedSampler-sharded loader and then gives every
rank the global result (``fastrob.metrics._common.shard``, docs/distributed.md).

- ``robust_accuracy(model, data, attack)``: accuracy under any attack(x, y) -> x_adv.
- ``accuracy_curve(model, data, eps_list, norm, attack="pgd")``: robust accuracy over eps (PGD, APGD,
  AutoAttack or a factory eps -> attack), with compaction; ``make_attack`` builds those attacks by name.
- ``ara(model, data, n, kind)``: the accuracy-robustness area (Woods et al. 2019;
  docs/methods.md#adversarial-explanations).
- ``kl_robustness(model, data, eps, norm, steps)``: the prediction-divergence bound (Yu et al. 2019).
- ``interpretation_discrepancy(model, data, attack)``: how much the interpretation maps move
  under an attack (Boopathy et al. 2020); ``discrepancy`` is the per-sample D1/D2.
- ``masking_report(model, data, eps)``: the gradient-masking checks (Athalye et al. 2018; Carlini et al. 2019).
- ``neuron_sensitivity_metric(model, data)`` / ``neuron_sensitivity(model, x, x_adv)``: per-channel
  sensitivity sigma(l, c) (Zhang, Liu et al. 2019); ``top_k_sensitive`` picks the most sensitive channels.

``fastrob.evaluation.EVAL_METRICS`` lists which of them ``fastrob eval`` and the demo report.
"""

from fastrob.metrics.ara import ARAResult, ara, ara_from_radii
from fastrob.metrics.kl import KLRobustness, kl_robustness
from fastrob.metrics.map_discrepancy import InterpretationDiscrepancy, discrepancy, interpretation_discrepancy
from fastrob.metrics.masking import MaskingCheck, MaskingReport, masking_report
from fastrob.metrics.robust import (
    ATTACKS,
    AccuracyCurve,
    RobustAccuracy,
    accuracy_curve,
    describe_attack,
    make_attack,
    robust_accuracy,
)
from fastrob.metrics.sensitivity import (
    NeuronSensitivity,
    neuron_sensitivity,
    neuron_sensitivity_metric,
    top_k_sensitive,
)

__all__ = [
    "ARAResult",
    "AccuracyCurve",
    "InterpretationDiscrepancy",
    "KLRobustness",
    "MaskingCheck",
    "MaskingReport",
    "NeuronSensitivity",
    "RobustAccuracy",
    "ATTACKS",
    "accuracy_curve",
    "describe_attack",
    "make_attack",
    "ara",
    "ara_from_radii",
    "discrepancy",
    "interpretation_discrepancy",
    "kl_robustness",
    "masking_report",
    "neuron_sensitivity",
    "neuron_sensitivity_metric",
    "robust_accuracy",
    "top_k_sensitive",
]
