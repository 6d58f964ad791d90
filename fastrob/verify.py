"""Kernels that prove themselves before ``backend="auto"`` trusts them.

The record ``fastrob/verified.json`` (shipped with the package) lists, per (op, backend, compute
capability), the evidence that the fused kernel was verified on real hardware: the device, the torch
and Triton versions, the date and what passed. ``auto`` on a GPU uses a fused backend for an op when
the record covers it, or else after the op's self-check (fastrob.selfchecks) passed once in this
process for that (op, backend, device, dtype); a kernel that fails or raises is not used, with one
warning. FASTROB_VERIFY=0 trusts every kernel without checking; FASTROB_VERIFY=always checks even the
recorded ones.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import warnings
from pathlib import Path

import torch

from fastrob import _backend
from fastrob._checks import dtype_name
from fastrob.ops._registry import fused_op
from fastrob.selfchecks import OPS, CheckResult, run_check

RECORD_PATH = Path(__file__).with_name("verified.json")
SCHEMA = 1
MODES = ("0", "1", "always")


def verify_mode() -> str:
    """FASTROB_VERIFY: "1" (default: recorded or self-checked), "0" (trust), "always" (check all)."""
    mode = os.environ.get("FASTROB_VERIFY", "1").strip().lower() or "1"
    if mode not in MODES:
        raise ValueError(f"FASTROB_VERIFY must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def capability_of(device: torch.device) -> str:
    """ "9.0" for an H100/H200; "interpreter" for CPU tensors run through TRITON_INTERPRET=1 (tests)."""
    if device.type == "cuda":
        return ".".join(map(str, torch.cuda.get_device_capability(device)))
    return "interpreter"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, Triton interpreter)"


# the fields of an entry (record_entries writes them): strings, and the evidence as a list of strings
ENTRY_FIELDS = ("op", "backend", "capability", "device", "torch", "triton", "date")


def load_record(path: Path | None = None) -> dict:
    """The record: {"schema": 1, "entries": [{op, backend, capability, device, torch, triton, date,
    passed}, ...]}. A missing file is an empty record; so is a malformed one (not JSON, another schema,
    an entry that is not an object or lacks a field), after one warning naming the file and what is
    wrong: a record is data read from disk, never trusted unless well formed and never fatal."""
    path = Path(path) if path is not None else RECORD_PATH
    try:
        record = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {"schema": SCHEMA, "entries": []}
    except OSError as err:
        return _ignored(path, f"cannot be read ({err.strerror or err})")
    except (ValueError, RecursionError) as err:  # not JSON (or not UTF-8), or nested too deep to parse
        return _ignored(path, f"is not JSON ({str(err) or type(err).__name__})")
    problem = record_problem(record)
    return _ignored(path, problem) if problem else record


def record_problem(record) -> str | None:
    """What makes a parsed record malformed, or None when it is well formed."""
    if not isinstance(record, dict):
        return f"holds {_json_type(record)}, not an object"
    schema = record.get("schema")
    if type(schema) is not int or schema != SCHEMA:  # (True == 1 in Python)
        return f"has schema {_json_type(schema)}, and this fastrob reads schema {SCHEMA}"
    entries = record.get("entries")
    if not isinstance(entries, list):
        return f"has 'entries' {_json_type(entries)}, not a list"
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            return f"entry {i} is {_json_type(entry)}, not an object"
        for field in ENTRY_FIELDS:
            if not isinstance(entry.get(field), str) or not entry[field]:
                return f"entry {i} has {field!r} {_json_type(entry.get(field))}, not a non-empty string"
        passed = entry.get("passed")
        if not isinstance(passed, list) or not passed or not all(isinstance(p, str) for p in passed):
            return f"entry {i} has 'passed' {_json_type(passed)}, not a non-empty list of strings"
    return None


def _json_type(value) -> str:
    if value is None:
        return "null (or missing)"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    shown = f" {value!r}" if isinstance(value, (int, float, str)) else ""
    return names.get(type(value), type(value).__name__) + (shown if len(shown) <= 40 else shown[:36] + "...")


def _ignored(path: Path, problem: str) -> dict:
    warnings.warn(
        f"the kernel record {path} {problem}: it is ignored "
        "(backend='auto' self-checks each fused kernel before using it)",
        RuntimeWarning,
        stacklevel=3,
    )
    return {"schema": SCHEMA, "entries": []}


@functools.cache
def _recorded_keys() -> frozenset:
    return frozenset((e["op"], e["backend"], e["capability"]) for e in load_record()["entries"])


def is_recorded(op: str, backend: str, capability: str) -> bool:
    return (op, backend, capability) in _recorded_keys()


_checked: dict[tuple, CheckResult] = {}


def self_check(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> CheckResult:
    """The op's self-check, run once per (op, backend, device, dtype) per process."""
    key = (op, backend, str(device), dtype)
    if key not in _checked:
        _checked[key] = run_check(key[0], backend, device, dtype)
    return _checked[key]


