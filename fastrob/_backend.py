"""Which backends exist on this machine, and which one an op runs on.

Three backends implement every fused op (docs/design.md#backends-and-dispatch):
  torch   the pure-torch reference: any device, any floating dtype; what ``auto`` uses on CPU
  triton  Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (for testing)
  cuda    the fastrob._C extension: CUDA tensors only

Availability is detected once per process and cached, failures included, each with a reason that
``fastrob info`` prints. Triton reads TRITON_INTERPRET when its kernels are defined, so set it
before importing fastrob.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from fastrob._checks import dtype_name

BACKENDS = ("auto", "torch", "triton", "cuda")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here; ``reason`` says what it runs on, or why not."""

    name: str
    available: bool
    reason: str


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def cuda_device_available() -> bool:
    return torch.cuda.is_available()


@functools.cache
def extension_build_record() -> dict:
    """What setup.py recorded when it built (or skipped) fastrob._C."""
    path = Path(__file__).with_name("_C_build.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"built": False, "reason": "no build record: fastrob was not installed through setup.py"}


@functools.cache
def _load_extension():
    """(module or None, reason)."""
    try:
        return importlib.import_module("fastrob._C"), ""
    except ImportError as err:
        record = extension_build_record()
        if not record.get("built"):
            return None, f"fastrob._C was not built: {record.get('reason', 'unknown reason')}"
        return None, f"fastrob._C was built but does not import: {err}"


def extension():
    """The fastrob._C module; raises RuntimeError saying why when it is not usable here."""
    module, reason = _load_extension()
    if module is None:
        raise RuntimeError(reason)
    return module


@functools.cache
def status(name: str) -> BackendStatus:
    if name == "torch":
        return BackendStatus("torch", True, f"torch {torch.__version__}: the reference, on any device")
    if name == "triton":
        try:
            triton = importlib.import_module("triton")
        except ImportError as err:
            return BackendStatus("triton", False, f"triton is not installed ({err})")
        if cuda_device_available():
            return BackendStatus("triton", True, f"triton {triton.__version__} on CUDA tensors")
        if triton_interpreter():
            return BackendStatus(
                "triton",
                True,
                f"triton {triton.__version__} through TRITON_INTERPRET=1 on CPU tensors (slow: for testing)",
            )
        return BackendStatus(
            "triton",
            False,
            f"triton {triton.__version__} is installed but no CUDA GPU is visible "
            "(set TRITON_INTERPRET=1 before importing fastrob to run its kernels on CPU, for testing)",
        )
    if name == "cuda":
        module, reason = _load_extension()
        if module is None:
            return BackendStatus("cuda", False, reason)
        count, why = module.device_count()
        if count <= 0 or not cuda_device_available():
            why = _driver_problem(module.driver_version(), module.cuda_runtime_version) or why or "no CUDA device"
            return BackendStatus("cuda", False, f"fastrob._C is built but cannot run here: {why}")
        return BackendStatus("cuda", True, f"fastrob._C (CUDA runtime {_version(module.cuda_runtime_version)})")
    raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {name!r}")


def _driver_problem(driver: int, runtime: int) -> str:
    """Why the CUDA runtime fastrob._C links cannot start, told from the driver's CUDA version
    (0: no driver), or "" when the driver is new enough (the problem is elsewhere, e.g. no GPU)."""
    if driver == 0:
        return "no NVIDIA driver is installed (or none is visible to this process)"
    if driver < runtime:
        return (
            f"the NVIDIA driver supports CUDA up to {_version(driver)}, but fastrob._C was built with the CUDA "
            f"{_version(runtime)} runtime: install a newer driver (CUDA 13.0 needs R580 or newer), or reinstall "
            "fastrob with an nvcc no newer than the driver's CUDA version"
        )
    return ""


def _capability(arch: str) -> tuple[int, int]:
    return int(arch[:-1]), int(arch[-1])


def extension_runs_on(capability: tuple[int, int]) -> bool:
    """Whether fastrob._C has code for a GPU of this compute capability: machine code for an
    architecture of the same major version and no higher minor, or PTX that the driver can compile
    for a newer GPU (for the architectures in the record's "ptx"; a record without that key is from
    a build that always added PTX for its last architecture)."""
    record = extension_build_record()
    archs = [_capability(a) for a in record.get("archs", [])]
    if not archs:
        return False
    ptx = [_capability(a) for a in record["ptx"]] if "ptx" in record else archs[-1:]
    return any(major == capability[0] and minor <= capability[1] for major, minor in archs) or any(
        capability >= p for p in ptx
    )


def _version(code: int) -> str:
    return f"{code // 1000}.{code % 1000 // 10}"


def check_backend_name(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


def _extension_runs_on_device(device: torch.device) -> bool:
    return extension_runs_on(torch.cuda.get_device_capability(device))


# Test hook: True makes ``auto`` treat CPU tensors as a GPU target (CUDA extension, then Triton
# through TRITON_INTERPRET=1, each self-checked), so that the verification path runs without a GPU.
AUTO_KERNELS_ON_CPU = False

_warned_fallback = False
_warned_no_kernels: set[str] = set()
_auto_choice: dict[tuple, str] = {}


# The kernel-trust policy: (op, backend, device, dtype) -> None when ``auto`` may use that fused
# kernel, else the failed check (a fastrob.selfchecks.CheckResult). fastrob.verify registers its
# ``trusted`` when imported (fastrob/__init__ imports it); until then no kernel is trusted.
_trust_policy = None


def set_trust_policy(policy) -> None:
    """Makes ``policy(op, backend, device, dtype)`` decide which fused kernels ``auto`` may use, and
    forgets ``auto``'s earlier choices."""
    global _trust_policy
    if not callable(policy):
        raise TypeError(f"policy must be callable, got {type(policy).__name__}")
    _trust_policy = policy
    clear_auto_cache()


def fused_backends_for(device: torch.device) -> list[str]:
    """The fused backends that can run on ``device``, in ``auto``'s order of preference."""
    names = []
    if device.type == "cuda" and status("cuda").available and _extension_runs_on_device(device):
        names.append("cuda")
    if status("triton").available and (device.type == "cuda" or (device.type == "cpu" and triton_interpreter())):
        names.append("triton")
    return names


def _auto(op: str, device: torch.device, dtype: torch.dtype, fused: tuple = ("cuda", "triton")) -> str:
    """``auto``'s choice for a GPU target: the first fused backend (cuda, then triton) among those
    the op has kernels for (``fused``) that the trust policy accepts (fastrob.verify's: the record
    covers it or its self-check passes), else torch; cached per (op, device, dtype), so that each
    failing kernel warns once per process."""
    candidates = tuple(name for name in fused_backends_for(device) if name in fused)
    key = (op, str(device), dtype, candidates)
    if key in _auto_choice:
        return _auto_choice[key]
    if _trust_policy is None:
        return "torch"
    failed = []
    choice = "torch"
    for name in candidates:
        failure = _trust_policy(op, name, device, dtype)
        if failure is None:
            choice = name
            break
        failed.append(failure)
    for failure in failed:
        detail = failure.error or f"max error {failure.max_error:.3g}, {failure.ratio:.3g} x the tolerance"
        warnings.warn(
            f"fastrob: the {failure.backend} kernel of {op} failed its self-check on {device} "
            f"({failure.dtype}: {detail}); backend='auto' uses {choice} instead "
            "(`fastrob check` prints every kernel's check)",
            RuntimeWarning,
            stacklevel=4,
        )
    _auto_choice[key] = choice
    return choice


def clear_auto_cache() -> None:
    """Forgets ``auto``'s choices (tests; after the record changed)."""
    _auto_choice.clear()


def resolve(
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    op: str,
    dtypes: tuple = KERNEL_DTYPES,
    fused: tuple = ("cuda", "triton"),
) -> str:
    """The backend that runs ``op`` on tensors of ``device`` and ``dtype``; ``fused`` names the
    fused backends that have kernels for ``op`` (``auto`` never picks another one).

    An explicitly requested backend that cannot run raises RuntimeError (unavailable, wrong
    device) or TypeError (dtype its kernels do not support). ``auto`` never raises for those
    reasons: it uses the torch reference on CPU, and on a GPU the CUDA extension, then Triton,
    each only once the record or a self-check vouches for it (fastrob.verify), then torch,
    warning once per process if a GPU tensor falls back to torch for want of a fused backend.
    """
    check_backend_name(backend)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if dtype not in dtypes or not (device.type == "cuda" or (AUTO_KERNELS_ON_CPU and device.type == "cpu")):
            return "torch"
        available = fused_backends_for(device)
        if any(name in fused for name in available):
            return _auto(op, device, dtype, fused)
        if available:  # fused backends run here, but none has kernels of this op
            if op not in _warned_no_kernels:
                _warned_no_kernels.add(op)
                warnings.warn(
                    f"fastrob: {op} has no kernels for the fused backends that run here ({', '.join(available)}; "
                    f"its kernels: {', '.join(fused)}), so backend='auto' uses the torch reference",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return "torch"
        global _warned_fallback
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn(
                f"fastrob: no fused backend can run on this GPU, so {op} and the other fused ops use the torch "
                f"reference (cuda: {status('cuda').reason}; triton: {status('triton').reason})",
                RuntimeWarning,
                stacklevel=3,
            )
        return "torch"
    st = status(backend)
    if not st.available:
        raise RuntimeError(f"{op}: backend={backend!r} is unavailable: {st.reason}")
    if backend == "cuda" and device.type != "cuda":
        raise RuntimeError(f"{op}: backend='cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "cuda" and not _extension_runs_on_device(device):
        raise RuntimeError(
            f"{op}: backend='cuda': fastrob._C was not compiled for {device} "
            f"(compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))}); "
            "reinstall with FASTROB_CUDA_ARCH naming it"
        )
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreter()):
        raise RuntimeError(
            f"{op}: backend='triton' needs CUDA tensors, got tensors on {device} "
            "(CPU tensors run only under TRITON_INTERPRET=1, set before importing fastrob)"
        )
    if dtype not in dtypes:
        names = ", ".join(map(dtype_name, dtypes))
        raise TypeError(
            f"{op}: backend={backend!r} supports {names}; got {dtype_name(dtype)} "
            "(backend='torch' runs any floating dtype)"
        )
    return backend
