"""Atomic file writes: every output (checkpoint, JSON, PNG) is written to a temporary file in the
target's directory and renamed over the target (``os.replace``, atomic on POSIX and Windows), so
a full disk, a crash or an interrupt leaves the old file or no file, never a truncated one."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path beside ``path``; on success it is renamed to ``path``, on any
    error it is removed (and the error propagates)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
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


def torch_save(obj, path: str) -> str:
    """torch.save(obj) to ``path`` atomically; returns path."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path
