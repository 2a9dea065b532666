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
import shutil
import socket
import stat
import uuid
from collections.abc import Iterator
from typing import IO

from runstate.errors import CheckpointWriteError, CorruptCheckpointError, LockError, StepExistsError
from runstate.format.manifest import MANIFEST_NAME
from runstate.storage.base import LOCK_NAME, STEP_RE, Staging, Store, step_dirname

__all__ = [
    "LEFTOVER_PREFIXES",
    "FillDirectory",
    "LocalStaging",
    "LocalStore",
    "RunLock",
    "commit_directory",
    "delete_directory",
    "fsync_dir",
    "list_committed",
    "remove_leftovers",
    "step_dirname",
]

LEFTOVER_PREFIXES = (".tmp-", ".del-")


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
    staging = LocalStaging.begin(final)
    try:
        yield staging.location
        staging.publish()
    except BaseException as exc:
        staging.abort()
        if isinstance(exc, OSError) and not isinstance(exc, (StepExistsError, CheckpointWriteError)):
            raise _write_error(exc, "cannot write checkpoint", final) from exc
        raise


class LocalStaging(Staging):
    """A checkpoint being built in a hidden ``.tmp-<name>-<hex>`` directory next to its final name."""

    parallel_writes = 1  # one local disk: sequential writes with early writeback are fastest

    def __init__(self, tmp: str, final: str, *, can_commit: bool) -> None:
        self.location = tmp
        self.final = final
        self.can_commit = can_commit
        self.committed = False
        self._written: list[str] = []

    @classmethod
    def begin(cls, final: str) -> LocalStaging:
        """Create the temporary directory of ``final``.

        Raises:
            StepExistsError: ``final`` already exists.
            CheckpointWriteError: the directory cannot be created.
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
        return cls(tmp, final, can_commit=True)

    @contextlib.contextmanager
    def open_write(self, name: str) -> Iterator[IO[bytes]]:
        """A new file in the temporary directory, fsynced when the block exits."""
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"{name!r} is not a plain file name")
        path = os.path.join(self.location, name)
        with open(path, "xb", buffering=0) as f:
            self._written.append(path)
            yield f
            os.fsync(f.fileno())

    def commit(self, manifest: bytes) -> str:
        """Write ``manifest.json`` (fsynced) and rename the directory into place."""
        self._refuse_commit()
        try:
            with open(os.path.join(self.location, MANIFEST_NAME), "xb") as f:
                f.write(manifest)
                f.flush()
                os.fsync(f.fileno())
            self.publish()
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError) and not isinstance(exc, (StepExistsError, CheckpointWriteError)):
                raise _write_error(exc, "cannot write checkpoint", self.final) from exc
            raise
        return self.final

    def publish(self) -> None:
        """fsync the directory, rename it to its final name and fsync the parent.

        If the final fsync fails the rename is taken back, so that an exception always
        means "not committed" and the same name can be saved again.
        """
        fsync_dir(self.location)
        if os.path.lexists(self.final):
            raise StepExistsError(f"{self.final} appeared while saving; another writer uses this path")
        os.rename(self.location, self.final)
        try:
            fsync_dir(os.path.dirname(self.final))
        except BaseException:
            with contextlib.suppress(OSError):
                os.rename(self.final, self.location)
            raise
        self.committed = True

    def abort(self) -> None:
        """Remove the temporary directory (an attached staging removes only the files it wrote)."""
        if self.committed:
            return
        if self.can_commit:
            shutil.rmtree(self.location, ignore_errors=True)
        else:
            for path in self._written:
                with contextlib.suppress(OSError):
                    os.remove(path)

    def write_error(self, exc: OSError) -> CheckpointWriteError:
        """A message with a hint per errno (disk full, quota, permissions, read-only)."""
        return _write_error(exc, "cannot write checkpoint", self.final)

    def reader(self) -> Store:
        """A store rooted at the temporary directory."""
        return LocalStore(self.location)

    def local_dir(self) -> str:
        """The temporary directory."""
        return self.location


class FillDirectory(LocalStaging):
    """An existing directory filled in place, manifest included; committing it is the caller's job.

    What ``write_checkpoint(directory, ...)`` uses when given a plain path (inside
    :func:`commit_directory`, or for tests that build a checkpoint by hand).
    """

    def __init__(self, directory: str) -> None:
        super().__init__(directory, directory, can_commit=True)

    def commit(self, manifest: bytes) -> str:
        """Write ``manifest.json`` (fsynced); no rename."""
        with open(os.path.join(self.location, MANIFEST_NAME), "xb") as f:
            f.write(manifest)
            f.flush()
            os.fsync(f.fileno())
        self.committed = True
        return self.location

    def abort(self) -> None:
        """Nothing: the directory belongs to the caller."""


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
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
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


class LocalStore(Store):
    """A directory on a local POSIX filesystem: atomic rename commits, fsync, ``flock`` lock."""

    def __init__(self, location: str) -> None:
        self.location = os.fspath(location)

    def __repr__(self) -> str:
        return f"LocalStore({self.location!r})"

    def join(self, name: str) -> str:
        """``os.path.join`` of the root and ``name``."""
        return os.path.join(self.location, name) if name else self.location

    def child(self, name: str) -> LocalStore:
        """The store of a subdirectory."""
        return LocalStore(self.join(name))

    @property
    def is_local(self) -> bool:
        """Always True."""
        return True

    def open_read(self, name: str) -> tuple[IO[bytes], int]:
        """Open a regular file (never a symlink, FIFO or device) and return it with its size."""
        f = open_regular(self.join(name), name)
        return f, os.fstat(f.fileno()).st_size

    def exists(self, name: str = "") -> bool:
        """``os.path.lexists``."""
        return os.path.lexists(self.join(name))

    def list_committed(self) -> dict[int, str]:
        """Committed ``step-N`` directories."""
        return list_committed(self.location)

    def list_leftovers(self) -> list[str]:
        """``.tmp-*`` and ``.del-*`` entries."""
        return list_leftovers(self.location)

    def begin(self, name: str | int) -> LocalStaging:
        """A hidden temporary directory next to ``name``."""
        return LocalStaging.begin(self.join(step_dirname(name) if isinstance(name, int) else name))

    def attach(self, location: str) -> LocalStaging:
        """Write into the temporary directory ``location`` that :meth:`begin` created elsewhere."""
        base = os.path.basename(location)
        if not base.startswith(".tmp-") or not os.path.isdir(location):
            raise CheckpointWriteError(
                errno.ENOENT,
                f"cannot attach to {location}: not the temporary directory of a checkpoint being saved; "
                "pass the Staging.location of the process that called begin()",
            )
        final = os.path.join(os.path.dirname(location), base[len(".tmp-") : -13])
        return LocalStaging(location, final, can_commit=False)

    def delete(self, name: str) -> None:
        """Rename to a hidden ``.del-`` name, then remove."""
        delete_directory(self.join(name))

    def rename(self, name: str, new_name: str) -> str:
        """``os.rename``."""
        src, dst = self.join(name), self.join(new_name)
        try:
            os.rename(src, dst)
        except OSError as exc:
            raise _write_error(exc, "cannot rename", src, f"it stays where it is (wanted {dst})") from exc
        return dst

    def remove_leftovers(self) -> list[str]:
        """Remove ``.tmp-*`` and ``.del-*`` entries."""
        return remove_leftovers(self.location)

    def lock(self) -> RunLock:
        """An ``flock`` on ``<dir>/.lock``."""
        return RunLock(self.location)
