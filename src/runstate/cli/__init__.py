"""The ``runstate`` command line. It only calls the public API.

Each command lives in its own module with a ``register(subparsers)`` function that adds its
parser and sets ``func`` (``args -> exit code``). Errors are one line on stderr and a non-zero
exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import runstate

__all__ = ["main"]

#: Modules that register a subcommand, in the order ``--help`` lists them.
COMMAND_MODULES = (
    "runstate.cli.run",
    "runstate.cli.demo",
    "runstate.cli.ls",
    "runstate.cli.show",
    "runstate.cli.verify",
    "runstate.cli.diff",
    "runstate.cli.export",
    "runstate.cli.import_pt",
    "runstate.cli.gc",
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="runstate",
        description="Save, inspect and resume the whole state of training runs.",
    )
    parser.add_argument("--version", action="version", version=f"runstate {runstate.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except runstate.CheckpointError as exc:
        print(f"runstate {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"runstate {args.command}: interrupted", file=sys.stderr)
        return 130
    return code
