"""What the metrics share: reading ``data`` (an (x, y) pair or a DataLoader) in batches, the
device, the progress bar, and the clean pass."""

from __future__ import annotations

from typing import Iterator

import torch
from tqdm import tqdm

from fastrob._checks import check_int, check_labels, check_logits, check_model, check_tensor


def model_device(model, device=None) -> torch.device:
    """``device`` if given, else the device of the model's first parameter, else cpu."""
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def num_samples(data) -> int | None:
    if isinstance(data, (tuple, list)):
        return len(data[1])
    dataset = getattr(data, "dataset", None)
    try:
        return len(dataset)
    except TypeError:
        return None


def batches(data, batch_size: int, device: torch.device, *, desc: str, quiet: bool,
            limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches on ``device`` with a tqdm bar counting samples.

    data: a pair (x [N, ...] float in [0, 1], y [N] int) cut into ``batch_size`` chunks, or any
    iterable of (x, y) batches (a DataLoader), used as it batches. ``limit``: stop after that
    many samples (the last batch is cut)."""
    batch_size = check_int("batch_size", batch_size, 1)
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ValueError(f"data must be a pair (x, y) or a DataLoader of (x, y) batches, got a "
                             f"{type(data).__name__} of length {len(data)}")
        xs, ys = data
        check_tensor("x", xs, min_dim=2)
        ys = check_labels(ys, xs.shape[0])
        source = [(xs[i:i + batch_size], ys[i:i + batch_size]) for i in range(0, len(ys), batch_size)]
    elif hasattr(data, "__iter__") and not isinstance(data, torch.Tensor):
        source = data
    else:
        raise TypeError(f"data must be a pair (x, y) or a DataLoader of (x, y) batches, got {type(data).__name__}")
    total = num_samples(data)
    if limit is not None:
        total = limit if total is None else min(total, limit)
    seen = 0
    with tqdm(total=total, desc=desc, unit="img", disable=quiet, leave=False) as bar:
        for item in source:
            if not (isinstance(item, (tuple, list)) and len(item) >= 2):
                raise ValueError("each batch of data must be a pair (x, y)")
            x, y = item[0], item[1]
            check_tensor("x", x, min_dim=2)
            y = check_labels(y, x.shape[0])
            if limit is not None and seen + len(y) > limit:
                x, y = x[:limit - seen], y[:limit - seen]
            if len(y) == 0:
                break
            seen += len(y)
            yield x.to(device), y.to(device)
            bar.update(len(y))
            if limit is not None and seen >= limit:
                break


@torch.no_grad()
def clean_logits(model, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """model(x) in eval mode (the mode is restored), checked to be [B, C] logits."""
    check_model(model)
    training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        logits = model(x)
    finally:
        if isinstance(model, torch.nn.Module):
            model.train(training)
    check_logits(logits, x.shape[0], y)
    return logits.float()
