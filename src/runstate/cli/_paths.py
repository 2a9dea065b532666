"""Checking the paths given on the command line, so a wrong one gets a precise one-line error."""

from __future__ import annotations

import os

import runstate
from runstate.cli._output import fail

__all__ = ["check_checkpoint", "check_run_directory"]

MANIFEST = "manifest.json"


def check_run_directory(command: str, directory: str) -> int | None:
    """None when ``directory`` can be a run directory; else print an error and return exit code 2."""
    if "://" in directory:  # a URL (s3://bucket/run): the library reports what is wrong with it
        return None
    if not os.path.exists(directory):
        return fail(command, f"no such directory: {directory}")
    if not os.path.isdir(directory):
        return fail(command, f"{directory} is a file, not a run directory")
    if os.path.lexists(os.path.join(directory, MANIFEST)):
        return fail(command, f"{directory} is a checkpoint, not a run directory; try: runstate show {directory}")
    return None


def check_checkpoint(command: str, path: str) -> int | None:
    """None when ``path`` looks like a checkpoint; else print an error and return exit code 2.

    A run directory gets a hint naming its newest checkpoint. Anything subtler (a damaged
    manifest) is left to the library, which reports it precisely.
    """
    if os.path.isdir(path) and not os.path.lexists(os.path.join(path, MANIFEST)):
        with runstate.CheckpointManager(path) as mgr:
            latest = mgr.latest_step()
            if latest is not None:
                return fail(
                    command,
                    f"{path} is a run directory, not a checkpoint; give one of its checkpoints, e.g. "
                    f"{mgr.path(latest)} (runstate ls {path} lists them)",
                )
    return None
