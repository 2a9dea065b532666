"""``runstate verify PATH``: check every byte of a checkpoint, or of every checkpoint of a run.

The manifest's checksum, each file's size and safetensors header, and every tensor's XXH3
checksum are checked; every problem found is printed on its own line. Exit code 0 when all
checkpoints pass, 1 when any fails, 2 when PATH is neither a checkpoint nor a run directory.
With ``--step N`` or ``--step latest``, only that step of the run directory PATH is checked.
"""

from __future__ import annotations

import argparse
from typing import Any

import runstate
from runstate.cli._commands import add_command, add_json_option
from runstate.cli._output import Progress, echo, fail, guarded, human_bytes, print_json
from runstate.cli._paths import StepChoice, add_step_option, is_checkpoint, resolve_checkpoint
from runstate.storage import LocalStore, is_url

__all__ = ["register"]


def _targets(path: str, step: StepChoice) -> tuple[list[str], list[str]] | int:
    """The checkpoints to verify and the leftovers found, or an exit code after an error line."""
    if step is not None:
        found = resolve_checkpoint("verify", path, step)
        return found if isinstance(found, int) else ([found], [])
    if not is_url(path):  # a URL (s3://bucket/run or s3://bucket/run/step-...): the library says what is wrong
        kind = LocalStore(path).kind()
        if kind is None:
            return fail("verify", f"no such checkpoint or run directory: {path}")
        if kind != "directory":
            return fail("verify", f"{path} is a file; give a checkpoint directory or a run directory")
    if is_checkpoint(path):
        return [path], []
    with runstate.CheckpointManager(path, read_only=True) as mgr:
        targets = [mgr.path(step) for step in mgr.steps()]
        leftovers = mgr.leftovers()
    if not targets:
        return fail("verify", f"{path} is not a checkpoint (no manifest.json) and holds no step-* checkpoint")
    return targets, leftovers


def _deleted_meanwhile(target: str) -> bool:
    """True when ``target`` is no longer a checkpoint: the run's writer deleted it (retention)
    while it was being verified, which is not damage."""
    try:
        runstate.inspect(target)
    except runstate.CheckpointNotFoundError:
        return True
    except runstate.CheckpointError:
        return False  # still there, damaged: the report says how
    return False


def _as_json(report: runstate.VerifyReport) -> dict[str, Any]:
    """A report as ``--json`` prints it (``ok`` is a property, which a dataclass's fields leave out)."""
    return {
        "path": report.path,
        "ok": report.ok,
        "problems": report.problems,
        "tensors_checked": report.tensors_checked,
        "nbytes_checked": report.nbytes_checked,
    }


@guarded("verify")
def _verify(args: argparse.Namespace) -> int:
    found = _targets(args.path, args.step)
    if isinstance(found, int):
        return found
    targets, leftovers = found
    reports: list[runstate.VerifyReport] = []
    deleted: list[str] = []
    with Progress() as progress:
        advance = progress.task("verifying checkpoints", total=len(targets))
        for _attempt in range(100):
            for target in targets:
                report = runstate.verify(target)
                if report.ok or not _deleted_meanwhile(target):
                    reports.append(report)
                else:
                    deleted.append(target)
                advance(1)
            if reports or args.step is not None:
                break
            found = _targets(args.path, None)  # every one was deleted meanwhile: list the run again
            if isinstance(found, int):
                return found
            targets = [t for t in found[0] if t not in deleted]
    if not reports:
        return fail("verify", f"every checkpoint of {args.path} was deleted by its writer while being verified")
    ok = all(r.ok for r in reports)
    if args.json:
        print_json({"path": args.path, "ok": ok, "checkpoints": [_as_json(r) for r in reports]})
        return 0 if ok else 1
    for r in reports:
        checked = f"{r.tensors_checked} tensors, {human_bytes(r.nbytes_checked)} checked"
        if r.ok:
            echo(f"OK      {r.path}  ({checked})")
        else:
            n = len(r.problems)
            echo(f"FAILED  {r.path}  ({n} problem{'s' if n != 1 else ''}; {checked})")
            for problem in r.problems:
                echo(f"  {r.path}: {problem}")
    if len(reports) > 1:
        passed = sum(r.ok for r in reports)
        echo(f"{passed} of {len(reports)} checkpoints passed")
    if deleted:
        echo(f"{len(deleted)} checkpoint(s) deleted by the run's writer while being verified (not damage): skipped")
    if leftovers:
        echo(f"{len(leftovers)} leftover(s) of interrupted saves ignored; runstate gc {args.path} removes them")
    return 0 if ok else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``verify`` subcommand."""
    p = add_command(
        sub,
        "verify",
        _verify,
        help="check every byte of a checkpoint or of every checkpoint of a run directory",
        doc=__doc__,
    )
    p.add_argument(
        "path", metavar="PATH", help="a checkpoint directory, or a run directory to check all its checkpoints"
    )
    add_step_option(p, help="check only step N (or the newest step) of the run directory PATH")
    add_json_option(p, "lines")
