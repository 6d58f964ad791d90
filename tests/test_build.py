"""setup.py's switches for the extension build (without compiling: these paths never reach nvcc)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_ext(tmp_path, **env):
    # The caller's own switches (CI sets FASTROB_CUDA=1) must not leak into the case under test.
    inherited = {k: v for k, v in os.environ.items() if k not in ("FASTROB_CUDA", "NVCC", "FASTROB_CUDA_ARCH")}
    full_env = {**inherited, **env}
    result = subprocess.run(
        [
            sys.executable,
            "setup.py",
            "-q",
            "build_ext",
            "--build-lib",
            str(tmp_path),
            "--build-temp",
            str(tmp_path / "temp"),
        ],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    record = tmp_path / "fastrob" / "_C_build.json"
    return result, json.loads(record.read_text()) if record.exists() else None


def test_fastrob_cuda_0_skips_and_records_why(tmp_path):
    result, record = build_ext(tmp_path, FASTROB_CUDA="0")
    assert result.returncode == 0, result.stderr
    assert record == {"built": False, "reason": "skipped: FASTROB_CUDA=0 at install time", "nvcc": None, "archs": []}
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
