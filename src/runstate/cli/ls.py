"""``runstate ls DIR``: the checkpoints of a run directory, one line each.

Each committed step shows its creation time, size and metrics, read from its manifest only
(tensor checksums are ``runstate verify``'s job, so listing a 100 GB run is instant). A
committed step whose manifest cannot be read is marked ``corrupt``, as are checkpoints the
manager moved aside (``step-N.corrupt-T``); temporaries of interrupted saves and deletions
are marked ``leftover`` (``runstate gc`` removes them). The ``checked`` column says what was
checked of each committed step: ``not verified`` (its manifest only), or ``verified`` with
``--verify`` (every byte, as ``runstate verify``: a damaged step then shows as ``corrupt``).
Checkpoints of a branch abandoned by a rollback are marked ``abandoned``. In an incremental
run (``CheckpointManager(incremental=True)``), ``size`` is what the checkpoint reads and
``referenced`` the part of it that earlier checkpoints wrote (it wrote the rest itself).
"""

from __future__ import annotations

import argparse
import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

import runstate
from runstate.cli._commands import add_command, add_json_option
from runstate.cli._output import (
    Cell,
    echo,
    format_time,
    format_value,
    guarded,
    human_bytes,
    print_json,
    print_table,
)
from runstate.cli._paths import check_run_directory
from runstate.storage import (
    ABANDONED,
    DAMAGED,
    INTERRUPTED_DELETION,
    INTERRUPTED_SAVE,
    MISNAMED,
    Extra,
    Store,
    open_store,
    step_dirname,
)

__all__ = ["register"]

#: The status and reason shown for each kind of entry that is not a committed checkpoint.
_EXTRA_STATUS = {
    INTERRUPTED_SAVE: ("leftover", "interrupted save"),
    INTERRUPTED_DELETION: ("leftover", "interrupted deletion"),
    DAMAGED: ("corrupt", "moved aside by restore"),
    ABANDONED: ("abandoned", "branch abandoned by a rollback"),
    MISNAMED: ("misnamed", "not a name the run reads; rename it to {name}"),
}


@dataclass
class Entry:
    """One line of the listing."""

    step: int | None
    path: str
    status: str
    created: str | None = None
    nbytes: int = 0
    referenced_nbytes: int = 0  # of nbytes, the bytes of blobs an earlier checkpoint wrote
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    checked: str = ""  # committed steps: "not verified" (manifest read) or "verified" (every byte, --verify)


def _mtime(store: Store, name: str) -> str | None:
    stamp = store.modified(name)
    if stamp is None:
        return None
    return _dt.datetime.fromtimestamp(stamp, _dt.timezone.utc).isoformat(timespec="microseconds")


def _short_reason(exc: Exception, path: str) -> str:
    reason = " ".join(str(exc).split())
    for prefix in (path.rstrip("/") + "/manifest.json: ", path + "/manifest.json: ", path + ": "):
        if reason.startswith(prefix):
            return reason[len(prefix) :]
    return reason


def _committed(store: Store, step: int, path: str) -> Entry:
    """The line of a committed step, from its manifest only."""
    name = step_dirname(step)
    try:
        contents = runstate.inspect(path)
    except runstate.FormatVersionError as exc:
        return Entry(step, path, "newer format", _mtime(store, name), store.size(name), reason=str(exc))
    except runstate.CheckpointError as exc:
        reason = _short_reason(exc, path)
        return Entry(step, path, "corrupt", _mtime(store, name), store.size(name), reason=reason)
    return Entry(step, path, "ok", contents.created, contents.nbytes, contents.referenced_nbytes, contents.metrics)


def _extra(store: Store, extra: Extra) -> Entry:
    """The line of a leftover, a checkpoint set aside, or a misnamed step."""
    status, reason = _EXTRA_STATUS[extra.kind]
    if extra.step is not None:
        reason = reason.format(name=step_dirname(extra.step))
    return Entry(extra.step, extra.location, status, _mtime(store, extra.name), store.size(extra.name), reason=reason)


