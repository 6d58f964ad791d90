"""The smaller subcommands: ``info``, ``check``, ``demo`` and ``bench``."""

from __future__ import annotations

import platform
import sys

import torch

from fastrob.cli.args import _common, _device, _positive_int


def add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, devices and which backends can run here")
    p.set_defaults(func=_info)


def add_demo_bench_check(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="train plain, regularized and adversarially trained models on digits and compare their robustness",
        description="On the digits data: train a plain MLP and three robust ones (input gradient, "
        "Jacobian, TRADES), evaluate them side by side, print one table and write the "
        "plots and checkpoints to --out.",
    )
    p.add_argument("--epochs", type=_positive_int, default=30, help="training epochs per model (default 30)")
    p.add_argument(
        "--n", type=_positive_int, default=None, help="evaluate on the first N test images (default all 450)"
    )
    _common(p, "runs/demo")
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "bench",
        help="run the benchmarks against the reference implementations (from a source "
        "checkout), then regenerate the table of docs/benchmarks.md and bench/results/speedup.png",
    )
    p.add_argument("--quick", action="store_true", help="small shapes, fewer repetitions")
    p.add_argument(
        "--filter", metavar="SUBSTR", help=f"only the modules whose name contains SUBSTR ({', '.join(BENCH_MODULES)})"
    )
    p.set_defaults(func=_bench)

    p = sub.add_parser(
        "check",
        help="self-check every fused kernel on this machine's devices against the torch "
        "reference (value, first and second derivatives); exit status 1 on any mismatch",
        description="Self-check every fused kernel on this machine's devices against the torch reference "
        "(value, first and second derivatives) and print a table. Exit status: 0 when every check "
        "passes, 1 on any mismatch or error, 2 when there is nothing to check here (no CUDA GPU and "
        "TRITON_INTERPRET=1 not set; the reason goes to stderr).",
    )
    p.add_argument(
        "--device",
        action="append",
        type=_device,
        metavar="DEV",
        help="a device to check (repeatable; default: every GPU, or the CPU under TRITON_INTERPRET=1)",
    )
    p.add_argument("--op", action="append", choices=verify_ops(), help="only this op (repeatable; default: all)")
    p.add_argument(
        "--record",
        action="store_true",
        help="write the passing (op, backend, GPU) entries into the "
        "record fastrob/verified.json, which lets backend='auto' use them without a self-check",
    )
    p.add_argument("--record-path", metavar="FILE", help="the record to write (default: the package's)")
    p.add_argument(
        "--tests-passed",
        metavar="JUNIT_XML",
        help="a pytest --junitxml report whose passing tests of each op are added to its entries' evidence",
    )
    p.set_defaults(func=_check)


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
            print(
                f"cuda:{i}: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB"
                f"{compiled}"
            )
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
    from fastrob import verify

    print(verify.describe_record())
    return 0


def verify_ops() -> tuple:
    from fastrob.selfchecks import OPS

    return OPS


def _check(args) -> int:
    from fastrob import verify

    return verify.check_command(
        devices=args.device,
        ops=args.op,
        record=args.record,
        record_path=args.record_path,
        tests_passed=args.tests_passed,
    )


def _demo(args) -> int:
    from fastrob import demo

    demo.run(epochs=args.epochs, seed=args.seed, device=args.device, out=args.out, n=args.n, quiet=args.quiet)
    return 0


BENCH_MODULES = ("pgd_step", "ops", "regularizers", "attacks")


def _bench(args) -> int:
    import importlib
    from pathlib import Path

    modules = [m for m in BENCH_MODULES if args.filter is None or args.filter in m]
    if not modules:
        raise ValueError(f"--filter {args.filter!r} matches no benchmark module (of {', '.join(BENCH_MODULES)})")
    # a source checkout: the working directory, or the folder holding the fastrob package (fastrob/cli/__init__.py)
    package_file = Path(sys.modules[__package__].__file__).resolve()
    roots = [r for r in (Path.cwd(), package_file.parents[2]) if (r / "bench" / "report.py").is_file()]
    if not roots:
        raise ValueError("no bench/ folder here or beside the fastrob package: run from a fastrob source checkout")
    sys.path.insert(0, str(roots[0]))
    for name in modules:
        print(f"== bench.{name}", flush=True)
        importlib.import_module(f"bench.{name}").main(["--quick"] if args.quick else [])
    return importlib.import_module("bench.report").main([])
