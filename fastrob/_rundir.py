"""Output directories of the runs (``fastrob train``, eval, explain, demo): checked before any
compute, locked against a second run into the same directory, the data path a checkpoint records,
and reading a checkpoint back with errors that name the file."""

from __future__ import annotations

import contextlib
import os
import time

LOCK = ".fastrob.lock"
CHECKPOINT_KEYS = (
    "config",
    "model",
    "optimizer",
    "generator",
    "torch_rng",
    "epoch",
    "history",
    "in_shape",
    "num_classes",
)


def check_out_dir(path, option: str = "--out") -> str:
    """``path`` usable as an output directory, checked before any compute: not empty, not an
    existing file, and (it or its nearest existing parent) a writable directory. Returns it."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{option} must name an output directory, got {path!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{option} {path}: exists and is not a directory")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{option} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: {parent} is not writable")
    return path


def data_path(spec: str) -> str | None:
    """The absolute path of a data file or folder (None for "digits"), recorded in the checkpoint
    so that eval, explain and resume find the data from any working directory."""
    return None if spec == "digits" else os.path.abspath(spec)


def read_checkpoint(path: str) -> dict:
    """The state dict saved by ``fastrob.trainer.train``, or a ValueError naming the file when it is not one
    (corrupt, truncated, another program's, or missing keys)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for a file that is not a checkpoint
        # the first line is enough: weights_only's refusal runs to a page of advice
        reason = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: not a fastrob checkpoint ({type(err).__name__}: {reason})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path}: not a fastrob checkpoint (missing {', '.join(missing)})")
    if not isinstance(state["config"], dict):
        raise ValueError(f"{path}: not a fastrob checkpoint (its config is a {type(state['config']).__name__})")
    return state


# A run writes its pid right after creating the lock; an empty lock younger than this is one being
# taken, an older one was left by a run that died in between.
FRESH_EMPTY_LOCK_S = 10.0


def _age_seconds(path: str) -> float:
    try:
        return time.time() - os.path.getmtime(path)
    except OSError:  # removed meanwhile: as good as stale
        return float("inf")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def run_lock(out_dir: str | None):
    """Holds ``out_dir``/.fastrob.lock (created exclusively, holding this process's pid) for the
    block, so that a second run into the same directory is refused instead of interleaving its
    checkpoints with the first's. A lock left by a process that no longer runs is taken over."""
    if not out_dir:
        yield
        return
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid):
                raise ValueError(
                    f"{out_dir} is in use by another fastrob run (process {pid}); wait for it or "
                    f"choose another --out (remove {path} if that process is not fastrob)"
                ) from None
            if not pid and _age_seconds(path) < FRESH_EMPTY_LOCK_S:
                # created but not yet written: another run is taking the lock right now
                raise ValueError(
                    f"{out_dir} is being taken by another fastrob run (its lock {path} is empty and "
                    f"{FRESH_EMPTY_LOCK_S:g} s old at most); wait for it or choose another --out"
                ) from None
            os.remove(path)  # stale: its process is gone (or it died before writing its pid)
    else:
        raise ValueError(f"{out_dir}: cannot take the lock {path}")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
