"""Build script: the pure-Python package plus, when nvcc is found, the CUDA extension fastrob._C.

fastrob._C is a torch-free pybind11 module (see docs/design.md): it is compiled by nvcc
alone, links the CUDA runtime statically, and so builds on a machine with nvcc and no GPU.
This file must never import torch: pip's isolated build environment would fetch a CUDA torch.

Environment:
  FASTROB_CUDA=0          skip the extension
  FASTROB_CUDA=1          a missing nvcc or a failed compile is an error (default: a warning)
  FASTROB_CUDA_ARCH="80;90"  compute capabilities to compile for (default 80 and 90)
  NVCC=/path/to/nvcc      the compiler (default: $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc, then PATH)
"""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
# every op's launchers (csrc/<op>.cu) and device code (kernels/<op>.cuh), found by name
SOURCES = [
    "csrc/bindings.cpp",
    *sorted(f"csrc/{f}" for f in os.listdir(os.path.join(ROOT, "csrc")) if f.endswith(".cu")),
]
HEADERS = [
    "csrc/launchers.h",
    "csrc/launch_utils.h",
    *sorted(f"kernels/{f}" for f in os.listdir(os.path.join(ROOT, "kernels")) if f.endswith(".cuh")),
]
BUILD_RECORD = "_C_build.json"  # written next to the extension: what was built, or why not


def _find_nvcc():
    if os.environ.get("NVCC"):  # authoritative when set: no search elsewhere
        return os.environ["NVCC"] if os.path.isfile(os.environ["NVCC"]) else None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _archs():
    spec = os.environ.get("FASTROB_CUDA_ARCH", "80;90")
    archs = [a.replace(".", "") for a in re.split(r"[;,\s]+", spec.strip()) if a]
    bad = [a for a in archs if not a.isdigit()]
    if bad or not archs:
        raise SystemExit(f"FASTROB_CUDA_ARCH must list compute capabilities like '80;90', got {spec!r}")
    return archs


def _ninja():
    try:
        import ninja  # the PyPI package ships the binary

        return os.path.join(ninja.BIN_DIR, "ninja")
    except ImportError:
        return shutil.which("ninja")


class BuildExt(build_ext):
    """Compiles fastrob._C with nvcc through ninja (parallel, incremental) instead of the C compiler."""

    def build_extension(self, ext):
        out_path = os.path.abspath(self.get_ext_fullpath(ext.name))  # ninja runs in its own directory
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        record_path = self._record_path = os.path.join(os.path.dirname(out_path), BUILD_RECORD)
        mode = os.environ.get("FASTROB_CUDA", "")
        if mode not in ("", "0", "1"):
            raise SystemExit(f"FASTROB_CUDA must be 0, 1 or unset, got {mode!r}")
        nvcc = _find_nvcc()
        record = {"built": False, "reason": "", "nvcc": None, "archs": []}
        if mode == "0":
            record["reason"] = "skipped: FASTROB_CUDA=0 at install time"
        elif nvcc is None:
            where = (
                f"NVCC={os.environ['NVCC']} is not a file" if os.environ.get("NVCC") else "set NVCC, CUDA_HOME or PATH"
            )
            record["reason"] = f"nvcc was not found at install time ({where}); reinstall once it is there"
            if mode == "1":
                raise SystemExit(f"FASTROB_CUDA=1 but nvcc was not found ({where})")
        else:
            record["nvcc"] = _nvcc_version(nvcc)
            record["archs"] = _archs()
            try:
                seconds = self._compile(nvcc, record["archs"], out_path)
                record.update(built=True, reason=f"compiled in {seconds:.0f} s")
                print(
                    f"fastrob: built fastrob._C with {record['nvcc']} for sm_{', sm_'.join(record['archs'])}"
                    f" in {seconds:.0f} s"
                )
            except (subprocess.CalledProcessError, OSError) as err:
                if mode == "1":
                    raise SystemExit(f"FASTROB_CUDA=1 and the nvcc build of fastrob._C failed ({err})") from err
                record["reason"] = f"the nvcc build failed ({err}); rerun with FASTROB_CUDA=1 to see why"
                print(f"fastrob: WARNING: {record['reason']}; installing without the CUDA backend", file=sys.stderr)
        if not record["built"]:
            print(f"fastrob: fastrob._C not built: {record['reason']}")
        with open(record_path, "w") as f:
            json.dump(record, f, indent=1)

    def copy_extensions_to_source(self):
        # Editable installs build into a temporary directory and copy the extension back into the
        # source tree; the build record must follow it, and a stale extension from an earlier
        # build must not outlive a build that was skipped or failed.
        with open(self._record_path) as f:
            built = json.load(f)["built"]
        if built:
            super().copy_extensions_to_source()
        package_dir = self.get_finalized_command("build_py").get_package_dir("fastrob")
        shutil.copyfile(self._record_path, os.path.join(package_dir, BUILD_RECORD))
        if not built:
            for name in os.listdir(package_dir):
                if name.startswith("_C.") and name.endswith((".so", ".pyd")):
                    os.remove(os.path.join(package_dir, name))

    def get_outputs(self):
        # The extension may legitimately be absent (no nvcc); report only what exists.
        return [p for p in super().get_outputs() if os.path.exists(p)]

    def _compile(self, nvcc, archs, out_path):
        import pybind11

        build_dir = os.path.join(ROOT, "build", "fastrob_C")
        os.makedirs(build_dir, exist_ok=True)
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX for newer GPUs
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
            subprocess.run([ninja, "-C", build_dir], check=True)
        else:  # sequential fallback: same commands, no incremental rebuilds
            for src, obj in zip(SOURCES, objects):
                subprocess.run([nvcc, *cflags, "-c", os.path.join(ROOT, src), "-o", obj], check=True)
            subprocess.run([nvcc, "-shared", "-cudart", "static", *objects, "-o", out_path], check=True)
        return time.time() - start


def _nvcc_version(nvcc):
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "nvcc (version unknown)"
    match = re.search(r"release ([\d.]+)", text)
    return f"nvcc {match.group(1)}" if match else "nvcc (version unknown)"


setup(
    ext_modules=[Extension("fastrob._C", sources=SOURCES, depends=HEADERS)],
    cmdclass={"build_ext": BuildExt},
)
