"""The command line's argument types (each a clear error naming what was expected) and the
arguments several subcommands share."""

from __future__ import annotations

import argparse


def _device(value: str) -> str:
    from fastrob._checks import check_device

    try:
        check_device(value, name="--device")
    except ValueError as err:
        # argparse names the option itself ("argument --device: ...")
        raise argparse.ArgumentTypeError(str(err).removeprefix("--device: ")) from None
    return value


SEED_MAX = 2**32 - 1  # numpy's RandomState (the data split) takes seeds in [0, 2**32)


def _seed(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if not 0 <= n <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer seed in [0, {SEED_MAX}], got {value!r}")
    return n


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _float(low: float = 0.0, strict: bool = False):
    """argparse type: a float >= low (> low when strict)."""

    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            x = float("nan")
        if not (x > low if strict else x >= low) or x != x or x == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a number {'>' if strict else '>='} {low:g}, got {value!r}")
        return x

    return parse


def _number_list(cast, what: str, example: str):
    """An argparse type: comma-separated numbers of type ``cast``, each finite and >= 0."""

    def parse(value: str) -> list:
        try:
            items = [cast(v) for v in value.split(",") if v.strip()]
        except ValueError:
            items = []
        if not items or min(items) < 0 or any(v != v or v == float("inf") for v in items):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what} >= 0, e.g. {example}; got {value!r}")
        return items

    return parse


_int_list = _number_list(int, "indices", "0,1,2")
_warmup_pair = _number_list(float, "epochs", "1,5")


def _warmup(value: str) -> list:
    pair = _warmup_pair(value)
    if len(pair) != 2 or pair[1] < pair[0]:
        raise argparse.ArgumentTypeError(f"expected START,FULL epochs with START <= FULL, e.g. 1,5; got {value!r}")
    return pair


_eps_list = _number_list(float, "radii", "0.05,0.1,0.2")


def _size(value: str) -> int:
    n = _positive_int(value)
    if n < 4:
        raise argparse.ArgumentTypeError(f"expected an image size >= 4, got {value!r}")
    return n


def _common(p, out_default: str, seed: int = 0) -> None:
    """--seed (default ``seed``: the subcommand's settings' own), --device, --out, --quiet."""
    p.add_argument("--seed", type=_seed, default=seed, help=f"random seed in [0, {SEED_MAX}] (default %(default)s)")
    p.add_argument("--device", type=_device, default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", default=out_default, help=f"output directory (default {out_default})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _checkpoint_args(p) -> None:
    p.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        metavar="PATH",
        help="a training output directory or its checkpoint.pt; repeat to compare models",
    )
    p.add_argument(
        "--data",
        default=None,
        help="digits, an .npz file or a folder of class subfolders (default: the checkpoint's data)",
    )
    p.add_argument("--size", type=_size, default=None, help="resize images to SIZE x SIZE (default: as trained)")
