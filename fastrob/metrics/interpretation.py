"""Deprecated alias of ``fastrob.metrics.map_discrepancy`` (renamed so that it is not confused with
``fastrob.interpret``, the maps, and ``fastrob.regularizers.interpretation``, Int / Int2)."""

import warnings

from fastrob.metrics.map_discrepancy import KINDS, InterpretationDiscrepancy, discrepancy, interpretation_discrepancy

__all__ = ["KINDS", "InterpretationDiscrepancy", "discrepancy", "interpretation_discrepancy"]

warnings.warn(
    "fastrob.metrics.interpretation is deprecated: import from fastrob.metrics.map_discrepancy (or fastrob.metrics)",
    DeprecationWarning,
    stacklevel=2,
)
