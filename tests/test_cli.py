"""The fastrob command, run as a user runs it (a subprocess)."""

import subprocess
import sys

import pytest


def fastrob(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastrob", *args], capture_output=True, text=True, timeout=timeout)


def test_info_lists_every_backend_with_availability():
    result = fastrob("info")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in ("torch", "triton", "cuda"):
        row = [line for line in lines if line.strip().startswith(name + " ")]
        assert row, f"no line for backend {name}:\n{result.stdout}"
        assert " available " in row[0] or " unavailable " in row[0]
    assert "extension fastrob._C:" in result.stdout


def test_demo_trains_and_attacks():
    result = fastrob("demo", "--epochs", "15", "--quiet")
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in ("none", "linf", "l2"):
            rows[(parts[0], float(parts[1]))] = float(parts[2].rstrip("%"))
    clean = rows[("none", 0.0)]
    assert clean > 85  # a trained model, not chance (10%)
    linf = [rows[("linf", e)] for e in (0.05, 0.1, 0.2, 0.3)]
    assert linf == sorted(linf, reverse=True) and linf[-1] < clean / 2  # PGD really attacks


@pytest.mark.parametrize("args, words", [
    (["demo", "--epochs", "0"], "expected a positive integer"),
    (["demo", "--device", "tpu9"], "--device"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_give_one_clear_error(args, words):
    result = fastrob(*args)
    assert result.returncode == 2
    assert words in result.stderr and "Traceback" not in result.stderr
