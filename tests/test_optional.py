"""The optional dependencies: ``import fastrob`` and the library work without the ``cli`` and
``triton`` extras, and a command that needs a missing one says so in one line."""

import subprocess
import sys

BLOCK = "import sys\nfor name in ('matplotlib', 'sklearn', 'PIL', 'triton'):\n    sys.modules[name] = None\n"


def run(code: str, *args):
    return subprocess.run([sys.executable, "-c", BLOCK + code, *args], capture_output=True, text=True, timeout=120)


def test_the_library_works_without_the_optional_packages():
    result = run(
        "import torch, fastrob\n"
        "model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n"
        "x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))\n"
        "fastrob.InputGradientRegularizer(lam=1.0)(model, x, y).loss.backward()\n"
        "fastrob.pgd(model, x, y, eps=0.1, steps=2)\n"
        "print(fastrob._backend.status('triton').reason)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "triton is not installed" in result.stdout


def test_a_command_that_needs_a_missing_extra_says_which(tmp_path):
    result = run(
        "from fastrob.cli import main\nsys.exit(main(sys.argv[1:]))",
        "train",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "run"),
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "is not installed (pip install 'fastrob[cli]')" in lines[0]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
