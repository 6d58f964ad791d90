"""The ``fastrob`` command."""

from __future__ import annotations

import argparse
import platform
import sys

import torch


def _info(args) -> int:
    import fastrob
    from fastrob import _backend

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"fastrob {fastrob.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton_version}")
    print(f"cpu: {torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            compiled = "" if _backend.extension_runs_on((p.major, p.minor)) else " (fastrob._C has no code for it)"
            print(f"cuda:{i}: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB"
                  f"{compiled}")
    else:
        print("cuda: no GPU visible (torch.cuda.is_available() is False)")
    record = _backend.extension_build_record()
    if record.get("built"):
        print(f"extension fastrob._C: built with {record.get('nvcc')} for sm_{', sm_'.join(record.get('archs', []))}")
    else:
        print(f"extension fastrob._C: not built ({record.get('reason')})")
    print("backends:")
    for name in ("torch", "triton", "cuda"):
        st = _backend.status(name)
        print(f"  {name:<7}{'available' if st.available else 'unavailable':<13}{st.reason}")
    return 0


def _demo(args) -> int:
    from fastrob import demo

    demo.run(epochs=args.epochs, seed=args.seed, device=args.device, quiet=args.quiet)
    return 0


def _device(value: str) -> str:
    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {value!r} (try cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda was asked for but no GPU is visible")
    return value


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastrob", description="Fast robust and interpretable classification.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("info", help="versions, devices and which backends can run here")
    p.set_defaults(func=_info)
    p = sub.add_parser("demo", help="train a small model on the digits data and attack it with PGD")
    p.add_argument("--epochs", type=_positive_int, default=30, help="training epochs (default 30)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", type=_device, default="cpu", help="torch device (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
