"""bench/aot_compile.py: the ahead-of-time compile of the Triton kernels for GPUs, without a GPU. The full
table (every specialization, sm_80 and sm_90, two Triton versions) is `make aot`, which CI runs."""

import csv
import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastrob.ops._registry import fused_op_names

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
aot = importlib.import_module("bench.aot_compile")

# @triton.jit helpers that are inlined into the kernels, never launched themselves
HELPERS = {"_clamp", "_act", "_load_u", "_split_sum", "_weight", "_offsets", "_column", "_scores"}


def launched_kernels() -> set:
    names = set()
    for op in fused_op_names():
        module = importlib.import_module(f"fastrob.triton.{op}")
        # JIT functions, or their interpreter stand-ins under TRITON_INTERPRET=1
        names |= {
            n
            for n, obj in inspect.getmembers(module)
            if isinstance(obj, triton.runtime.KernelInterface) and n not in HELPERS
        }
    return names


@pytest.mark.parametrize("quick", [False, True])
def test_every_kernel_has_specializations_with_complete_signatures(quick):
    specs = aot.specs(quick)
    assert {s.kernel.fn.__name__ for s in specs} == launched_kernels()
    assert len({s.name for s in specs}) == len(specs)  # names identify the rows of the table
    for s in specs:
        assert list(s.signature) == s.kernel.arg_names
        assert {n for n, t in s.signature.items() if t == "constexpr"} == set(s.constexprs)


@pytest.mark.slow  # about 10 s: a fresh process imports fastrob and Triton; `make aot` (CI) compiles them all
def test_a_kernel_compiles_for_sm90_and_reports_its_registers(tmp_path):
    # in a process of its own: the tests run the kernels through the interpreter, which cannot compile
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    csv_path = tmp_path / "aot.csv"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "aot_compile.py"),
            "--quick",
            "--arch",
            "90",
            "--jobs",
            "1",
            "--filter",
            "sqnorm_forward[float32",
            "--csv",
            str(csv_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["status"] for r in rows] == ["ok"] and rows[0]["arch"] == "sm_90"
    assert 0 < int(rows[0]["registers"]) <= 255 and rows[0]["stack_bytes"] == rows[0]["local_bytes"] == "0"
