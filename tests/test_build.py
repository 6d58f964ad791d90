"""setup.py's switches for the extension build (without compiling: these paths never reach a real nvcc),
and what the sdist and a pure wheel hold."""

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# setup.py's switches: the caller's own (CI sets FASTROB_CUDA=1) must not leak into the case under test
SWITCHES = ("FASTROB_CUDA", "NVCC", "FASTROB_CUDA_ARCH", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS")
# the build record of an install that skipped the extension on purpose
SKIPPED_RECORD = {
    "built": False,
    "reason": "skipped: FASTROB_CUDA=0 at install time",
    "nvcc": None,
    "archs": [],
    "ptx": [],
}


def run_setup(*args, cwd=ROOT, timeout=300, **env):
    full_env = {**{k: v for k, v in os.environ.items() if k not in SWITCHES}, **env}
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def build_ext(tmp_path, **env):
    result = run_setup(
        sys.executable,
        "setup.py",
        "-q",
        "build",  # build_py writes the record when the extension is skipped, build_ext when it is built
        "--build-lib",
        str(tmp_path),
        "--build-temp",
        str(tmp_path / "temp"),
        timeout=120,
        **env,
    )
    record = tmp_path / "fastrob" / "_C_build.json"
    return result, json.loads(record.read_text()) if record.exists() else None


def test_fastrob_cuda_0_skips_and_records_why(tmp_path):
    result, record = build_ext(tmp_path, FASTROB_CUDA="0")
    assert result.returncode == 0, result.stderr
    assert record == SKIPPED_RECORD
    assert not list((tmp_path / "fastrob").glob("_C*.so"))


def test_fastrob_cuda_1_without_nvcc_fails_loudly(tmp_path):
    result, _ = build_ext(tmp_path, FASTROB_CUDA="1", NVCC="/nonexistent/nvcc")
    assert result.returncode != 0
    assert "FASTROB_CUDA=1 but nvcc was not found (NVCC=/nonexistent/nvcc is not a file)" in result.stderr


def test_without_nvcc_the_install_goes_on(tmp_path):
    result, record = build_ext(tmp_path, NVCC="/nonexistent/nvcc")
    assert result.returncode == 0, result.stderr
    assert record["built"] is False and "nvcc was not found" in record["reason"]


def test_bad_fastrob_cuda_value_is_refused(tmp_path):
    result, _ = build_ext(tmp_path, FASTROB_CUDA="yes")
    assert result.returncode != 0
    assert "FASTROB_CUDA must be 0, 1 or unset, got 'yes'" in result.stderr


def fake_nvcc(tmp_path, pybind11="def get_include():\n    return '/nonexistent'\n"):
    """Environment for a build with an 'nvcc' that reports a version and fails every compile (so the
    build is attempted and fails), and a stand-in pybind11 module (a build-only dependency)."""
    nvcc = tmp_path / "nvcc"
    nvcc.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "release 13.0"; exit 0; fi\necho bad >&2; exit 1\n')
    nvcc.chmod(0o755)
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "pybind11.py").write_text(pybind11)
    return {"NVCC": str(nvcc), "PYTHONPATH": str(shadow)}


def test_a_failed_compile_fails_the_install_and_says_how_to_skip(tmp_path):
    result, record = build_ext(tmp_path, **fake_nvcc(tmp_path), TORCH_CUDA_ARCH_LIST="8.6;9.0+PTX")
    assert result.returncode != 0
    assert "the nvcc build of fastrob._C failed" in result.stderr
    # the arch flags come from TORCH_CUDA_ARCH_LIST, PTX only where "+PTX" asks for it
    assert "-gencode=arch=compute_86,code=sm_86 -gencode=arch=compute_90,code=sm_90" in result.stderr
    assert "-gencode=arch=compute_90,code=compute_90" in result.stderr
    assert "compute_86,code=compute_86" not in result.stderr
    assert "FASTROB_CUDA=0" in result.stderr
    assert "Traceback" not in result.stderr


def test_fastrob_cuda_arch_wins_and_keeps_ptx_for_its_last_arch(tmp_path):
    result, _ = build_ext(tmp_path, **fake_nvcc(tmp_path), FASTROB_CUDA_ARCH="75", TORCH_CUDA_ARCH_LIST="8.0")
    assert result.returncode != 0
    assert "-gencode=arch=compute_75,code=sm_75 -gencode=arch=compute_75,code=compute_75" in result.stderr
    assert "compute_80" not in result.stderr


def test_bad_arch_list_names_the_variable(tmp_path):
    result, _ = build_ext(tmp_path, **fake_nvcc(tmp_path), TORCH_CUDA_ARCH_LIST="hopper")
    assert result.returncode != 0
    assert "TORCH_CUDA_ARCH_LIST must list compute capabilities" in result.stderr


def test_a_missing_build_dependency_is_one_clear_message(tmp_path):
    # a pybind11 that cannot be imported, as in `pip install --no-build-isolation` without it
    missing = "raise ImportError(\"No module named 'pybind11'\", name='pybind11')\n"
    result, _ = build_ext(tmp_path, **fake_nvcc(tmp_path, pybind11=missing))
    assert result.returncode != 0
    assert "building fastrob._C needs pybind11 (pip install pybind11), or set FASTROB_CUDA=0" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdist")
    result = run_setup(sys.executable, "setup.py", "-q", "sdist", "-d", str(out))
    assert result.returncode == 0, result.stderr
    (path,) = out.glob("fastrob-*.tar.gz")
    return path


def test_the_sdist_holds_what_building_and_testing_need(sdist):
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    expected = {
        "LICENSE",
        "Makefile",
        "README.md",
        "PYPI.md",
        "pyproject.toml",
        "setup.py",
        "fastrob/py.typed",
        "fastrob/verified.json",
        # the helpers the test files import, and every test file of the checkout
        "tests/conftest.py",
        "tests/op_checks.py",
        "tests/train_loop.py",
        *(f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")),
        *(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")),
        *(f"csrc/{p.name}" for p in (ROOT / "csrc").iterdir()),
        *(f"kernels/{p.name}" for p in (ROOT / "kernels").iterdir()),
    }
    assert not expected - names, f"missing from the sdist: {sorted(expected - names)}"
    assert not [n for n in names if n.endswith((".so", ".pyc")) or n.endswith("_C_build.json")]


def test_without_the_extension_the_wheel_is_pure_python(tmp_path, sdist):
    # built from the sdist, as a package index's users build it (and clear of the checkout's build/)
    result = run_setup(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(tmp_path),
        str(ROOT),
        FASTROB_CUDA="0",
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("fastrob-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        record = json.loads(zf.read("fastrob/_C_build.json"))
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert record == SKIPPED_RECORD
    assert "fastrob/py.typed" in names and not [n for n in names if n.endswith(".so")]
    assert "License-Expression: BSD-3-Clause" in metadata
    # the optional dependencies are extras, not requirements of `import fastrob`
    assert 'Requires-Dist: matplotlib; extra == "cli"' in metadata
    requirements = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    required = sorted(line for line in requirements if "extra ==" not in line)
    assert required == ["Requires-Dist: numpy", "Requires-Dist: torch>=2.4", "Requires-Dist: tqdm"], required
