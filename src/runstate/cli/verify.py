"""``runstate verify PATH``: check every byte of a checkpoint, or of every checkpoint of a run.

The manifest's checksum, each file's size and safetensors header, and every tensor's XXH3
checksum are checked; every problem found is printed on its own line. Exit code 0 when all
checkpoints pass, 1 when any fails, 2 when PATH is neither a checkpoint nor a run directory.
"""

from __future__ import annotations

import argparse
import os

import runstate
from runstate.cli._output import Progress, fail, guarded, human_bytes, print_json

__all__ = ["register"]


def _targets(path: str) -> tuple[list[str], list[str]] | int:
    """The checkpoints to verify and the leftovers found, or an exit code after an error line."""
    if "://" in path:  # s3://bucket/run or s3://bucket/run/step-...: credentials from the environment
        try:
            runstate.inspect(path)
            return [path], []
        except runstate.CheckpointNotFoundError:
            pass  # a run directory, or nothing: the manager says which
    elif not os.path.lexists(path):
        return fail("verify", f"no such checkpoint or run directory: {path}")
    elif not os.path.isdir(path):
        return fail("verify", f"{path} is a file; give a checkpoint directory or a run directory")
    elif os.path.lexists(os.path.join(path, "manifest.json")):
        return [path], []
    with runstate.CheckpointManager(path) as mgr:
        targets = [mgr.path(step) for step in mgr.steps()]
        leftovers = mgr.leftovers()
    if not targets:
        return fail("verify", f"{path} is not a checkpoint (no manifest.json) and holds no step-* checkpoint")
    return targets, leftovers


@guarded("verify")
def _verify(args: argparse.Namespace) -> int:
    found = _targets(args.path)
    if isinstance(found, int):
        return found
    targets, leftovers = found
    reports: list[runstate.VerifyReport] = []
    with Progress() as progress:
        advance = progress.task("verifying checkpoints", total=len(targets))
        for target in targets:
            reports.append(runstate.verify(target))
            advance(1)
    ok = all(r.ok for r in reports)
    if args.json:
        print_json({"path": args.path, "ok": ok, "checkpoints": reports})
        return 0 if ok else 1
    for r in reports:
        checked = f"{r.tensors_checked} tensors, {human_bytes(r.nbytes_checked)} checked"
        if r.ok:
            print(f"OK      {r.path}  ({checked})")
        else:
            n = len(r.problems)
            print(f"FAILED  {r.path}  ({n} problem{'s' if n != 1 else ''}; {checked})")
            for problem in r.problems:
                print(f"  {r.path}: {problem}")
    if len(reports) > 1:
        passed = sum(r.ok for r in reports)
        print(f"{passed} of {len(reports)} checkpoints passed")
    if leftovers:
        print(f"{len(leftovers)} leftover(s) of interrupted saves ignored; runstate gc {args.path} removes them")
    return 0 if ok else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``verify`` subcommand."""
    p = sub.add_parser(
        "verify",
        help="check every byte of a checkpoint or of every checkpoint of a run directory",
        description=(__doc__ or "").split("\n\n")[1],
    )
    p.add_argument(
        "path", metavar="PATH", help="a checkpoint directory, or a run directory to check all its checkpoints"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    p.set_defaults(func=_verify)
