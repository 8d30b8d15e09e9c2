"""`l7fp` command line: one subcommand per module, registered below.

Each module in SUBCOMMANDS exposes `register(subparsers)`, which adds its
subparser and sets `func` (a callable taking the parsed args and returning an
exit code). Modules are imported only to build the parser, so a subcommand's
heavy imports belong inside its `func`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

SUBCOMMANDS: tuple[str, ...] = (
    "xds_server.serve",
    "xds_server.bootstrap",
    "mesh.demo",
    "fastpath.cli_split",
    "mesh.cli",
    "benchmarks.cli",
    "xds_server.istio.cli",
)

DESCRIPTION = """\
L7FP: an Envoy xDS control plane that offloads the kernel-enforceable part of
L7 mesh policy to eBPF, with Envoy sidecars as the slow path.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l7fp", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"],
        help="logging verbosity (default: info)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports every subcommand (~1 s): an early Ctrl-C lands here
    except KeyboardInterrupt:  # nothing started yet; was a traceback through importlib
        return 130
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # what is still buffered meets a closed pipe here, not at exit
        return status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `l7fp split --explain DIR | head`: the reader left, not an error of ours
        _quiet_stdout()
        return 1


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise again
    (the recipe of the Python docs, "Note on SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
