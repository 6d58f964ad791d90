"""Robustness metrics. Each takes a model and ``data`` — a pair (x, y) of tensors or a DataLoader
of (x, y) batches — runs batched with a tqdm progress bar (``quiet=True`` hides it) and returns a
small dataclass with an ``as_dict()`` for JSON. Every attack inside goes through the PGD engine
``fastrob.attacks.pgd``.

- ``robust_accuracy(model, data, attack)``: accuracy under any attack(x, y) -> x_adv.
- ``accuracy_curve(model, data, eps_list, norm)``: PGD robust accuracy over eps, with compaction.
- ``ara(model, data, n, kind)``: the accuracy-robustness area (METHODS.md, seed 001).
- ``kl_robustness(model, data, eps, norm, steps)``: the prediction-divergence bound (seed 004).

Extension point: interpretation discrepancy (seed 000) and neuron sensitivity (seed 002) belong
to the seed-methods issue. When it lands, add ``interpretation.py`` / ``sensitivity.py`` here with
the same shape (model, data, ..., quiet) -> dataclass with ``as_dict()``, export them below, and
add one entry each to ``fastrob.evaluation.EVAL_METRICS`` (and a table column) so that
``fastrob eval`` and the demo report them.
"""

from fastrob.metrics.ara import ARAResult, ara, ara_from_radii
from fastrob.metrics.kl import KLRobustness, kl_robustness
from fastrob.metrics.robust import AccuracyCurve, RobustAccuracy, accuracy_curve, robust_accuracy

__all__ = ["ARAResult", "AccuracyCurve", "KLRobustness", "RobustAccuracy", "accuracy_curve", "ara", "ara_from_radii",
           "kl_robustness", "robust_accuracy"]
