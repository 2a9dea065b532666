"""The entries of a local run directory: committed steps, deletions, leftovers.

A committed checkpoint is a real directory named exactly ``step-<N>`` (:data:`~.base.STEP_RE`).
A hidden ``.tmp-<name>-<12 hex>`` (a save) or ``.del-<name>-<12 hex>`` (a deletion)
directory is work in progress while its process holds an ``flock`` on it, and a leftover
once none does: only those names, and only then, are ever removed by cleanup.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import uuid

from runstate.storage._fs import fsync_dir, write_error
from runstate.storage._locks import NoDirectoryLocks, claim_dir
from runstate.storage.base import STEP_RE

__all__ = [
    "LEFTOVER_PREFIXES",
    "LEFTOVER_RE",
    "delete_directory",
    "hidden_name",
    "list_committed",
    "list_leftovers",
    "remove_leftovers",
]

LEFTOVER_PREFIXES = (".tmp-", ".del-")
#: The only names runstate's cleanup removes: ``.tmp-<name>-<12 hex>`` (a save) and
#: ``.del-<name>-<12 hex>`` (a deletion), always directories.
LEFTOVER_RE = re.compile(r"^\.(tmp|del)-(.+)-[0-9a-f]{12}\Z", re.DOTALL)


def hidden_name(kind: str, name: str) -> str:
    """``.<kind>-<name>-<12 hex>``: a save (``tmp``) or a deletion (``del``) in progress."""
    return f".{kind}-{name}-{uuid.uuid4().hex[:12]}"


def delete_directory(path: str) -> None:
    """Delete a committed checkpoint so that no reader ever sees it half-deleted.

    Raises:
        CheckpointWriteError: an OS error; the checkpoint is then either still committed
            or hidden under a ``.del-`` name that the next writer removes.
    """
    parent, name = os.path.split(os.path.abspath(path))
    doomed = os.path.join(parent, hidden_name("del", name))
    claim = None
    with contextlib.suppress(OSError):  # held while deleting: cleanup leaves the directory to us
        claim = claim_dir(path)
    try:
        try:
            os.rename(path, doomed)
        except OSError as exc:
            raise write_error(exc, "cannot delete old checkpoint", path, "it is still there") from exc
        try:
            fsync_dir(parent)
            shutil.rmtree(doomed)
        except OSError as exc:
            left = f"it is gone, but its files remain in {doomed} until the next writer"
            raise write_error(exc, "cannot delete old checkpoint", path, left) from exc
    finally:
        if claim is not None:
            with contextlib.suppress(OSError):
                claim.release()


def list_committed(directory: str) -> dict[int, str]:
    """Map step to path for every committed checkpoint in a run directory."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    out: dict[int, str] = {}
    for name in names:
        m = STEP_RE.match(name)
        if m:
            path = os.path.join(directory, name)
            if os.path.isdir(path):
                out[int(m.group(1))] = path
    return dict(sorted(out.items()))


def _is_leftover(path: str) -> bool:
    """A real directory (not a symlink) that no save or deletion in progress holds."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        claim = claim_dir(path)
    except FileNotFoundError:
        return False
    except OSError:  # no directory locks on this filesystem (only the lock holder writes here), or unreadable
        return True
    if claim is None:
        return False
    with contextlib.suppress(OSError):
        claim.release()
    return True


def list_leftovers(directory: str) -> list[str]:
    """Paths of the remains of interrupted saves or deletions.

    Only real directories named exactly ``.tmp-<name>-<12 hex>`` or ``.del-<name>-<12 hex>``
    count, and only once no process holds an ``flock`` on them: a save in progress (of a
    manager, or a standalone ``runstate.save`` into the run directory) holds one until it
    commits or aborts, and the kernel drops it when that process dies.
    """
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    paths = (os.path.join(directory, n) for n in names if LEFTOVER_RE.match(n))
    return sorted(p for p in paths if _is_leftover(p))


def remove_leftovers(directory: str) -> list[str]:
    """Remove the leftovers :func:`list_leftovers` finds; call only while holding the run's :class:`RunLock`.

    Each is removed while holding its ``flock``, so a save that starts at that moment never
    loses its directory (it retries under a new name).
    """
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise write_error(exc, "cannot list", directory) from exc
    removed = []
    for path in sorted(os.path.join(directory, n) for n in names if LEFTOVER_RE.match(n)):
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                continue
            claim = claim_dir(path)
        except NoDirectoryLocks:  # only the lock holder writes here: remove it, as it always did
            claim = None
        except OSError:  # gone, or cannot be opened: left for the next cleanup
            continue
        else:
            if claim is None:  # a save or deletion in progress
                continue
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            if claim is not None:
                with contextlib.suppress(OSError):
                    claim.release()
        removed.append(path)
    return removed
