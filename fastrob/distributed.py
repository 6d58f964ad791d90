"""fastrob under ``torch.distributed``: the few helpers the regularizers, attacks, metrics and the
trainer share to run on a ``DistributedDataParallel`` (DDP) model and a sharded data loader.

Nothing here starts a process group: the user (or ``torchrun`` + ``fastrob train``) does. Every
helper is a no-op in a single process, so code that calls them runs unchanged without DDP.

Why the unwrapped module. A DDP forward with grad enabled prepares the reducer for the next
backward, and (``broadcast_buffers=True``, the default) broadcasts rank 0's buffers, a collective
that every rank must enter the same number of times. Attacks and metrics run a data-dependent
number of forward passes (early stop, a batch with no correct sample) and must not communicate, so
they run ``unwrap(model)``; the regularizers make exactly one DDP forward per step (the clean one,
whose loss the outer backward reduces) and run their extra forward passes on the unwrapped module,
whose graph reaches the same parameters, so the reducer's hooks fire once per parameter in the
outer backward. See docs/distributed.md for the pitfalls this avoids.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def unwrap(model):
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (any depth); else ``model``."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def is_ddp(model) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def is_distributed() -> bool:
    """Whether a default process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (or no process group): the process that logs, shows progress bars and writes files."""
    return rank() == 0


def comm_device() -> torch.device:
    """Where collectives' tensors must live: the current CUDA device for NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values) -> torch.Tensor:
    """The sum over ranks of ``values`` (a number, a list of numbers or a tensor), as a float64
    tensor on the CPU (int64 for integer inputs: counts stay exact). A copy; no-op in one process."""
    t = torch.as_tensor(values)
    t = t.to(torch.int64 if not (t.is_floating_point() or t.is_complex()) else torch.float64)
    if not is_distributed():
        return t.clone()
    t = t.to(comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def all_reduce_max(value: int) -> int:
    """The largest ``value`` over ranks (an int)."""
    t = torch.tensor([int(value)], dtype=torch.int64)
    if not is_distributed():
        return int(t)
    t = t.to(comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.cpu())


def all_gather_variable(values: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``values`` [n_r, ...] (n_r may differ between ranks, trailing dims and dtype may
    not), in rank order, on the CPU. One process: [values]."""
    values = values.detach()
    if not is_distributed():
        return [values.cpu()]
    device = comm_device()
    bool_in = values.dtype == torch.bool
    local = values.to(device, torch.uint8 if bool_in else values.dtype)  # NCCL has no bool
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.int64, device=device))
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    # all_gather needs equal shapes: pad every rank's values to the longest, then cut
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    out = [o[:n].cpu() for o, n in zip(out, sizes)]
    return [o.bool() for o in out] if bool_in else out


def all_gather_objects(obj) -> list:
    """Every rank's picklable ``obj`` (e.g. a dict of CPU tensors whose keys a rank that read no
    data does not know), in rank order. One process: [obj]."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(model) -> None:
    """Copies rank 0's buffers (BatchNorm running statistics) into every rank's ``model``."""
    if not is_distributed():
        return
    device = comm_device()
    for b in unwrap(model).buffers():
        t = b.detach().to(device)
        dist.broadcast(t, src=0)
        b.data.copy_(t)


def init_from_env(device: str = "cpu", timeout_s: float = 600.0) -> tuple[str, bool]:
    """Starts the default process group from torchrun's environment (WORLD_SIZE > 1, RANK,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT), unless one is running or there is no such environment.

    The backend is NCCL for a CUDA ``device`` (each rank then takes GPU ``LOCAL_RANK``) and gloo for
    the CPU. Returns (this rank's device, whether this call started the group: the caller then
    ends it with ``destroy()``)."""
    import datetime
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return device, False
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    if torch.device(device).type == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(device))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device, True


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()
