"""Optional dependencies. ``import fastrob`` needs only torch, numpy and tqdm; the plots, the digits
data and image folders need more (the ``cli`` extra: matplotlib, scikit-learn, pillow), and the
Triton backend needs triton (the ``triton`` extra; CUDA builds of torch already bring it)."""

from __future__ import annotations

import importlib

INSTALL_HINT = "pip install 'fastrob[cli]'"


class MissingDependency(ImportError):
    """An optional package is missing; the message names it and the extra that installs it."""


def require(module: str, purpose: str, package: str | None = None):
    """``module``, imported; a ``MissingDependency`` saying what needs it and how to install it if
    it is not installed (``package``: its name on the package index when it differs)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependency(
            f"{purpose}: {package or module} is not installed ({INSTALL_HINT})",
            name=module,
        ) from err
