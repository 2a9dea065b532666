"""``runstate gc DIR``: remove the leftovers of interrupted saves and deletions.

A save killed half-way leaves a hidden ``.tmp-step-N-*`` directory, an interrupted deletion
a ``.del-step-N-*`` one; they were never committed and no reader ever sees them. gc removes
them while holding the run's writer lock, so it never touches a save in progress (it fails
when a live process writes to DIR). Committed checkpoints are never removed, nor are
damaged ones moved aside as ``step-N.corrupt-T`` (kept for inspection). The checkpoints of
a branch abandoned by a rollback (``step-N.abandoned-*``) are removed only with ``--abandoned``.
"""

from __future__ import annotations

import argparse

import runstate
from runstate.cli._output import echo, guarded, human_bytes, print_json, tree_size
from runstate.cli._paths import check_run_directory

__all__ = ["register"]


@guarded("gc")
def _gc(args: argparse.Namespace) -> int:
    directory: str = args.dir
    error = check_run_directory("gc", directory)
    if error is not None:
        return error
    with runstate.CheckpointManager(directory, read_only=True) as peek:  # takes no lock, writes nothing
        not_a_run = not peek.steps() and not peek.leftovers() and not peek.abandoned()
    if not_a_run:  # nothing to remove, and no .lock left behind (runstate gc ~ by mistake)
        if args.json:
            print_json({"directory": directory, "dry_run": args.dry_run, "removed": [], "nbytes": 0})
        else:
            echo(f"no leftovers in {directory}")
        return 0
    with runstate.CheckpointManager(directory) as mgr:
        aside = [path for _, path in mgr.abandoned()] if args.abandoned else []
        sizes = {path: tree_size(path) for path in [*mgr.leftovers(), *aside]}
        removed = mgr.clean(dry_run=args.dry_run, abandoned=args.abandoned)
    freed = sum(sizes.get(path, 0) for path in removed)
    if args.json:
        print_json({"directory": directory, "dry_run": args.dry_run, "removed": removed, "nbytes": freed})
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for path in removed:
        echo(f"{verb} {path} ({human_bytes(sizes.get(path, 0))})")
    if removed:
        echo(f"{verb} {len(removed)} leftover(s), {human_bytes(freed)}")
    else:
        echo(f"no leftovers in {directory}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``gc`` subcommand."""
    p = sub.add_parser(
        "gc",
        help="remove leftovers of interrupted saves (never a committed checkpoint)",
        description=(__doc__ or "").split("\n\n")[1],
    )
    p.add_argument("dir", metavar="DIR", help="the run directory")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.add_argument(
        "--abandoned",
        action="store_true",
        help="also remove the checkpoints of branches abandoned by a rollback (step-N.abandoned-*)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    p.set_defaults(func=_gc)
