"""bench/aot_compile.py: the ahead-of-time compile of the Triton kernels for GPUs, without a GPU. The full
table (every specialization, sm_80 and sm_90, two Triton versions) is `make aot`, which CI runs."""

import importlib
import inspect
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
aot = importlib.import_module("bench.aot_compile")

# @triton.jit helpers that are inlined into the kernels, never launched themselves
HELPERS = {"_clamp", "_act", "_load_u", "_split_sum", "_weight"}


def launched_kernels() -> set:
    names = set()
    for op in ("sqnorm", "cross_entropy", "bias_act", "batch_norm", "pgd_step"):
        module = importlib.import_module(f"fastrob.triton.{op}")
        names |= {n for n, obj in inspect.getmembers(module) if isinstance(obj, triton.runtime.JITFunction)
                  and n not in HELPERS}
    return names


@pytest.mark.parametrize("quick", [False, True])
def test_every_kernel_has_specializations_with_complete_signatures(quick):
    specs = aot.specs(quick)
    assert {s.kernel.fn.__name__ for s in specs} == launched_kernels()
    assert len({s.name for s in specs}) == len(specs)  # names identify the rows of the table
    for s in specs:
        assert list(s.signature) == s.kernel.arg_names
        assert {n for n, t in s.signature.items() if t == "constexpr"} == set(s.constexprs)


def test_a_kernel_compiles_for_sm90_and_reports_its_registers():
    specs = aot.specs(quick=True)
    index = next(i for i, s in enumerate(specs) if s.name.startswith("sqnorm_forward[float32"))
    row = aot.compile_one((True, index, 90, True))
    assert row["status"] == "ok", row["status"]
    assert 0 < row["registers"] <= 255 and row["stack_bytes"] == 0 and row["local_bytes"] == 0
