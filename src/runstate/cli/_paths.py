"""Checking the paths given on the command line, so a wrong one gets a precise one-line error.

A command that reads one checkpoint takes either the checkpoint directory itself
(``runs/exp/step-000000001000``) or the run directory plus ``--step N`` / ``--step latest``
(``runs/exp --step latest``): :func:`resolve_checkpoint` turns both into the checkpoint's path.
"""

from __future__ import annotations

import argparse

import runstate
from runstate.cli._output import fail
from runstate.storage import LocalStore

__all__ = [
    "LATEST",
    "StepChoice",
    "add_step_option",
    "check_checkpoint",
    "check_run_directory",
    "is_checkpoint",
    "resolve_checkpoint",
    "step_arg",
]

MANIFEST = "manifest.json"

#: The value of ``--step latest``: the newest committed step.
LATEST = "latest"

#: What ``--step`` holds once parsed: a step number, ``LATEST``, or None when not given.
StepChoice = int | str | None


def step_arg(text: str) -> int | str:
    """Parse a ``--step`` value: a non-negative integer or ``latest``."""
    if text.strip().lower() == LATEST:
        return LATEST
    try:
        step = int(text)
    except ValueError:
        step = -1
    if step < 0:
        raise argparse.ArgumentTypeError(f"expected a step number >= 0 or 'latest', got {text!r}")
    return step


def add_step_option(parser: argparse.ArgumentParser, *flags: str, help: str | None = None) -> None:
    """Add ``--step N|latest`` (or the given flags) to a command that reads one checkpoint."""
    parser.add_argument(
        *(flags or ("--step",)),
        type=step_arg,
        metavar="N|latest",
        help=help or "read step N (or the newest step) of the run directory given instead of a checkpoint",
    )


def _is_url(path: str) -> bool:
    return "://" in path


def check_run_directory(command: str, directory: str) -> int | None:
    """None when ``directory`` can be a run directory; else print an error and return exit code 2."""
    if _is_url(directory):  # a URL (s3://bucket/run): the library reports what is wrong with it
        return None
    store = LocalStore(directory)
    kind = store.kind()
    if kind is None:
        return fail(command, f"no such directory: {directory}")
    if kind != "directory":
        return fail(command, f"{directory} is a file, not a run directory")
    if store.exists(MANIFEST):
        return fail(command, f"{directory} is a checkpoint, not a run directory; try: runstate show {directory}")
    return None


def check_checkpoint(command: str, path: str) -> int | None:
    """None when ``path`` looks like a checkpoint; else print an error and return exit code 2.

    A run directory gets a hint naming its newest checkpoint and ``--step latest``. Anything
    subtler (a damaged manifest) is left to the library, which reports it precisely.
    """
    store = None if _is_url(path) else LocalStore(path)
    if store is not None and store.kind() == "directory" and not store.exists(MANIFEST):
        with runstate.CheckpointManager(path, read_only=True) as mgr:
            latest = mgr.latest_step()
            if latest is not None:
                return fail(
                    command,
                    f"{path} is a run directory, not a checkpoint; add --step N or --step latest, or give one of "
                    f"its checkpoints, e.g. {mgr.path(latest)} (runstate ls {path} lists them)",
                )
    return None


def is_checkpoint(path: str) -> bool:
    """True when ``path`` holds a manifest (for a URL: when it can be inspected as a checkpoint)."""
    if not _is_url(path):
        return LocalStore(path).exists(MANIFEST)
    try:
        runstate.inspect(path)
    except runstate.CheckpointNotFoundError:
        return False
    return True


def _steps_text(steps: list[int]) -> str:
    shown = ", ".join(str(s) for s in steps[-5:])
    return shown if len(steps) <= 5 else f"..., {shown}"


def resolve_checkpoint(command: str, path: str, step: StepChoice, *, option: str = "--step") -> str | int:
    """The checkpoint a command reads: ``path`` itself, or step ``step`` of the run directory ``path``.

    Args:
        command: the command's name, for error lines.
        path: a checkpoint directory, or a run directory when ``step`` is given.
        step: None, a step number, or ``LATEST``.
        option: the flag that gave ``step``, for error lines.

    Returns:
        The checkpoint's path, or an exit code after an error line on stderr.
    """
    if step is None:
        error = check_checkpoint(command, path)
        return path if error is None else error
    if not _is_url(path):
        kind = LocalStore(path).kind()
        if kind is None:
            return fail(command, f"no such run directory: {path}")
        if kind != "directory":
            return fail(command, f"{path} is a file; {option} needs a run directory")
    if is_checkpoint(path):
        return fail(
            command,
            f"{path} is a checkpoint; {option} picks a checkpoint of a run directory (give the run directory, "
            f"or the checkpoint without {option})",
        )
    with runstate.CheckpointManager(path, read_only=True) as mgr:
        steps = mgr.steps()
        if not steps:
            return fail(command, f"{path} holds no committed checkpoint (runstate ls {path} shows what it holds)")
        if isinstance(step, str):  # LATEST: step_arg allows no other string
            return mgr.path(steps[-1])
        if step not in steps:
            return fail(command, f"{path} has no checkpoint of step {step}; its steps are {_steps_text(steps)}")
        return mgr.path(step)
