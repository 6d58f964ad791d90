"""The old names of renamed modules and functions keep working, with a DeprecationWarning:
fastrob.training -> fastrob.adversarial_training, fastrob.metrics.interpretation ->
fastrob.metrics.map_discrepancy, fastrob.functional.cross_entropy -> per_sample_cross_entropy."""

import importlib
import sys

import pytest
import torch

import fastrob
from fastrob import adversarial_training, functional
from fastrob.metrics import map_discrepancy


def _import_fresh(name):
    sys.modules.pop(name, None)  # the warning is the module's import; make it run again
    return importlib.import_module(name)


@pytest.mark.parametrize(
    "old, new, names",
    [
        ("fastrob.training", adversarial_training, ("adversarial_loss", "KINDS")),
        (
            "fastrob.metrics.interpretation",
            map_discrepancy,
            ("discrepancy", "interpretation_discrepancy", "InterpretationDiscrepancy", "KINDS"),
        ),
    ],
)
def test_an_old_module_warns_and_gives_the_same_objects(old, new, names):
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated: import .*{new.__name__}"):
        module = _import_fresh(old)
    for name in names:
        assert getattr(module, name) is getattr(new, name)


def test_importing_fastrob_imports_no_deprecated_module():
    # the package itself uses the new names only; the old ones load on first use
    code = (
        "import sys, warnings; warnings.simplefilter('error', DeprecationWarning); import fastrob; "
        "assert 'fastrob.training' not in sys.modules and 'fastrob.metrics.interpretation' not in sys.modules"
    )
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True)


def test_fastrob_training_attribute_still_resolves():
    sys.modules.pop("fastrob.training", None)
    vars(fastrob).pop("training", None)
    with pytest.warns(DeprecationWarning):
        assert fastrob.training.adversarial_loss is fastrob.adversarial_loss
    with pytest.raises(AttributeError, match="no attribute 'trainingg'"):
        _ = fastrob.trainingg


def test_the_functional_cross_entropy_is_renamed():
    torch.manual_seed(0)
    z, y = torch.randn(5, 4), torch.randint(0, 4, (5,))
    expected = torch.nn.functional.cross_entropy(z, y, reduction="none")
    torch.testing.assert_close(functional.per_sample_cross_entropy(z, y), expected)
    with pytest.warns(DeprecationWarning, match="per_sample_cross_entropy"):
        old = functional.cross_entropy(z, y)
    torch.testing.assert_close(old, expected)
