"""The attacks' rows: an attacked batch becomes rows (restarts, target classes), row i attacking
sample ``samples[i]``; rows leave as their sample is settled. ``Rows`` keeps the per-row tensors
together, ``first_rows`` picks the row whose iterate a sample keeps when several succeed at once:
the first one (the lowest row index, i.e. restart or target order)."""

from __future__ import annotations

import torch


class Rows:
    """Named per-row tensors (and per-call constants): row i of every tensor attribute belongs to
    the same iterate. ``keep(mask)`` drops the other rows from every tensor attribute."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def keep(self, mask: torch.Tensor) -> None:
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, value[mask])


def first_rows(hit: torch.Tensor, samples: torch.Tensor, n_samples: int) -> torch.Tensor:
    """Per sample [n_samples], the lowest row i with ``hit[i]`` among the rows of that sample
    (``samples[i]``), or len(hit) where no row hits: first row per sample wins. No host
    synchronisation."""
    n_rows = hit.numel()
    rows = torch.arange(n_rows, device=samples.device)
    first = torch.full((n_samples,), n_rows, device=samples.device, dtype=torch.long)
    return first.scatter_reduce_(0, samples, torch.where(hit, rows, torch.full_like(rows, n_rows)), reduce="amin")
