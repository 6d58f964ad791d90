"""Data: digits at three sizes, user data from .npz files and class folders, clear errors."""

import numpy as np
import pytest
import torch

from fastrob.data import load_dataset, load_digits, load_folder, load_npz, loaders


def test_digits_sizes_keep_the_split_and_range(digits):
    assert digits.x_train.shape == (1347, 1, 8, 8) and digits.x_test.shape == (450, 1, 8, 8)
    for size in (16, 32):
        d = load_digits(size=size)
        assert d.x_train.shape == (1347, 1, size, size)
        assert torch.equal(d.y_test, digits.y_test)
        assert d.x_test.min() >= 0 and d.x_test.max() <= 1
        # upsampling then averaging back recovers the 8x8 images up to interpolation blur
        back = torch.nn.functional.avg_pool2d(d.x_test, size // 8)
        assert (back - digits.x_test).abs().mean() < 0.1
        assert (back - digits.x_test.flip(-1)).abs().mean() > 0.2  # the check can tell images apart
    # stratified: every class in the test split in its proportion
    counts = torch.bincount(digits.y_test, minlength=10)
    assert counts.min() >= 40
    with pytest.raises(ValueError, match="size must be one of"):
        load_digits(size=12)


def test_loaders_batch_and_shuffle_reproducibly(digits):
    a, test = loaders(digits, batch_size=100, seed=3)
    b, _ = loaders(digits, batch_size=100, seed=3)
    xa, ya = next(iter(a))
    xb, yb = next(iter(b))
    assert xa.shape == (100, 1, 8, 8) and torch.equal(ya, yb)
    assert sum(len(y) for _, y in test) == 450


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((40, 3, 6, 6)).astype(np.float32)
    y = np.arange(40) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y)
    split = load_npz(str(tmp_path / "d.npz"))
    assert split.x_train.shape[1:] == (3, 6, 6) and len(split.y_train) + len(split.y_test) == 40
    assert split.x_train.dtype == torch.float32 and split.y_train.dtype == torch.int64
    np.savez(tmp_path / "e.npz", x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:].astype(np.float64))
    split = load_npz(str(tmp_path / "e.npz"))
    assert torch.equal(split.y_test, torch.as_tensor(y[30:]))
    ds = load_dataset(str(tmp_path / "d.npz"), size=12)
    assert ds.in_shape == (3, 12, 12) and ds.num_classes == 4


@pytest.mark.parametrize(
    "arrays, words",
    [
        (dict(x=np.zeros((4, 1, 2, 2), np.float32)), "missing key"),
        (dict(images=np.zeros((4, 1, 2, 2)), labels=np.zeros(4)), "missing key"),
        (dict(x=np.zeros((4, 2, 2), np.float32), y=np.zeros(4, int)), "rank 4"),
        (dict(x=np.full((4, 1, 2, 2), 255.0), y=np.zeros(4, int)), r"\[0, 1\]"),
        (dict(x=np.zeros((4, 1, 2, 2), np.uint8), y=np.zeros(4, int)), "floating point"),
        (dict(x=np.zeros((4, 1, 2, 2)), y=np.zeros(3, int)), "3 labels but x has 4"),
        (dict(x=np.zeros((4, 1, 2, 2)), y=np.array([0, 1, 0.5, 1])), "integer class labels"),
        (dict(x=np.zeros((4, 1, 2, 2)), y=np.array(["a", "b", "a", "b"])), "integer class labels"),
        (dict(x=np.zeros((4, 1, 2, 2)), y=np.array([0, -1, 0, 1])), ">= 0"),
        (dict(x=np.full((4, 1, 2, 2), np.nan), y=np.zeros(4, int)), "NaN"),
    ],
)
def test_malformed_npz_files_give_clear_errors(tmp_path, arrays, words):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=words):
        load_npz(str(path))


def test_not_an_npz_file(tmp_path):
    path = tmp_path / "bad.npz"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not a valid .npz"):
        load_npz(str(path))
    with pytest.raises(ValueError, match="no such file or directory"):
        load_dataset(str(tmp_path / "missing"))


def _write_pngs(root, classes, n=6, size=(5, 5), mode="L"):
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            value = 40 * i if mode == "L" else (40 * i, 0, 255 - 40 * i)
            Image.new(mode, size, value).save(root / c / f"{i}.png")


def test_image_folder_grayscale_and_rgb(tmp_path):
    _write_pngs(tmp_path / "g", ["cat", "dog", "emu"])
    split, classes = load_folder(str(tmp_path / "g"))
    assert classes == ["cat", "dog", "emu"]
    assert split.x_train.shape[1:] == (1, 5, 5) and len(split.y_train) + len(split.y_test) == 18
    values = torch.cat([split.x_train, split.x_test]).unique()
    assert torch.allclose(values, torch.tensor([40.0 * i for i in range(6)]) / 255)
    _write_pngs(tmp_path / "c", ["a", "b"], mode="RGB")
    split, _ = load_folder(str(tmp_path / "c"))
    assert split.x_train.shape[1:] == (3, 5, 5)


def test_malformed_folders_give_clear_errors(tmp_path):
    _write_pngs(tmp_path / "one", ["a"])
    with pytest.raises(ValueError, match="at least 2"):
        load_folder(str(tmp_path / "one"))
    _write_pngs(tmp_path / "empty", ["a"])
    (tmp_path / "empty" / "b").mkdir()
    with pytest.raises(ValueError, match="'b' holds no PNG images"):
        load_folder(str(tmp_path / "empty"))
    _write_pngs(tmp_path / "sizes", ["a"], size=(5, 5))
    _write_pngs(tmp_path / "sizes", ["b"], size=(6, 5))
    with pytest.raises(ValueError, match="resize them to one size"):
        load_folder(str(tmp_path / "sizes"))
    (tmp_path / "broken" / "a").mkdir(parents=True)
    _write_pngs(tmp_path / "broken", ["b"])
    (tmp_path / "broken" / "a" / "x.png").write_text("not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        load_folder(str(tmp_path / "broken"))
