"""Every module of fastrob imports first in a fresh interpreter: no import cycle held together by
the order in which other modules happen to be imported.

One fresh interpreter imports torch and the other third-party modules (the slow part), then forks one child per
module; each child starts with no fastrob module loaded and imports only its module. Where fork
is unavailable, each module gets an interpreter of its own."""

import os
import subprocess
import sys
from pathlib import Path

import fastrob

PACKAGE_DIR = Path(fastrob.__file__).parent
ROOT = PACKAGE_DIR.parent
# __main__ runs the command line on import
SKIP = {"fastrob.__main__"}

# forks one child per module, a few at a time; prints "FAIL module" and the error for each failure
FORKING_DRIVER = r"""
import os, sys, traceback
import importlib
# third-party modules, loaded once and shared by the children; fastrob itself is not loaded here
for shared in ("torch", "numpy", "tqdm", "triton", "triton.language"):
    try:
        importlib.import_module(shared)
    except ImportError:
        pass
assert not any(m == "fastrob" or m.startswith("fastrob.") for m in sys.modules)
modules = sys.argv[1:]
running, failed = {}, []
def reap():
    pid, status = os.wait()
    if os.waitstatus_to_exitcode(status) != 0:
        failed.append(running[pid])
    del running[pid]
for name in modules:
    while len(running) >= 4:
        reap()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            importlib.import_module(name)
        except BaseException:
            print("FAIL", name, flush=True)
            traceback.print_exc()
            sys.stdout.flush()
            code = 1
        os._exit(code)
    running[pid] = name
while running:
    reap()
print("failed:", " ".join(sorted(failed)) or "none")
sys.exit(1 if failed else 0)
"""


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if name not in SKIP:
            names.append(name)
    return names


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("TRITON_INTERPRET", "1")
    return env


def test_the_module_list_covers_the_package():
    names = module_names()
    assert {"fastrob", "fastrob.attacks.isa", "fastrob.metrics.robust", "fastrob.ops.pgd_step"} <= set(names)
    assert len(names) >= 50


def test_every_module_imports_first_in_a_fresh_interpreter(tmp_path):
    names = module_names()
    # a canary that fails to import shows that the check can fail, and reports the module by name
    (tmp_path / "brokencanary.py").write_text("raise ImportError('a cycle')\n")
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(tmp_path)])
    if hasattr(os, "fork"):
        run = subprocess.run(
            [sys.executable, "-c", FORKING_DRIVER, *names, "brokencanary"],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert "FAIL brokencanary" in run.stdout
        assert run.stdout.strip().splitlines()[-1] == "failed: brokencanary", run.stdout[-6000:] + run.stderr[-3000:]
        return
    failed = []
    for name in names:  # platforms without fork: one interpreter per module
        run = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, env=env)
        if run.returncode:
            failed.append(f"{name}:\n{run.stderr[-2000:]}")
    assert not failed, "\n".join(failed)


def test_the_attacks_do_not_import_the_metrics():
    """fastrob.metrics builds on fastrob.attacks, never the other way round, deferred imports included."""
    import ast

    offenders = []
    for path in sorted((PACKAGE_DIR / "attacks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + (
                    [f"{node.module}.{a.name}" for a in node.names] if node.module == "fastrob" else []
                )
            offenders += [
                f"{path.name}: {n}" for n in names if n == "fastrob.metrics" or n.startswith("fastrob.metrics.")
            ]
    assert not offenders, offenders
