"""One name and one number per fact across Python, Triton and C++: every kernel an op launches has the
op's stem and the same name on both fused backends (the Triton function of fastrob/triton/<op>.py,
the launcher of csrc/launchers.h bound in csrc/bindings.cpp), and the integer codes the kernels
switch on (storage dtypes, activations) equal their one Python table. Read from the sources, so no
GPU or built extension is needed."""

import ast
import importlib
import re
from pathlib import Path

import pytest
import torch

from fastrob._checks import dtype_name
from fastrob.ops._common import _CUDA_DTYPE_CODES
from fastrob.ops._registry import fused_op, fused_op_names
from fastrob.ops.bias_act import ACTIVATIONS

ROOT = Path(__file__).resolve().parent.parent


def read(path: str) -> str:
    return (ROOT / path).read_text()


def launched_kernels(op: str) -> list[tuple[str, str]]:
    """(Triton function, fastrob._C launcher) of every ``launch(backend, lambda: _triton_kernels().X, "Y", ...)``
    in fastrob/ops/<op>.py."""
    pairs = []
    for node in ast.walk(ast.parse(read(f"fastrob/ops/{op}.py"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "launch":
            triton_kernel, cuda_kernel = node.args[1], node.args[2]
            assert isinstance(triton_kernel, ast.Lambda) and isinstance(triton_kernel.body, ast.Attribute)
            assert isinstance(cuda_kernel, ast.Constant)
            pairs.append((triton_kernel.body.attr, cuda_kernel.value))
    return pairs


@pytest.mark.parametrize("op", [op for op in fused_op_names() if op != "pgd_step"])
def test_each_kernel_has_the_ops_stem_and_one_name_on_both_backends(op):
    pytest.importorskip("triton")
    kernels = importlib.import_module(f"fastrob.triton.{op}")
    pairs = launched_kernels(op)
    assert pairs, f"fastrob/ops/{op}.py launches no kernel through _common.launch"
    for triton_name, cuda_name in pairs:
        assert triton_name == cuda_name and triton_name.startswith(f"{op}_")
        assert callable(getattr(kernels, triton_name))
        if "cuda" in fused_op(op).fused_backends:
            assert re.search(rf"\bvoid {cuda_name}\(", read("csrc/launchers.h")), cuda_name
            assert f'm.def("{cuda_name}"' in read("csrc/bindings.cpp"), cuda_name


@pytest.mark.parametrize("op", fused_op_names())
def test_device_kernels_carry_the_ops_stem(op):
    if (ROOT / "kernels" / f"{op}.cuh").exists():
        names = re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", read(f"kernels/{op}.cuh"))
        assert names and all(name.startswith(f"{op}_") for name in names), names
    pytest.importorskip("triton")
    source = read(f"fastrob/triton/{op}.py")
    # the launched @triton.jit functions end in _kernel; the others are helpers inlined into them
    launched = [name for name in re.findall(r"@triton\.jit\s+def (\w+)", source) if name.endswith("_kernel")]
    assert launched and all(name.startswith(f"_{op}_") for name in launched), launched


def test_dtype_codes_equal_the_cpp_enum():
    body = re.search(r"enum DType : int \{([^}]*)\}", read("csrc/launchers.h")).group(1)
    enum = {name.strip(): int(code) for name, code in re.findall(r"(\w+)\s*=\s*(\d+)", body)}
    assert enum == {"k" + dtype_name(d).title().replace("Bfloat", "BFloat"): c for d, c in _CUDA_DTYPE_CODES.items()}
    assert set(_CUDA_DTYPE_CODES) == {torch.float32, torch.float16, torch.bfloat16}


def test_activation_codes_equal_the_kernels_tables():
    codes = sorted(ACTIVATIONS.values())
    assert codes == list(range(len(codes)))  # dense: the kernels' last branch is a default
    cuda = read("kernels/bias_act.cuh")
    documented = {name: int(code) for code, name in re.findall(r"^//\s+(\d+) (\w+)\s", cuda, flags=re.M)}
    assert documented == ACTIVATIONS
    switch = cuda[cuda.index("switch (p.act)") :]
    switch = switch[: switch.index("default:")]
    assert sorted(map(int, re.findall(r"case (\d+):", switch))) == codes[:-1]
    triton = read("fastrob/triton/bias_act.py")
    assert sorted(map(int, re.findall(r"ACT == (\d+)", triton))) == codes[:-1]


def test_the_built_extension_has_every_launcher_the_ops_call():
    from fastrob import _backend

    module, reason = _backend._load_extension()
    if module is None:
        pytest.skip(reason)
    names = {
        cuda for op in fused_op_names() if "cuda" in fused_op(op).fused_backends for _, cuda in launched_kernels(op)
    }
    assert names and not {name for name in names if not hasattr(module, name)}
