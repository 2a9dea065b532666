"""Locks of the local backend: the run's writer lock and the claims that protect a save in progress.

Both are ``flock`` locks, which the kernel drops when their holder dies: a lock left by a
killed writer is simply taken over, and a temporary directory no process holds any more is a
leftover. ``flock`` locks belong to the open file description, which a forked child shares,
so every descriptor holding one is close-on-exec and closed in a child right after
``fork()`` (see :class:`Flock`): a ``DataLoader`` worker never keeps the lock of a writer
that died.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import weakref

from runstate.errors import LockError
from runstate.storage._fs import CLOEXEC, makedirs_durable, write_error
from runstate.storage.base import LOCK_NAME

__all__ = ["Flock", "NoDirectoryLocks", "RunLock", "claim_dir"]

#: A ``.lock`` larger than this was not written by runstate (its content is one short line).
_MAX_LOCK_SIZE = 4096


class Flock:
    """An open descriptor holding an ``flock``; closed (not unlocked) in a child after ``fork()``.

    ``flock`` locks belong to the open file description, which a forked child shares: a
    child that lives on (a ``DataLoader`` worker) would keep the lock of a parent that was
    killed. Every live ``Flock`` is in a weak registry, and a hook registered once with
    :func:`os.register_at_fork` closes their descriptors in every new child; closing a
    duplicate leaves the parent's lock alone.
    """

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd
        _track_across_fork(self)

    def release(self) -> None:
        """Unlock and close (idempotent)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def forget(self) -> None:
        """Close the descriptor without unlocking (the child's copy after a fork)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:  # a save dropped without commit or abort is dead: its directory a leftover
        self.forget()


_HELD: weakref.WeakSet[Flock] = weakref.WeakSet()
_FORK_HOOK: list[bool] = []  # non-empty once the at-fork hook is registered


def _close_in_child() -> None:
    for held in list(_HELD):
        held.forget()


def _track_across_fork(held: Flock) -> None:
    """Have ``held`` closed in forked children; registers the at-fork hook on first use."""
    if not _FORK_HOOK:
        os.register_at_fork(after_in_child=_close_in_child)
        _FORK_HOOK.append(True)
    _HELD.add(held)


class NoDirectoryLocks(OSError):
    """The filesystem cannot ``flock`` a directory (e.g. ``ENOLCK``, ``EBADF`` on some NFS setups)."""


def claim_dir(path: str) -> Flock | None:
    """An exclusive ``flock`` on the directory ``path``, or None when another process (or
    another save in this one) holds it, or ``path`` is gone or not a real directory.

    Raises:
        NoDirectoryLocks: the filesystem cannot lock directories.
        OSError: the directory cannot be opened.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink: never ours
            return None
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:
            raise NoDirectoryLocks(exc.errno, exc.strerror, path) from exc
        opened = os.fstat(fd)
        now = os.lstat(path)
    except FileNotFoundError:
        os.close(fd)
        return None
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    if (opened.st_dev, opened.st_ino) != (now.st_dev, now.st_ino):  # replaced in between
        os.close(fd)
        return None
    return Flock(fd)


class RunLock:
    """An exclusive, per-run-directory writer lock.

    It is an ``flock`` on ``<dir>/.lock``: the kernel drops it when the holder dies, so a
    lock left by a killed writer is simply taken over. The file records the holder's pid
    and host for the error message. Readers never take it.

    The file is opened without following a symlink and without truncating it; it is
    rewritten only once the lock is held and it is known to be a regular file with a
    single name. Its descriptor is close-on-exec and is closed in forked children, so a
    ``DataLoader`` worker never keeps the lock of a writer that died.
    """

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(os.path.expanduser(directory), LOCK_NAME)
        self._held: Flock | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock (False in a child forked meanwhile)."""
        return self._held is not None and self._held.fd is not None

    def _refuse(self, what: str, code: int = errno.EEXIST) -> LockError:
        return LockError(
            code,
            f"{self.path} {what}, not a lock file runstate created; runstate never writes through it. "
            f"Remove it (rm {self.path}) and try again",
        )

    def acquire(self) -> None:
        """Take the lock or raise :class:`LockError` naming the live holder.

        Raises:
            LockError: another live process holds it, or ``.lock`` is a symlink, a hard
                link or not a regular file (refused, left untouched).
            CheckpointWriteError: the directory or the file cannot be created or locked.
        """
        if self.held:
            return
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | CLOEXEC
        try:
            makedirs_durable(os.path.dirname(self.path))
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._refuse("is a symbolic link", errno.ELOOP) from None
            if exc.errno == errno.EISDIR:
                raise self._refuse("is not a regular file", errno.EISDIR) from None
            raise write_error(exc, "cannot create lock file", self.path) from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self._refuse("is not a regular file")
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
            raise write_error(exc, "cannot lock", self.path) from exc
        held = Flock(fd)
        st = os.fstat(fd)
        if st.st_nlink == 0:  # removed between open and flock: lock the new one
            held.release()
            return self.acquire()
        if st.st_nlink != 1 or st.st_size > _MAX_LOCK_SIZE:
            held.release()
            raise self._refuse("is a hard link" if st.st_nlink != 1 else f"holds {st.st_size} bytes")
        with contextlib.suppress(OSError):  # the holder's name is informational: a full disk must not matter
            mine = f"pid {os.getpid()} on {socket.gethostname()}\n".encode()
            os.pwrite(fd, mine, 0)
            os.ftruncate(fd, len(mine))
        self._held = held

    def release(self) -> None:
        """Release the lock (idempotent)."""
        held, self._held = self._held, None
        if held is not None:
            held.release()
