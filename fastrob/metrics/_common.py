"""What the metrics share: reading ``data`` (an (x, y) pair or a DataLoader) in batches, the
device, the progress bar, the clean pass, and the sharding of a distributed evaluation (``Shard``)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler

from fastrob import distributed as dist_utils
from fastrob._checks import (
    check_int,
    check_labels,
    check_logits,
    check_model,
    check_model_input,
    check_tensor,
    eval_mode,
)
from fastrob._progress import progress


def model_device(model, device=None) -> torch.device:
    """``device`` if given, else the device of the model's first parameter, else cpu."""
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def quantiles(values: torch.Tensor) -> dict:
    """The 10%, 50% and 90% quantiles of per-sample values ({} for none), for as_dict()."""
    if not len(values):
        return {}
    q = torch.quantile(values.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"q10": float(q[0]), "median": float(q[1]), "q90": float(q[2])}


def num_samples(data) -> int | None:
    if isinstance(data, (tuple, list)):
        return len(data[1])
    dataset = getattr(data, "dataset", None)
    try:
        return len(dataset)
    except TypeError:
        return None


class Shard:
    """This process's part of the data in a distributed evaluation, and how the per-sample results
    of all processes go back together (``fastrob.distributed``).

    Samples have global positions 0, 1, ..., and rank r reads positions r, r + W, r + 2W, ... (W
    processes), in order: the layout of ``torch.utils.data.DistributedSampler``, whose padding
    repeats samples at positions >= len(dataset). Reading only positions < ``total`` drops those
    repeats, so counts summed over ranks and per-sample values gathered back into position order are
    those of one process reading positions 0 .. total - 1. Without known positions (``positioned``
    False: a loader that is this rank's shard in some other way) values are gathered in rank order.
    """

    def __init__(self, rank: int, world: int, total: int | None, positioned: bool = True):
        self.rank, self.world, self.total, self.positioned = rank, world, total, positioned

    @property
    def limit(self) -> int | None:
        """How many samples this rank reads (None: all it is given)."""
        return len(range(self.rank, self.total, self.world)) if self.positioned else None

    def sum(self, values) -> torch.Tensor:
        """``values`` summed over ranks (``fastrob.distributed.all_reduce_sum``)."""
        return dist_utils.all_reduce_sum(values)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's per-sample ``local`` [n_r, ...] as one tensor in position order, on the CPU."""
        parts = dist_utils.all_gather_variable(local)
        if not self.positioned:
            return torch.cat(parts)
        expected = [len(range(r, self.total, self.world)) for r in range(self.world)]
        got = [len(p) for p in parts]
        if got != expected:
            # every rank sees the same sizes, so every rank raises: no process is left waiting
            raise ValueError(
                f"the distributed loaders yielded {got} samples per rank, expected {expected} "
                "(DistributedSampler positions < the dataset size); a DataLoader with drop_last=True "
                "or a custom batch_sampler does not read its whole shard"
            )
        out = torch.empty((self.total, *local.shape[1:]), dtype=parts[0].dtype)
        for r, part in enumerate(parts):
            out[r :: self.world] = part
        return out


def shard(data, n: int | None, distributed: bool | None) -> Shard | None:
    """The ``Shard`` of this process for ``data``, or None for a single-process evaluation.

    distributed=None (auto): a Shard when a process group with more than one rank is running and
    ``data`` is a DataLoader whose sampler is a ``DistributedSampler`` (every rank must then call the
    metric, as it must iterate its loader). distributed=True: also a pair (x, y), which every rank
    holds whole and of which rank r evaluates rows r, r + W, ... (one process group: no-op), and any
    other loader, taken as this rank's shard (results gathered in rank order, ``n`` per rank).
    distributed=False: no communication; each process evaluates what it reads.
    """
    if distributed is False or not dist_utils.is_distributed():
        return None
    world, rank = dist_utils.world_size(), dist_utils.rank()
    sampler = getattr(data, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        if (sampler.num_replicas, sampler.rank) != (world, rank):
            raise ValueError(
                f"data: the DistributedSampler is for rank {sampler.rank} of {sampler.num_replicas}, "
                f"but this process is rank {rank} of {world}"
            )
        total = sampler.total_size if sampler.drop_last else len(sampler.dataset)
    elif distributed and isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor):
        total = len(data[1])
    elif distributed:
        return Shard(rank, world, None, positioned=False)
    else:
        return None
    return Shard(rank, world, total if n is None else min(total, n))


