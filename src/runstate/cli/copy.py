"""``runstate copy CKPT DEST``: a self-contained copy of a checkpoint.

A checkpoint of an incremental run (``CheckpointManager(incremental=True)``) refers to tensor
files in its run's ``blobs/`` folder, which earlier checkpoints wrote: it cannot be moved on
its own. ``copy`` writes every byte it reads into files of its own at DEST (format version 1,
as ``runstate.save`` writes), checking every tensor's checksum on the way, and commits DEST
atomically. Compressed tensors are copied as stored (still compressed, verified by decoding
first), so a compressed checkpoint's copy is compressed too (format version 2, ``zstd``).
Any checkpoint can be copied; DEST must not exist. With ``--step N|latest``, CKPT is a run
directory and its step N (or newest step) is copied.
"""

from __future__ import annotations

import argparse

from runstate._impl.materialize import copy_checkpoint
from runstate.cli._commands import add_command, add_json_option
from runstate.cli._output import echo, guarded, human_bytes, print_json
from runstate.cli._paths import add_step_option, resolve_checkpoint

__all__ = ["register"]


@guarded("copy")
def _copy(args: argparse.Namespace) -> int:
    source = resolve_checkpoint("copy", args.ckpt, args.step)
    if isinstance(source, int):
        return source
    info = copy_checkpoint(source, args.dest)
    if args.json:
        print_json({"source": source, "path": info.path, "step": info.step, "nbytes": info.nbytes})
    else:
        echo(f"copied {source} to {info.path} ({human_bytes(info.nbytes)}, self-contained)")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``copy`` subcommand."""
    p = add_command(
        sub, "copy", _copy, help="write a self-contained copy of a checkpoint (incremental ones too)", doc=__doc__
    )
    p.add_argument("ckpt", metavar="CKPT", help="the checkpoint (or, with --step, the run directory)")
    p.add_argument("dest", metavar="DEST", help="where the copy goes (must not exist)")
    add_step_option(p)
    add_json_option(p, "one line")
