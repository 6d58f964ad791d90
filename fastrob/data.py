"""Data: the built-in scikit-learn digits set (1797 handwritten 8x8 digits, shipped inside
scikit-learn, so nothing is downloaded), optionally upsampled to 16x16 or 32x32 for CNNs, and
user data from an ``.npz`` file or an ImageFolder-like directory of PNGs.

Every loader returns a ``Split`` of NCHW float32 images in [0, 1] and int64 labels. Malformed
user data raises a ValueError that says what is wrong (missing keys, wrong rank, values outside
[0, 1], label count or type, empty folders).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fastrob._optional import require

SIZES = (8, 16, 32)
IMAGE_SUFFIXES = (".png",)
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive's first bytes (an empty one: the second)


class Split(NamedTuple):
    x_train: torch.Tensor  # [N, C, H, W] float32 in [0, 1]
    y_train: torch.Tensor  # [N] int64 in 0..C-1
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(test_fraction: float = 0.25, seed: int = 0, size: int = 8) -> Split:
    """The digits set as [N, 1, size, size] float32 images in [0, 1] with a stratified split.

    size 8 is the original resolution; 16 and 32 upsample bilinearly (values stay in [0, 1]),
    which gives CNNs and PreAct-ResNet-18 room for their strides."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    data = require("sklearn.datasets", "the digits data", "scikit-learn").load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    y = torch.tensor(data.target, dtype=torch.int64)
    split = split_data(x, y, test_fraction=test_fraction, seed=seed)
    if size == 8:
        return split
    return Split(resize(split.x_train, size), split.y_train, resize(split.x_test, size), split.y_test)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of NCHW images to size x size, clamped back to [0, 1]."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)


def split_data(x: torch.Tensor, y: torch.Tensor, test_fraction: float = 0.25, seed: int = 0) -> Split:
    """A stratified train/test split (stratified only when every class has 2 or more samples)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    train_test_split = require("sklearn.model_selection", "the train/test split", "scikit-learn").train_test_split

    counts = torch.bincount(y)
    stratify = y.numpy() if bool((counts[counts > 0] >= 2).all()) else None
    try:
        idx_train, idx_test = train_test_split(
            np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=stratify
        )
    except ValueError as err:  # too few samples for the split asked
        raise ValueError(f"cannot split {len(y)} samples with test_fraction={test_fraction}: {err}") from None
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return Split(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


def loaders(split: Split, batch_size: int = 128, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """(train loader, shuffled by a generator seeded with ``seed``; test loader, in order)."""
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(
        TensorDataset(split.x_train, split.y_train), batch_size=batch_size, shuffle=True, generator=generator
    )
    test = DataLoader(TensorDataset(split.x_test, split.y_test), batch_size=batch_size)
    return train, test


# ----------------------------------------------------------------------------------------------
# user data


def check_images(x, y, source: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """x as float32 NCHW in [0, 1] and y as int64 labels of the same length, or a ValueError
    naming ``source`` and what is wrong."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 4:
        raise ValueError(f"{source}: x must have rank 4 (N, C, H, W), got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{source}: x holds no samples")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{source}: x must be floating point in [0, 1], got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"{source}: x contains NaN or infinite values")
    if x.min() < 0 or x.max() > 1:
        raise ValueError(f"{source}: x must lie in [0, 1], got values in [{x.min():.4g}, {x.max():.4g}]")
    if y.ndim != 1:
        raise ValueError(f"{source}: y must have rank 1 (N,), got shape {y.shape}")
    if len(y) != len(x):
        raise ValueError(f"{source}: y has {len(y)} labels but x has {len(x)} samples")
    if np.issubdtype(y.dtype, np.floating):
        if not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise ValueError(f"{source}: y must hold integer class labels, got non-integer values")
    elif not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{source}: y must hold integer class labels, got dtype {y.dtype}")
    if y.min() < 0:
        raise ValueError(f"{source}: y must hold labels >= 0, got {y.min()}")
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y.astype(np.int64))


