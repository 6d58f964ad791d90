"""Atomic file writes: every output (checkpoint, JSON, PNG) is written to a temporary file in the
target's directory and renamed over the target (``os.replace``, atomic on POSIX and Windows), so
a full disk, a crash or an interrupt leaves the old file or no file, never a truncated one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile


def _umask() -> int:
    """The process's umask (read without changing it where Linux shows it)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore (the only way POSIX offers)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path beside ``path``; on success it is renamed to ``path``, on any
    error it is removed (and the error propagates). The file gets the mode a plain ``open`` would
    give it (0o666 less the umask), not the private 0o600 of a temporary file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    with contextlib.suppress(OSError, AttributeError):  # no fchmod (Windows), or a filesystem without modes
        os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(obj, path: str, **kwargs) -> str:
    """json.dump(obj) to ``path`` atomically (indent=2 by default); returns path."""
    kwargs.setdefault("indent", 2)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, **kwargs)
            f.flush()
            os.fsync(f.fileno())
    return path


# torch.save's C++ zip writer reports a failed write (full disk, I/O error) as a RuntimeError
# ("[enforce fail at inline_container.cc] ... file write failed" or "unexpected pos ...")
_TORCH_WRITE_FAILURES = ("file write failed", "unexpected pos", "PytorchStreamWriter failed")
_LOW_SPACE = 1 << 20  # bytes: with less free space left after a failed write, the disk was full


def torch_save(obj, path: str) -> str:
    """torch.save(obj) to ``path`` atomically; returns path. A write that fails (full disk, I/O
    error) raises OSError with the path, as every other write does, not torch's RuntimeError."""
    import torch

    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:
            if not any(marker in str(err) for marker in _TORCH_WRITE_FAILURES):
                raise
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
            if free < _LOW_SPACE:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from err
            reason = str(err).strip().splitlines()[0] if str(err).strip() else "torch.save failed"
            raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} ({reason})", path) from err
    return path
