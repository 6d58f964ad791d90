"""Build script: the pure-Python package plus, when nvcc is found, the CUDA extension fastrob._C.

fastrob._C is a torch-free pybind11 module (see docs/design.md): it is compiled by nvcc
alone, links the CUDA runtime statically, and so builds on a machine with nvcc and no GPU.
This file must never import torch: pip's isolated build environment would fetch a CUDA torch.

Without nvcc (or with FASTROB_CUDA=0) nothing is compiled and the wheel is pure Python
(py3-none-any). With nvcc the build is attempted, and a failed compile fails the install: a user
who has nvcc expects the cuda backend, and a warning hidden by pip would leave it silently missing.

Environment:
  FASTROB_CUDA=0          skip the extension (a pure-Python install)
  FASTROB_CUDA=1          a missing nvcc is an error too (default: a missing nvcc skips the extension)
  TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"  compute capabilities to compile for, as torch extensions read it
                          (default "8.0;9.0+PTX"); "+PTX" adds PTX for that capability, for newer GPUs
  FASTROB_CUDA_ARCH="80;90"  the same, fastrob's older spelling (wins over TORCH_CUDA_ARCH_LIST when both are set)
  NVCC=/path/to/nvcc      the compiler (default: $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc, then PATH)
  MAX_JOBS=N              parallel nvcc jobs (ninja's -j; default: ninja's own choice)
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sysconfig
import time

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
# Every source and header of the extension, so that a new op's .cu/.cuh needs no edit here.
# Relative paths: setuptools refuses absolute source paths in an sdist's metadata.
SOURCES = ["csrc/bindings.cpp"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cu"))
)
HEADERS = sorted(
    os.path.relpath(p, ROOT)
    for pattern in ("csrc/*.h", "kernels/*.cuh")
    for p in glob.glob(os.path.join(ROOT, pattern))
)
BUILD_RECORD = "_C_build.json"  # written next to the extension: what was built, or why not


def _find_nvcc():
    if os.environ.get("NVCC"):  # authoritative when set: no search elsewhere
        return os.environ["NVCC"] if os.path.isfile(os.environ["NVCC"]) else None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


DEFAULT_ARCHS = "8.0;9.0+PTX"


def _archs():
    """[(capability, with_ptx)] from FASTROB_CUDA_ARCH, else TORCH_CUDA_ARCH_LIST, else the default.

    FASTROB_CUDA_ARCH without any "+PTX" keeps its old meaning: PTX for the last capability."""
    for name in ("FASTROB_CUDA_ARCH", "TORCH_CUDA_ARCH_LIST"):
        spec = os.environ.get(name, "").strip()
        if spec:
            break
    else:
        name, spec = "default", DEFAULT_ARCHS
    archs = []
    for item in re.split(r"[;,\s]+", spec):
        if not item:
            continue
        cap, ptx = (item[: -len("+PTX")], True) if item.upper().endswith("+PTX") else (item, False)
        cap = cap.replace(".", "")
        if not cap.isdigit():
            raise SystemExit(f"{name} must list compute capabilities like '8.0;9.0+PTX', got {spec!r}")
        archs.append((cap, ptx))
    if not archs:
        raise SystemExit(f"{name} must list compute capabilities like '8.0;9.0+PTX', got {spec!r}")
    if name == "FASTROB_CUDA_ARCH" and not any(ptx for _, ptx in archs):
        archs[-1] = (archs[-1][0], True)
    return archs


def _gencode(archs):
    """nvcc's -gencode flags: SASS for each capability, plus PTX where asked."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a, _ in archs]
    flags += [f"-gencode=arch=compute_{a},code=compute_{a}" for a, ptx in archs if ptx]
    return flags


def _skip_reason():
    """Why the extension is not even attempted (None: it is)."""
    if os.environ.get("FASTROB_CUDA", "") == "0":
        return "skipped: FASTROB_CUDA=0 at install time"
    if _find_nvcc() is None and os.environ.get("FASTROB_CUDA", "") != "1":
        return f"nvcc was not found at install time ({_skip_reason_text()}); reinstall once it is there"
    return None


def _write_record(record, package_dir):
    os.makedirs(package_dir, exist_ok=True)
    with open(os.path.join(package_dir, BUILD_RECORD), "w") as f:
        json.dump(record, f, indent=1)


def _ninja():
    try:
        import ninja  # the PyPI package ships the binary

        return os.path.join(ninja.BIN_DIR, "ninja")
    except ImportError:
        return shutil.which("ninja")


