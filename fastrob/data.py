"""Built-in real data: the scikit-learn digits set (1797 handwritten 8x8 digits, shipped inside
scikit-learn, so nothing is downloaded)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Split(NamedTuple):
    x_train: torch.Tensor  # [N, 1, 8, 8] float32 in [0, 1]
    y_train: torch.Tensor  # [N] int64 in 0..9
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Split:
    """The digits set as NCHW float32 images in [0, 1] with a stratified train/test split."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    y = torch.tensor(data.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=test_fraction,
                                           random_state=seed, stratify=y.numpy())
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return Split(x[idx_train], y[idx_train], x[idx_test], y[idx_test])
