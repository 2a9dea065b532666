"""The POSIX calls of the local backend (durable directories, files that never follow a symlink)
and the write errors of every backend.

Every file runstate creates goes through :func:`nofollow` (``O_NOFOLLOW``, close-on-exec;
with mode ``"xb"`` also ``O_EXCL``), every file it reads through :func:`open_regular` (a
symlink, FIFO or device is refused before it is opened), every directory it creates
through :func:`makedirs_durable` (each new entry fsynced into its parent), and every OS
error it reports through :func:`write_error` (what failed, where, what to do). The rest of
the library asks a :class:`~runstate.storage.base.Store` instead of calling these.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import uuid
from collections.abc import Iterator
from typing import IO

from runstate.errors import CheckpointWriteError, CorruptCheckpointError
from runstate.storage.base import EntryKind

__all__ = [
    "CLOEXEC",
    "atomic_file",
    "drop_page_cache",
    "entry_kind",
    "fsync_dir",
    "makedirs_durable",
    "modified",
    "nofollow",
    "object_write_error",
    "open_regular",
    "tree_size",
    "write_error",
]

CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def write_error(exc: OSError, what: str, path: str, consequence: str = "nothing was committed") -> CheckpointWriteError:
    """The ``CheckpointWriteError`` reporting ``exc``: its errno kept, a hint per errno."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    hint = {
        errno.ENOSPC: "free disk space or lower keep_last",
        errno.EDQUOT: "free space within your quota",
        errno.EACCES: "check the directory's permissions",
        errno.EROFS: "the filesystem is read-only; save somewhere else",
    }.get(exc.errno or 0, "check the disk and try again")
    message = f"{what} {path}: {reason}; {consequence}, {hint}"
    if not exc.errno:  # no OS error code: the message alone (a filename would print as "[Errno None] None")
        return CheckpointWriteError(message)
    err = CheckpointWriteError(exc.errno, message)
    err.filename = path
    return err


def object_write_error(
    exc: BaseException, what: str, where: str, consequence: str = "nothing was committed"
) -> CheckpointWriteError:
    """The ``CheckpointWriteError`` reporting a failure of an object store (``errno.EIO`` when ``exc`` has none)."""
    code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
    return CheckpointWriteError(
        code, f"{what} {where}: {exc}; {consequence}, check the storage and credentials and try again"
    )


def fsync_dir(path: str) -> None:
    """fsync a directory so that entries created or renamed in it are durable."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def nofollow(path: str, flags: int) -> int:
    """The ``opener`` of every file runstate creates (mode ``"xb"``): ``O_NOFOLLOW`` added."""
    return os.open(path, flags | os.O_NOFOLLOW | CLOEXEC, 0o644)


def makedirs_durable(path: str) -> None:
    """Create ``path`` and its missing parents, fsyncing each new entry's parent."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        makedirs_durable(parent)
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    fsync_dir(parent or ".")


def open_regular(path: str, name: str) -> IO[bytes]:
    """Open a regular file that is not a symlink.

    Anything else is refused before it is opened: opening a FIFO would block forever and
    opening a device runs its driver. ``O_NOFOLLOW``, ``O_NONBLOCK`` and the ``fstat`` after
    the open close the gap should the entry be swapped in between.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CorruptCheckpointError: not a regular file, or it cannot be opened safely.
    """
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise CorruptCheckpointError(
                f"{path}: not a regular file (symlinks are refused, and so are directories, FIFOs and devices)",
                file=name,
            )
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | CLOEXEC)
    except FileNotFoundError:
        raise
    except NotADirectoryError as exc:  # a parent is a file: nothing is there
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path) from exc
    except OSError as exc:
        raise CorruptCheckpointError(
            f"{path}: cannot be opened safely ({exc.strerror}); symlinks are refused", file=name
        ) from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CorruptCheckpointError(f"{path}: not a regular file", file=name)
    return os.fdopen(fd, "rb")


def entry_kind(path: str) -> EntryKind | None:
    """What is at ``path``, following symlinks as ``os.path.isdir`` does; None when nothing is."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # missing, a dangling link, a parent that is a file, a NUL byte
        return None
    if stat.S_ISDIR(mode):
        return "directory"
    return "file" if stat.S_ISREG(mode) else "other"


def tree_size(path: str) -> int:
    """Bytes in the files under ``path`` (a directory or a file; symlinks not followed; 0 when gone)."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def modified(path: str) -> float | None:
    """The modification time of ``path`` itself (a symlink's own), or None when it is gone."""
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return None


def drop_page_cache(directory: str) -> None:
    """Ask the kernel to forget the cached pages of the files in ``directory``, so a read-back hits the disk.

    Only regular files directly in ``directory`` are opened (never a symlink or a FIFO).
    """
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; once the block succeeds it replaces ``path`` durably.

    The file written at the temporary path is fsynced, renamed onto ``path`` (atomic on
    POSIX) and the directory fsynced: a reader sees the old file or the whole new one. On
    any exception the temporary file is removed and ``path`` is left as it was.

    Example:
        >>> with atomic_file("model.safetensors") as tmp:  # doctest: +SKIP
        ...     save_file(tensors, tmp)
    """
    path = os.path.expanduser(path)
    parent, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