def trusted(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> CheckResult | None:
    """None when ``auto`` may use ``backend`` for ``op`` here, else the failed self-check.

    An op without a self-check (one added later under a new name) is trusted as before."""
    mode = verify_mode()
    if mode == "0" or op not in OPS:
        return None
    if mode != "always" and is_recorded(op, backend, capability_of(device)):
        return None
    result = self_check(op, backend, device, dtype)
    return None if result.passed else result


def clear_cache() -> None:
    """Forgets the self-checks and the loaded record (tests; after writing the record)."""
    _checked.clear()
    _recorded_keys.cache_clear()


# ---- fastrob check: every self-check on this machine's devices, and the record ----


def check_devices(devices=None, backends=None, dtypes=None, ops=None, quiet: bool = True) -> list[CheckResult]:
    """Every self-check (ops x fused backends that run on each device x dtypes); the checks run
    afresh, whatever the record and the cache hold. Default devices: every CUDA GPU, else the CPU
    when the Triton interpreter is on."""
    if devices is None:
        devices = (
            [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available()
            else ([torch.device("cpu")] if _backend.triton_interpreter() else [])
        )
    results = []
    for device in map(torch.device, devices):
        for backend in backends or _backend.fused_backends_for(device):
            for op in ops or [name for name in OPS if backend in fused_op(name).fused_backends]:
                for dtype in dtypes or [d for d in _backend.KERNEL_DTYPES if d in fused_op(op).tolerances]:
                    results.append(run_check(op, backend, device, dtype))
                    if not quiet:
                        print(format_row(results[-1]), flush=True)
    return results


HEADER = f"{'op':<14} {'backend':<8} {'device':<8} {'dtype':<9} {'max error':>10} {'err/tol':>8}  verdict"


def format_row(r: CheckResult) -> str:
    line = f"{r.op:<14} {r.backend:<8} {r.device:<8} {r.dtype:<9} {r.max_error:>10.3g} {r.ratio:>8.3g}  {r.verdict}"
    return line + (f"  ({r.error})" if r.error else "")


def record_entries(results: list[CheckResult], passed_tests: dict | None = None) -> list[dict]:
    """Record entries for each (op, backend, device) whose every dtype passed: the evidence.
    ``passed_tests`` maps an op to the names of the ``-m cuda`` tests of it that passed."""
    import triton

    by_key: dict[tuple, list[CheckResult]] = {}
    for r in results:
        by_key.setdefault((r.op, r.backend, r.device), []).append(r)
    entries = []
    for (op, backend, device), rs in by_key.items():
        if not all(r.passed for r in rs):
            continue
        dev = torch.device(device)
        entries.append(
            {
                "op": op,
                "backend": backend,
                "capability": capability_of(dev),
                "device": device_name(dev),
                "torch": torch.__version__,
                "triton": triton.__version__,
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                "passed": [
                    f"fastrob check {', '.join(r.dtype for r in rs)} (largest err/tol {max(r.ratio for r in rs):.3g})"
                ]
                + sorted((passed_tests or {}).get(op, [])),
            }
        )
    return entries


def write_record(entries: list[dict], path: Path | None = None) -> Path:
    """Merges ``entries`` into the record (a new entry replaces that of the same op, backend and
    capability) and writes it back."""
    path = Path(path) if path is not None else RECORD_PATH
    record = load_record(path)
    new_keys = {(e["op"], e["backend"], e["capability"]) for e in entries}
    kept = [e for e in record["entries"] if (e["op"], e["backend"], e["capability"]) not in new_keys]
    record["schema"] = SCHEMA
    record["entries"] = sorted(kept + entries, key=lambda e: (e["op"], e["backend"], e["capability"]))
    path.write_text(json.dumps(record, indent=1) + "\n")
    clear_cache()
    return path


def passed_tests_by_op(junit_xml: str | Path) -> dict[str, list[str]]:
    """The passing tests of each op in a pytest --junitxml report (tests/test_<op>.py)."""
    import xml.etree.ElementTree as ET

    passed: dict[str, list[str]] = {}
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        if any(child.tag in ("failure", "error", "skipped") for child in case):
            continue
        module = case.get("classname", "").rsplit(".", 1)[-1]
        op = module.removeprefix("test_")
        if op in OPS:
            passed.setdefault(op, []).append(f"pytest -m cuda {module}::{case.get('name')}")
    return passed


def describe_record(path: Path | None = None) -> str:
    """What ``fastrob info`` prints about the record."""
    path = Path(path) if path is not None else RECORD_PATH
    entries = load_record(path)["entries"]
    lines = [
        f"verified kernels ({path.name}, FASTROB_VERIFY={verify_mode()}): "
        + (
            f"{len(entries)} entries"
            if entries
            else "none yet: on a GPU, auto self-checks each fused kernel once per process before using it"
        )
    ]
    for e in entries:
        lines.append(
            f"  {e['op']:<14}{e['backend']:<7} sm {e['capability']:<6}{e['device']}, "
            f"torch {e['torch']}, triton {e['triton']}, {e['date']}"
        )
    return "\n".join(lines)


def check_command(devices=None, ops=None, record: bool = False, record_path=None, tests_passed=None) -> int:
    """``fastrob check``: the table of every self-check; 1 on any mismatch or error, 2 when there is
    nothing to check here. ``record`` writes the passing GPU entries (the interpreter's results prove
    nothing about a GPU, so they are written only to an explicit ``record_path``)."""
    print(HEADER)
    results = check_devices(devices, ops=ops, quiet=False)
    if not results:
        print("nothing to check: no CUDA GPU, and TRITON_INTERPRET=1 is not set (the Triton interpreter on CPU)")
        return 2
    failed = [r for r in results if not r.passed]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed")
    if record:
        entries = record_entries(results, passed_tests_by_op(tests_passed) if tests_passed else None)
        if record_path is None:
            entries = [e for e in entries if e["capability"] != "interpreter"]
        path = write_record(entries, record_path)
        print(f"recorded {len(entries)} entries in {path}")
    return 1 if failed else 0


_backend.set_trust_policy(trusted)

__all__ = [
    "CheckResult",
    "check_devices",
    "dtype_name",
    "format_row",
    "is_recorded",
    "load_record",
    "record_entries",
    "self_check",
    "trusted",
    "verify_mode",
    "write_record",
]
