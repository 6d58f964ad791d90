"""The ``fastrob`` command: one module per subcommand (``train``, ``evaluate``, ``explain``; the
small ones in ``tools``), their shared argument types in ``args``."""

from __future__ import annotations

import argparse
import sys

from fastrob.cli import evaluate, explain, tools, train

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastrob", description="Fast robust and interpretable classification.")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of any error (also FASTROB_DEBUG=1), for bug reports",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tools.add_info(sub)
    train.add_parser(sub)
    evaluate.add_parser(sub)
    explain.add_parser(sub)
    tools.add_demo_bench_check(sub)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse's parser (the subcommands' too) with its errors in one line (``fastrob: error:
    ...``, exit status 2), as every other fastrob error, instead of the usage block first, and no
    abbreviated options: ``--n`` is not taken for ``--norm``, nor ``--epoch`` for ``--epochs``."""

    def __init__(self, *args, allow_abbrev=False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message):
        self.exit(2, f"fastrob: error: {message} (see: {self.prog} --help)\n")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"fastrob: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand (see ``_main``); an interrupt at any point, also while the parser is
    built, is one line and exit status 130."""
    import os

    try:
        return _main(argv)
    except KeyboardInterrupt:
        argv = sys.argv[1:] if argv is None else argv
        if "--debug" in argv or os.environ.get("FASTROB_DEBUG", "") not in ("", "0"):
            raise
        print("fastrob: interrupted", file=sys.stderr)
        sys.exit(130)


def _main(argv: list[str] | None = None) -> int:
    """Runs one subcommand. A user error (bad data or settings found after parsing: ValueError,
    TypeError) or an I/O failure (OSError: disk full, permission denied) is one line on stderr,
    exit status 2 and 1; any other exception is a bug and keeps its traceback. --debug or
    FASTROB_DEBUG=1 shows the traceback of every error."""
    import os
    import warnings

    from fastrob._optional import MissingDependency

    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("FASTROB_DEBUG", "") not in ("", "0")
    if getattr(args, "out", None) is not None:
        from fastrob._rundir import check_out_dir

        try:
            check_out_dir(args.out)  # before any compute: a run must never be lost at its end
        except ValueError as err:
            parser.exit(2, f"fastrob: error: {err}\n")
    try:
        with warnings.catch_warnings():
            if not debug:  # a warning (e.g. what --resume ignored) is one line too
                warnings.showwarning = _one_line_warning
            return args.func(args)
    except MissingDependency as err:
        if debug:
            raise
        parser.exit(1, f"fastrob: error: {err}\n")
    except (ValueError, TypeError) as err:
        if debug:
            raise
        # bad data or settings found after parsing: one line, as argparse reports its own errors
        parser.exit(2, f"fastrob: error: {err}\n")
    except OSError as err:
        if debug:
            raise
        parser.exit(
            1, f"fastrob: error: {err.strerror or err}{f': {err.filename}' if getattr(err, 'filename', None) else ''}\n"
        )