def collect(directory: str) -> list[Entry]:
    """Every checkpoint, corrupt checkpoint and leftover of a run directory, by step."""
    store = open_store(directory)
    with runstate.CheckpointManager(directory, read_only=True) as mgr:
        entries = [_committed(store, step, mgr.path(step)) for step in mgr.steps()]
    entries += [_extra(store, extra) for extra in store.list_extras()]
    entries.sort(key=lambda e: (-1 if e.step is None else e.step, e.status != "ok", e.path))
    return entries


def _verify_entries(entries: list[Entry]) -> None:
    """``--verify``: check every byte of each step whose manifest was read; mark failures corrupt."""
    for e in entries:
        if e.status != "ok":
            continue
        report = runstate.verify(e.path)
        e.checked = "verified"
        if not report.ok:
            n = len(report.problems)
            e.status, e.reason = "corrupt", f"{report.problems[0]}" + (f" (+{n - 1} more)" if n > 1 else "")


def _status_cell(entry: Entry) -> Cell:
    text = entry.status if entry.reason is None else f"{entry.status}: {entry.reason}"
    style = {"ok": "green", "leftover": "yellow", "abandoned": "yellow"}.get(entry.status, "bold red")
    return (text, style)


@guarded("ls")
def _ls(args: argparse.Namespace) -> int:
    directory: str = args.dir
    error = check_run_directory("ls", directory)
    if error is not None:
        return error
    entries = collect(directory)
    for e in entries:
        if e.step is not None and e.status in ("ok", "corrupt", "newer format") and e.path.rstrip("/").endswith(
            f"step-{e.step:012d}"
        ):
            e.checked = "not verified"
    if args.verify:
        _verify_entries(entries)
    if args.json:
        print_json({"directory": directory, "checkpoints": entries})
        return 0
    if not entries:
        echo(f"no checkpoints in {directory}")
        return 0
    incremental = any(e.referenced_nbytes for e in entries)
    rows = [
        [
            "?" if e.step is None else str(e.step),
            format_time(e.created) if e.created else "",
            human_bytes(e.nbytes),
            *([human_bytes(e.referenced_nbytes)] if incremental else []),
            "  ".join(f"{k}={format_value(v)}" for k, v in e.metrics.items()),
            e.checked,
            _status_cell(e),
        ]
        for e in entries
    ]
    header = ["step", "created (UTC)", "size", *(["referenced"] if incremental else []), "metrics", "checked", "status"]
    print_table(header, rows, right=(0, 2, 3) if incremental else (0, 2))
    ok = [e for e in entries if e.status == "ok"]
    counts = [f"{len(ok)} checkpoint{'s' if len(ok) != 1 else ''}"]
    if ok:
        counts[0] += f" (latest step {ok[-1].step})"
    for status in ("corrupt", "newer format", "leftover", "misnamed", "abandoned"):
        n = sum(e.status == status for e in entries)
        if n:
            counts.append(f"{n} {status}")
    hint = "; runstate gc removes leftovers" if any(e.status == "leftover" for e in entries) else ""
    if any(e.status == "abandoned" for e in entries):
        hint += "; runstate gc --abandoned removes abandoned branches"
    echo(", ".join(counts) + hint)
    if args.verify:
        echo("(every byte of each checkpoint verified)")
    else:
        echo(f"(manifests only, not verified; runstate ls --verify {directory} checks every byte)")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``ls`` subcommand."""
    p = add_command(sub, "ls", _ls, help="list the checkpoints of a run directory", doc=__doc__)
    p.add_argument("dir", metavar="DIR", help="the run directory (the one given to CheckpointManager)")
    add_json_option(p, "a table")
    p.add_argument(
        "--verify",
        action="store_true",
        help="also check every byte of each checkpoint (as runstate verify); a damaged one shows as corrupt",
    )
