"""The ``runstate`` command line: a thin layer over the public API.

Why it stays thin: every command calls only what a program can call (the names in
``runstate.__all__``, plus ``runstate.demo`` for ``runstate demo``), so what ``ls``, ``show``,
``verify`` or ``gc`` report is exactly what the library sees. What a path on the command line
is (missing, a file, a checkpoint, a run directory) is asked of a ``runstate.storage`` Store;
the CLI never reaches into the format, adapters or engine (``runstate._impl``) layers.

Each command lives in its own module (:data:`COMMAND_MODULES`) with a ``register(subparsers)``
function that adds its parser and sets ``func`` (``args -> exit code``). Path arguments get
``~`` expanded as a shell would. Errors are one line on stderr and a non-zero exit code, never
a traceback: a ``CheckpointError`` exits 2, Ctrl-C 130, anything unexpected (a bug, or a
resource failure no command anticipated) exits 3 with its one-line summary; ``--debug`` adds
the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

import runstate
from runstate.cli._output import fail
from runstate.storage import local_path

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
    "runstate.cli.copy",
)

#: Exit code of an unexpected error (a bug in runstate, or e.g. MemoryError): one line, no traceback.
INTERNAL_ERROR = 3

_DEBUG_HELP = "on an unexpected error, print the Python traceback too"

#: The arguments that are paths: ``~`` is expanded as a shell would, also where no shell did it
#: (a quoted ``"~/runs/exp"``, ``-o=~/ckpt``), as ``runstate.save`` and ``CheckpointManager`` do.
_PATH_ARGS = ("dir", "ckpt", "path", "a", "b", "file", "output", "dest")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="runstate",
        description="Save, inspect and resume the whole state of training runs.",
    )
    parser.add_argument("--version", action="version", version=f"runstate {runstate.__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for command, subparser in sub.choices.items():
        if command != "run":  # run passes everything after its options to the training command
            subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in _PATH_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, name, local_path(value))  # also where no shell expanded it (-o=~/ckpt)
    try:
        code: int = args.func(args)
    except runstate.CheckpointError as exc:
        return fail(args.command, _text(exc))
    except KeyboardInterrupt:
        print(f"runstate {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the promise is one line, never a traceback
        if args.debug:
            traceback.print_exc()
        name, detail = type(exc).__name__, _text(exc)
        what = name if detail == name else f"{name}: {detail}"
        hint = "" if args.debug else f"; runstate {args.command} --debug prints the traceback"
        return fail(args.command, f"unexpected {what}{hint}", INTERNAL_ERROR)
    return code


def _text(exc: BaseException) -> str:
    """The message of ``exc``, even when making it fails (it may hold a value that cannot print)."""
    try:
        return str(exc) or type(exc).__name__
    except Exception:  # a __str__ that raises
        return type(exc).__name__
