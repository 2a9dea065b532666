"""What every ``runstate`` subcommand's parser shares: its name, help, description and options.

A command module's docstring is its ``--help`` description (its second paragraph, the first
being the usage line), so the text a user reads and the module's documentation cannot drift.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["add_command", "add_json_option"]


def add_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    func: Callable[[argparse.Namespace], int],
    *,
    help: str,
    doc: str | None,
) -> argparse.ArgumentParser:
    """Add the subcommand ``name`` that runs ``func``; returns its parser for its own arguments.

    Args:
        sub: the subparsers of ``runstate``.
        name: the command name (``show``).
        func: ``args -> exit code``.
        help: the one line ``runstate --help`` shows.
        doc: the command module's ``__doc__``; its second paragraph is the description.
    """
    parser = sub.add_parser(name, help=help, description=(doc or "").split("\n\n")[1])
    parser.set_defaults(func=func)
    return parser


def add_json_option(parser: argparse.ArgumentParser, instead_of: str = "tables") -> None:
    """Add ``--json``: print one JSON document instead of ``instead_of``."""
    parser.add_argument("--json", action="store_true", help=f"print JSON instead of {instead_of}")