def load_npz(path: str, test_fraction: float = 0.25, seed: int = 0) -> Split:
    """An .npz file with arrays ``x`` (float NCHW in [0, 1]) and ``y`` (integer labels), split into
    train/test; or with ``x_train``, ``y_train``, ``x_test``, ``y_test`` used as given."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic not in ZIP_MAGIC:  # numpy would call a text file "pickled data"
        raise ValueError(
            f"{path}: not a valid .npz file (an .npz is a zip archive written by numpy.savez; "
            f"this file starts with {magic!r})"
        )
    try:
        arrays = np.load(path, allow_pickle=False)
        keys = set(arrays.files)
    except Exception as err:  # a damaged zip
        raise ValueError(f"{path}: not a valid .npz file ({type(err).__name__}: {err})") from None

    def array(key):
        try:
            return arrays[key]
        except ValueError:  # allow_pickle=False refuses object arrays, without naming the file
            raise ValueError(
                f"{path}: array {key!r} holds Python objects (dtype object); store numeric arrays "
                "(float images, integer labels)"
            ) from None
        except Exception as err:  # a truncated or corrupt member
            raise ValueError(f"{path}: array {key!r} cannot be read ({type(err).__name__}: {err})") from None

    if {"x_train", "y_train", "x_test", "y_test"} <= keys:
        x_train, y_train = check_images(array("x_train"), array("y_train"), f"{path} (train)")
        x_test, y_test = check_images(array("x_test"), array("y_test"), f"{path} (test)")
        if x_train.shape[1:] != x_test.shape[1:]:
            raise ValueError(
                f"{path}: x_train and x_test images differ in shape "
                f"({tuple(x_train.shape[1:])} vs {tuple(x_test.shape[1:])})"
            )
        return Split(x_train, y_train, x_test, y_test)
    missing = [k for k in ("x", "y") if k not in keys]
    if missing:
        raise ValueError(
            f"{path}: missing key(s) {', '.join(missing)} (expected arrays x and y, or "
            f"x_train, y_train, x_test, y_test; found {', '.join(sorted(keys)) or 'none'})"
        )
    x, y = check_images(array("x"), array("y"), path)
    return split_data(x, y, test_fraction=test_fraction, seed=seed)


def load_folder(path: str, test_fraction: float = 0.25, seed: int = 0) -> tuple[Split, list[str]]:
    """An ImageFolder-like directory: one subfolder per class (sorted names give labels 0, 1, ...)
    of PNG images, all of one size. Grayscale when every image is, else RGB (alpha dropped).
    Returns the split and the class names."""
    Image = require("PIL.Image", "reading image folders", "pillow")  # noqa: N806 (the module's own name)

    if not os.path.isdir(path):
        raise ValueError(f"{path}: not a directory")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if len(classes) < 2:
        raise ValueError(f"{path}: expected one subfolder per class (at least 2), found {len(classes)}")
    images, labels, size = [], [], None
    for label, name in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(path, name)) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise ValueError(f"{path}: class folder {name!r} holds no PNG images")
        for f in files:
            file = os.path.join(path, name, f)
            try:
                with Image.open(file) as im:
                    im = im.convert("RGB")
                    arr = np.asarray(im, dtype=np.float32) / 255.0
            except Exception as err:
                raise ValueError(f"{file}: not a readable image ({type(err).__name__})") from None
            if size is None:
                size = arr.shape
            elif arr.shape != size:
                raise ValueError(
                    f"{file}: image of size {arr.shape[1]}x{arr.shape[0]}, the others are "
                    f"{size[1]}x{size[0]}; resize them to one size first"
                )
            images.append(arr.transpose(2, 0, 1))
            labels.append(label)
    x = np.stack(images)
    if np.array_equal(x[:, 0], x[:, 1]) and np.array_equal(x[:, 0], x[:, 2]):
        x = x[:, :1]  # grayscale stored as RGB
    x, y = check_images(x, np.asarray(labels), path)
    return split_data(x, y, test_fraction=test_fraction, seed=seed), classes


class Dataset(NamedTuple):
    name: str
    split: Split
    num_classes: int
    in_shape: tuple  # (C, H, W)


def load_dataset(spec: str, size: int | None = None, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """``"digits"``, a path to an .npz file, or an ImageFolder-like directory (see above).
    ``size`` resizes the images to size x size (digits: 8, 16 or 32; default: as stored)."""
    if spec == "digits":
        split = load_digits(test_fraction, seed, 8 if size is None else size)
    elif os.path.isdir(spec):
        split, _ = load_folder(spec, test_fraction, seed)
    elif spec.endswith(".npz") or os.path.isfile(spec):
        split = load_npz(spec, test_fraction, seed)
    else:
        raise ValueError(
            f"data must be 'digits', an .npz file or a directory of class folders, got {spec!r} "
            "(no such file or directory)"
        )
    if size is not None and spec != "digits":
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        split = Split(resize(split.x_train, size), split.y_train, resize(split.x_test, size), split.y_test)
    num_classes = check_label_range(torch.cat([split.y_train, split.y_test]), spec)
    return Dataset(spec, split, num_classes, tuple(split.x_train.shape[1:]))


def check_label_range(y: torch.Tensor, source: str) -> int:
    """The number of classes, max(y) + 1, after checking that the labels are (nearly) 0..K-1.

    Labels that leave most class indices unused (e.g. {0, 1000, 2000, 3000}: 4 classes, 3001
    outputs) are refused rather than mapped to 0..3: a silent mapping would make the model's
    class k mean something else than label k in any other data evaluated with it. A few unused
    indices (a class absent from the data) are accepted: at least half must occur."""
    num_classes = int(y.max()) + 1
    used = int(torch.unique(y).numel())
    if num_classes < 2:
        raise ValueError(f"{source}: needs at least 2 classes, got labels of {num_classes}")
    if used * 2 < num_classes:
        raise ValueError(
            f"{source}: the labels use {used} distinct values up to {num_classes - 1}, so a model "
            f"would have {num_classes} outputs of which {num_classes - used} never occur; relabel the "
            f"classes as 0..{used - 1} (e.g. numpy.unique(y, return_inverse=True)[1])"
        )
    return num_classes


def subset(x: torch.Tensor, y: torch.Tensor, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n samples (all when n is None or larger)."""
    return (x, y) if n is None or n >= len(y) else (x[:n], y[:n])


__all__: Sequence[str] = [
    "Split",
    "Dataset",
    "load_digits",
    "load_npz",
    "load_folder",
    "load_dataset",
    "loaders",
    "resize",
    "split_data",
    "check_images",
    "subset",
    "SIZES",
]