def batches(
    data,
    batch_size: int,
    device: torch.device,
    *,
    desc: str,
    quiet: bool,
    limit: int | None = None,
    shard: Shard | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches on ``device`` with a progress bar counting samples (on rank 0 only).

    data: a pair (x [N, ...] float in [0, 1], y [N] int) cut into ``batch_size`` chunks, or any
    iterable of (x, y) batches (a DataLoader), used as it batches. ``limit``: stop after that
    many samples (the last batch is cut). ``shard``: read this rank's part (``Shard``): rows
    r, r + W, ... of a pair, and of a sharded loader the samples at positions < shard.total; the
    shard's limit then replaces ``limit``. Data that yields no sample raises a ValueError (a metric
    over no sample is undefined, not 0), except for a distributed rank whose shard is empty."""
    batch_size = check_int("batch_size", batch_size, 1)
    if shard is not None and shard.positioned:
        limit = shard.limit
    quiet = quiet or not dist_utils.is_main_process()
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ValueError(
                f"data must be a pair (x, y) or a DataLoader of (x, y) batches, got a "
                f"{type(data).__name__} of length {len(data)}"
            )
        xs, ys = data
        check_tensor("x", xs, min_dim=2)
        ys = check_labels(ys, xs.shape[0])
        if shard is not None and shard.positioned:
            xs, ys = xs[shard.rank :: shard.world], ys[shard.rank :: shard.world]
        source = [(xs[i : i + batch_size], ys[i : i + batch_size]) for i in range(0, len(ys), batch_size)]
    elif hasattr(data, "__iter__") and not isinstance(data, torch.Tensor):
        source = data
    else:
        raise TypeError(f"data must be a pair (x, y) or a DataLoader of (x, y) batches, got {type(data).__name__}")
    total = num_samples(data) if shard is None else None
    if limit is not None:
        total = limit if total is None else min(total, limit)
    seen = 0
    with progress(total=total, desc=desc, unit="img", disable=quiet) as bar:
        for item in source:
            if not (isinstance(item, (tuple, list)) and len(item) >= 2):
                raise ValueError("each batch of data must be a pair (x, y)")
            x, y = item[0], item[1]
            check_tensor("x", x, min_dim=2)
            y = check_labels(y, x.shape[0])
            if limit is not None and seen + len(y) > limit:
                x, y = x[: limit - seen], y[: limit - seen]
            if len(y) == 0:
                break
            seen += len(y)
            yield x.to(device), y.to(device)
            bar.update(len(y))
            if limit is not None and seen >= limit:
                break
    if seen == 0 and shard is None:
        raise ValueError(f"data holds no samples: {desc} is undefined on empty data")


@torch.no_grad()
def clean_logits(model, x: torch.Tensor, y: torch.Tensor | None = None, where: str = "clean inputs") -> torch.Tensor:
    """model(x) in eval mode (each module's mode is restored), checked to be finite [B, C] logits;
    ``where`` names the inputs in the error (``fastrob._checks.check_logits``). A DDP model runs
    its wrapped module: evaluation forwards never communicate (``fastrob.distributed``)."""
    check_model(model)
    model = dist_utils.unwrap(model)
    check_model_input(model, x)
    with eval_mode(model):
        logits = model(x)
    check_logits(logits, x.shape[0], y, where=where)
    return logits.float()
