"""Crash-safe checkpoint directories on a local POSIX filesystem.

Invariant: a directory named ``step-<N>`` exists only once every byte inside it is on
disk. Files are written into a hidden temporary directory next to it, each file and the
directory are fsynced, the directory is renamed into place (atomic on POSIX) and the
parent is fsynced so the rename itself survives a power cut. Anything hidden
(``.tmp-*``, ``.del-*``) is a leftover of an interrupted save or deletion: readers ignore
it and the next writer, holding the run's lock, removes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator

from runstate.errors import CheckpointWriteError, LockError, StepExistsError

__all__ = [
    "LEFTOVER_PREFIXES",
    "RunLock",
    "commit_directory",
    "delete_directory",
    "fsync_dir",
    "list_committed",
    "remove_leftovers",
    "step_dirname",
]

STEP_RE = re.compile(r"^step-(\d+)$")
LEFTOVER_PREFIXES = (".tmp-", ".del-")
LOCK_NAME = ".lock"


def step_dirname(step: int) -> str:
    """The directory name of a committed step: ``step-000000000100``."""
    return f"step-{step:012d}"


def fsync_dir(path: str) -> None:
    """fsync a directory so that entries created or renamed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(
    exc: OSError, what: str, path: str, consequence: str = "nothing was committed"
) -> CheckpointWriteError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    hint = {
        errno.ENOSPC: "free disk space or lower keep_last",
        errno.EDQUOT: "free space within your quota",
        errno.EACCES: "check the directory's permissions",
        errno.EROFS: "the filesystem is read-only; save somewhere else",
    }.get(exc.errno or 0, "check the disk and try again")
    err = CheckpointWriteError(exc.errno or 0, f"{what} {path}: {reason}; {consequence}, {hint}")
    err.filename = path
    return err


@contextlib.contextmanager
def commit_directory(final: str) -> Iterator[str]:
    """Yield a hidden temporary directory that becomes ``final`` when the block succeeds.

    On any exception the temporary directory is removed and ``final`` is never created.

    Raises:
        StepExistsError: ``final`` already exists.
        CheckpointWriteError: an OS error while writing or committing.
    """
    parent = os.path.dirname(os.path.abspath(final))
    name = os.path.basename(final)
    if os.path.lexists(final):
        raise StepExistsError(f"{final} already exists; choose another step or path, or delete it first")
    tmp = os.path.join(parent, f".tmp-{name}-{uuid.uuid4().hex[:12]}")
    try:
        _makedirs_durable(parent)
        os.mkdir(tmp)
    except OSError as exc:
        raise _write_error(exc, "cannot create", tmp) from exc
    renamed = False
    try:
        yield tmp
        fsync_dir(tmp)
        if os.path.lexists(final):
            raise StepExistsError(f"{final} appeared while saving; another writer uses this path")
        os.rename(tmp, final)
        renamed = True
        fsync_dir(parent)
    except BaseException as exc:
        if renamed:
            # The rename is not known to be durable: take it back, so that an exception
            # always means "not committed" and the same step can be saved again.
            with contextlib.suppress(OSError):
                os.rename(final, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, (StepExistsError, CheckpointWriteError)):
            raise _write_error(exc, "cannot write checkpoint", final) from exc
        raise


def _makedirs_durable(path: str) -> None:
    """Create ``path`` and its missing parents, fsyncing each new entry's parent."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        _makedirs_durable(parent)
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    fsync_dir(parent or ".")


def delete_directory(path: str) -> None:
    """Delete a committed checkpoint so that no reader ever sees it half-deleted.

    Raises:
        CheckpointWriteError: an OS error; the checkpoint is then either still committed
            or hidden under a ``.del-`` name that the next writer removes.
    """
    parent, name = os.path.split(os.path.abspath(path))
    doomed = os.path.join(parent, f".del-{name}-{uuid.uuid4().hex[:12]}")
    try:
        os.rename(path, doomed)
    except OSError as exc:
        raise _write_error(exc, "cannot delete old checkpoint", path, "it is still there") from exc
    try:
        fsync_dir(parent)
        shutil.rmtree(doomed)
    except OSError as exc:
        left = f"it is gone, but its files remain in {doomed} until the next writer"
        raise _write_error(exc, "cannot delete old checkpoint", path, left) from exc


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


def list_leftovers(directory: str) -> list[str]:
    """Paths of temporaries left by interrupted saves or deletions."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(os.path.join(directory, n) for n in names if n.startswith(LEFTOVER_PREFIXES))


def remove_leftovers(directory: str) -> list[str]:
    """Remove temporaries; call only while holding the run's :class:`RunLock`."""
    try:
        removed = list_leftovers(directory)
    except OSError as exc:
        raise _write_error(exc, "cannot list", directory) from exc
    for path in removed:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    return removed


class RunLock:
    """An exclusive, per-run-directory writer lock.

    It is an ``flock`` on ``<dir>/.lock``: the kernel drops it when the holder dies, so a
    lock left by a killed writer is simply taken over. The file records the holder's pid
    and host for the error message. Readers never take it.
    """

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise :class:`LockError` naming the live holder."""
        if self._fd is not None:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _write_error(exc, "cannot create lock file", self.path) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise LockError(
                errno.EWOULDBLOCK,
                f"{os.path.dirname(self.path)} is being written by another CheckpointManager "
                f"({holder}); only one writer per run directory is allowed: close the other "
                "one or use a different directory",
            ) from None
        except OSError as exc:  # e.g. ENOLCK: a filesystem without flock
            os.close(fd)
            raise _write_error(exc, "cannot lock", self.path) from exc
        with contextlib.suppress(OSError):  # the holder's name is informational: a full disk must not matter
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
