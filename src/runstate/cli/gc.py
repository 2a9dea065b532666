"""``runstate gc DIR``: remove the leftovers of interrupted saves and deletions.

A save killed half-way leaves a hidden ``.tmp-step-N-*`` directory, an interrupted deletion
a ``.del-step-N-*`` one; they were never committed and no reader ever sees them. gc removes
them while holding the run's writer lock, so it never touches a save in progress (it fails
when a live process writes to DIR). Committed checkpoints are never removed, nor are
damaged ones moved aside as ``step-N.corrupt-T`` (kept for inspection). The checkpoints of
a branch abandoned by a rollback (``step-N.abandoned-*``) are removed only with ``--abandoned``.
In an incremental run, the files of the ``blobs/`` folder that no checkpoint refers to any more
are removed too (never one a checkpoint, damaged or abandoned ones included, refers to; nothing
at all while a manifest cannot be read).
"""

from __future__ import annotations

import argparse

import runstate
from runstate.cli._commands import add_command, add_json_option
from runstate.cli._output import echo, guarded, human_bytes, print_json
from runstate.cli._paths import check_run_directory
from runstate.storage import ABANDONED, BLOBS_DIR, INTERRUPTED_DELETION, INTERRUPTED_SAVE, open_store

__all__ = ["register"]


@guarded("gc")
def _gc(args: argparse.Namespace) -> int:
    directory: str = args.dir
    error = check_run_directory("gc", directory)
    if error is not None:
        return error
    store = open_store(directory)
    with runstate.CheckpointManager(directory, read_only=True) as peek:  # takes no lock, writes nothing
        not_a_run = not peek.steps() and not peek.leftovers() and not peek.abandoned() and not store.list_blobs()
    if not_a_run:  # nothing to remove, and no .lock left behind (runstate gc ~ by mistake)
        if args.json:
            print_json({"directory": directory, "dry_run": args.dry_run, "removed": [], "nbytes": 0})
        else:
            echo(f"no leftovers in {directory}")
        return 0
    kinds = {INTERRUPTED_SAVE, INTERRUPTED_DELETION} | ({ABANDONED} if args.abandoned else set())
    with runstate.CheckpointManager(directory) as mgr:  # holds the writer lock: what is listed stays a leftover
        sizes = {e.location: store.size(e.name) for e in store.list_extras() if e.kind in kinds}
        blobs = store.child(BLOBS_DIR)
        sizes.update({blobs.join(name): n for name, n in store.list_blobs().items()})
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
    p = add_command(
        sub, "gc", _gc, help="remove leftovers of interrupted saves (never a committed checkpoint)", doc=__doc__
    )
    p.add_argument("dir", metavar="DIR", help="the run directory")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.add_argument(
        "--abandoned",
        action="store_true",
        help="also remove the checkpoints of branches abandoned by a rollback (step-N.abandoned-*)",
    )
    add_json_option(p, "lines")