class BuildExt(build_ext):
    """Compiles fastrob._C with nvcc through ninja (parallel, incremental) instead of the C compiler.

    Only declared when the build is attempted (see ``_skip_reason``); a failure is then an error
    that says how to skip the extension."""

    def build_extension(self, ext):
        out_path = os.path.abspath(self.get_ext_fullpath(ext.name))  # ninja runs in its own directory
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        nvcc = _find_nvcc()
        if nvcc is None:  # only reached with FASTROB_CUDA=1
            raise SystemExit(f"fastrob: FASTROB_CUDA=1 but nvcc was not found ({_skip_reason_text()})")
        archs = _archs()
        record = {
            "built": False,
            "reason": "",
            "nvcc": _nvcc_version(nvcc),
            "archs": [a for a, _ in archs],
            "ptx": [a for a, ptx in archs if ptx],
        }
        try:
            seconds = self._compile(nvcc, archs, out_path)
        except ImportError as err:
            raise SystemExit(
                f"fastrob: building fastrob._C needs {err.name} (pip install {err.name}), "
                "or set FASTROB_CUDA=0 to install without the CUDA backend"
            ) from err
        except (subprocess.CalledProcessError, OSError) as err:
            raise SystemExit(
                f"fastrob: the nvcc build of fastrob._C failed ({err}) with {' '.join(_gencode(archs))}. "
                "Set TORCH_CUDA_ARCH_LIST to the capabilities your nvcc supports (e.g. '8.0;9.0+PTX'), "
                "or FASTROB_CUDA=0 to install without the CUDA backend"
            ) from err
        record.update(built=True, reason=f"compiled in {seconds:.0f} s")
        print(
            f"fastrob: built fastrob._C with {record['nvcc']} for sm_{', sm_'.join(record['archs'])} in {seconds:.0f} s"
        )
        _write_record(record, os.path.dirname(out_path))
        self._record_path = os.path.join(os.path.dirname(out_path), BUILD_RECORD)

    def copy_extensions_to_source(self):
        # Editable installs build into a temporary directory and copy the extension back into the
        # source tree; the build record must follow it.
        super().copy_extensions_to_source()
        package_dir = self.get_finalized_command("build_py").get_package_dir("fastrob")
        shutil.copyfile(self._record_path, os.path.join(package_dir, BUILD_RECORD))

    def _compile(self, nvcc, archs, out_path):
        build_dir = os.path.join(ROOT, "build", "fastrob_C")
        os.makedirs(build_dir, exist_ok=True)
        import pybind11  # a build dependency (pyproject.toml); missing only with --no-build-isolation

        gencode = _gencode(archs)
        includes = [sysconfig.get_paths()["include"], pybind11.get_include(), ROOT]
        cflags = [
            "-O3",
            "-std=c++17",
            "-lineinfo",
            "-Xcompiler",
            "-fPIC",
            "-Xcompiler",
            "-fvisibility=hidden",
            *gencode,
            *[f"-I{i}" for i in includes],
        ]
        objects, lines = (
            [],
            [
                f"nvcc = {nvcc}",
                f"cflags = {' '.join(cflags)}",
                "rule nvcc",
                "  command = $nvcc $cflags -MD -MF $out.d -c $in -o $out",
                "  depfile = $out.d",
                "  deps = gcc",
                "  description = nvcc $in",
                "rule link",
                "  command = $nvcc -shared -cudart static $in -o $out",
                "  description = link $out",
            ],
        )
        for src in SOURCES:
            obj = os.path.join(build_dir, os.path.basename(src) + ".o")
            objects.append(obj)
            lines.append(f"build {obj}: nvcc {os.path.join(ROOT, src)}")
        lines.append(f"build {out_path}: link {' '.join(objects)}")
        with open(os.path.join(build_dir, "build.ninja"), "w") as f:
            f.write("\n".join(lines) + "\n")
        start = time.time()
        ninja = _ninja()
        if ninja:
            jobs = os.environ.get("MAX_JOBS", "").strip()
            subprocess.run([ninja, "-C", build_dir, *(["-j", jobs] if jobs.isdigit() else [])], check=True)
        else:  # sequential fallback: same commands, no incremental rebuilds
            for src, obj in zip(SOURCES, objects):
                subprocess.run([nvcc, *cflags, "-c", os.path.join(ROOT, src), "-o", obj], check=True)
            subprocess.run([nvcc, "-shared", "-cudart", "static", *objects, "-o", out_path], check=True)
        return time.time() - start


class BuildPy(build_py):
    """Writes the build record (why fastrob._C is absent) when the extension is not attempted, and
    removes a stale extension of an earlier build from the source tree of an editable install."""

    def run(self):
        super().run()
        reason = _skip_reason()
        if reason is None:
            return
        print(f"fastrob: fastrob._C not built: {reason}")
        record = {"built": False, "reason": reason, "nvcc": None, "archs": [], "ptx": []}
        _write_record(record, os.path.join(self.build_lib, "fastrob"))
        if getattr(self, "editable_mode", False):
            package_dir = self.get_package_dir("fastrob")
            _write_record(record, package_dir)
            for name in os.listdir(package_dir):
                if name.startswith("_C.") and name.endswith((".so", ".pyd")):
                    os.remove(os.path.join(package_dir, name))


def _nvcc_version(nvcc):
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "nvcc (version unknown)"
    match = re.search(r"release ([\d.]+)", text)
    return f"nvcc {match.group(1)}" if match else "nvcc (version unknown)"


def _skip_reason_text():
    return f"NVCC={os.environ['NVCC']} is not a file" if os.environ.get("NVCC") else "set NVCC, CUDA_HOME or PATH"


if os.environ.get("FASTROB_CUDA", "") not in ("", "0", "1"):
    raise SystemExit(f"fastrob: FASTROB_CUDA must be 0, 1 or unset, got {os.environ['FASTROB_CUDA']!r}")

setup(
    # No extension declared when it is not attempted: the wheel is then pure Python (py3-none-any).
    ext_modules=[] if _skip_reason() else [Extension("fastrob._C", sources=SOURCES, depends=HEADERS)],
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
)
