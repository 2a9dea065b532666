"""Crash-safe checkpoint directories on a local POSIX filesystem.

Invariant: a directory named ``step-<N>`` exists only once every byte inside it is on
disk. Files are written into a hidden temporary directory next to it, each file and the
directory are fsynced, the directory is renamed into place (atomic on POSIX) and the
parent is fsynced so the rename itself survives a power cut; every directory created on
the way is fsynced into its parent too. A hidden ``.tmp-<name>-<12 hex>`` or
``.del-<name>-<12 hex>`` directory is a save or deletion in progress: its process holds an
``flock`` on it for as long as it works there. Once no process holds it, it is a leftover
of an interrupted save or deletion: readers ignore it and the next writer, holding the
run's lock, removes it. Nothing else is ever removed, whatever its name.

Every file runstate writes is opened with ``O_NOFOLLOW`` (new files also with ``O_EXCL``),
so a symlink planted in a run directory is refused, never followed; lock descriptors are
close-on-exec and closed in a child right after ``fork()`` (see :func:`_track_across_fork`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import stat
import uuid
import weakref
from collections.abc import Iterator
from typing import IO

from runstate.errors import CheckpointWriteError, CorruptCheckpointError, LockError, StepExistsError
from runstate.format.manifest import MANIFEST_NAME
from runstate.storage.base import LOCK_NAME, STEP_RE, Staging, Store, step_dirname

__all__ = [
    "LEFTOVER_PREFIXES",
    "LEFTOVER_RE",
    "FillDirectory",
    "LocalStaging",
    "LocalStore",
    "RunLock",
    "commit_directory",
    "delete_directory",
    "fsync_dir",
    "list_committed",
    "local_path",
    "remove_leftovers",
    "step_dirname",
]

LEFTOVER_PREFIXES = (".tmp-", ".del-")
#: The only names runstate's cleanup removes: ``.tmp-<name>-<12 hex>`` (a save) and
#: ``.del-<name>-<12 hex>`` (a deletion), always directories.
LEFTOVER_RE = re.compile(r"^\.(tmp|del)-(.+)-[0-9a-f]{12}\Z", re.DOTALL)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
#: A ``.lock`` larger than this was not written by runstate (its content is one short line).
_MAX_LOCK_SIZE = 4096


def local_path(location: str | os.PathLike[str]) -> str:
    """A local path as the OS should see it: ``~`` and ``~user`` expanded, as a shell would.

    Relative paths stay relative (to the working directory); every place that needs a
    parent directory takes it from the absolute path, so a bare name such as ``"ckpt"``
    works like ``"./ckpt"``.
    """
    return os.path.expanduser(os.fspath(location))


class _Flock:
    """An open descriptor holding an ``flock``; closed (not unlocked) in a child after ``fork()``.

    ``flock`` locks belong to the open file description, which a forked child shares: a
    child that lives on (a ``DataLoader`` worker) would keep the lock of a parent that was
    killed. Every live ``_Flock`` is in a weak registry, and a hook registered once with
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


_HELD: weakref.WeakSet[_Flock] = weakref.WeakSet()
_FORK_HOOK: list[bool] = []  # non-empty once the at-fork hook is registered


def _close_in_child() -> None:
    for held in list(_HELD):
        held.forget()


def _track_across_fork(held: _Flock) -> None:
    """Have ``held`` closed in forked children; registers the at-fork hook on first use."""
    if not _FORK_HOOK:
        os.register_at_fork(after_in_child=_close_in_child)
        _FORK_HOOK.append(True)
    _HELD.add(held)


class _NoDirectoryLocks(OSError):
    """The filesystem cannot ``flock`` a directory (e.g. ``ENOLCK``, ``EBADF`` on some NFS setups)."""


def _claim_dir(path: str) -> _Flock | None:
    """An exclusive ``flock`` on the directory ``path``, or None when another process (or
    another save in this one) holds it, or ``path`` is gone or not a real directory.

    Raises:
        _NoDirectoryLocks: the filesystem cannot lock directories.
        OSError: the directory cannot be opened.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC)
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
            raise _NoDirectoryLocks(exc.errno, exc.strerror, path) from exc
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
    return _Flock(fd)


def fsync_dir(path: str) -> None:
    """fsync a directory so that entries created or renamed in it are durable."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
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

    def __init__(self, tmp: str, final: str, *, can_commit: bool, claim: _Flock | None = None) -> None:
        self.location = tmp
        self.final = final
        self.can_commit = can_commit
        self.committed = False
        self._written: list[str] = []
        self._claim = claim  # our flock on ``tmp``: the proof, for cleanup, that this save is alive

    @classmethod
    def begin(cls, final: str) -> LocalStaging:
        """Create the temporary directory of ``final`` and hold an ``flock`` on it until done.

        Raises:
            StepExistsError: ``final`` already exists.
            CheckpointWriteError: the directory cannot be created.
        """
        final = local_path(final)
        final = final.rstrip(os.sep) or final
        parent = os.path.dirname(os.path.abspath(final))
        name = os.path.basename(final)
        if os.path.lexists(final):
            raise StepExistsError(f"{final} already exists; choose another step or path, or delete it first")
        tmp = os.path.join(parent, f".tmp-{name}-{uuid.uuid4().hex[:12]}")
        try:
            _makedirs_durable(parent)
            for _ in range(100):  # a cleanup that removed our new directory before we locked it: retry
                tmp = os.path.join(parent, f".tmp-{name}-{uuid.uuid4().hex[:12]}")
                os.mkdir(tmp)
                try:
                    claim = _claim_dir(tmp)
                except _NoDirectoryLocks:  # save unprotected: only the lock holder cleans up here
                    return cls(tmp, final, can_commit=True)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.rmdir(tmp)
                    raise
                if claim is not None:
                    return cls(tmp, final, can_commit=True, claim=claim)
                with contextlib.suppress(OSError):
                    os.rmdir(tmp)
            raise OSError(errno.EAGAIN, "another process keeps removing the temporary directory")
        except OSError as exc:
            raise _write_error(exc, "cannot create", tmp) from exc

    @contextlib.contextmanager
    def open_write(self, name: str) -> Iterator[IO[bytes]]:
        """A new file in the temporary directory, fsynced when the block exits."""
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"{name!r} is not a plain file name")
        path = os.path.join(self.location, name)
        with open(path, "xb", buffering=0, opener=_nofollow) as f:
            self._written.append(path)
            yield f
            os.fsync(f.fileno())

    def commit(self, manifest: bytes) -> str:
        """Write ``manifest.json`` (fsynced) and rename the directory into place."""
        self._refuse_commit()
        try:
            with open(os.path.join(self.location, MANIFEST_NAME), "xb", opener=_nofollow) as f:
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
            self._unclaim(quiet=False)  # a committed name is no leftover: nothing to protect any more
            fsync_dir(os.path.dirname(os.path.abspath(self.final)))
        except BaseException:
            with contextlib.suppress(OSError):
                os.rename(self.final, self.location)
            raise
        self.committed = True

    def _unclaim(self, *, quiet: bool = True) -> None:
        claim, self._claim = self._claim, None
        if claim is not None:
            try:
                claim.release()
            except OSError:
                if not quiet:
                    raise

    def abort(self) -> None:
        """Remove the temporary directory (an attached staging removes only the files it wrote)."""
        if self.committed:
            return
        if self.can_commit:
            shutil.rmtree(self.location, ignore_errors=True)
            self._unclaim()
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
        with open(os.path.join(self.location, MANIFEST_NAME), "xb", opener=_nofollow) as f:
            f.write(manifest)
            f.flush()
            os.fsync(f.fileno())
        self.committed = True
        return self.location

    def abort(self) -> None:
        """Nothing: the directory belongs to the caller."""


def _nofollow(path: str, flags: int) -> int:
    """The ``opener`` of every file runstate creates (mode ``"xb"``): ``O_NOFOLLOW`` added."""
    return os.open(path, flags | os.O_NOFOLLOW | _CLOEXEC, 0o644)


def _makedirs_durable(path: str) -> None:
    """Create ``path`` and its missing parents, fsyncing each new entry's parent."""
    path = os.path.abspath(path)
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
    claim = None
    with contextlib.suppress(OSError):  # held while deleting: cleanup leaves the directory to us
        claim = _claim_dir(path)
    try:
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
        claim = _claim_dir(path)
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
        raise _write_error(exc, "cannot list", directory) from exc
    removed = []
    for path in sorted(os.path.join(directory, n) for n in names if LEFTOVER_RE.match(n)):
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                continue
            claim = _claim_dir(path)
        except _NoDirectoryLocks:  # only the lock holder writes here: remove it, as it always did
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
        self.path = os.path.join(local_path(directory), LOCK_NAME)
        self._held: _Flock | None = None

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
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC
        try:
            _makedirs_durable(os.path.dirname(self.path))
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._refuse("is a symbolic link", errno.ELOOP) from None
            if exc.errno == errno.EISDIR:
                raise self._refuse("is not a regular file", errno.EISDIR) from None
            raise _write_error(exc, "cannot create lock file", self.path) from exc
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
            raise _write_error(exc, "cannot lock", self.path) from exc
        held = _Flock(fd)
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

    def __init__(self, location: str | os.PathLike[str]) -> None:
        self.location = local_path(location)

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
        """``.tmp-<name>-<12 hex>`` and ``.del-<name>-<12 hex>`` directories no live process holds."""
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
        """Remove what :meth:`list_leftovers` lists (never a save or deletion in progress)."""
        return remove_leftovers(self.location)

    def lock(self) -> RunLock:
        """An ``flock`` on ``<dir>/.lock``."""
        return RunLock(self.location)

    def set_aside(self, name: str, tag: str) -> str:
        """``os.rename`` to ``<name>.<tag>-<12 hex>``, then fsync the run directory."""
        moved = self.rename(name, f"{name}.{tag}-{uuid.uuid4().hex[:12]}")
        try:
            fsync_dir(self.location)
        except OSError as exc:
            raise _write_error(exc, "cannot make durable the move of", self.join(name), f"it is now {moved}") from exc
        return moved

    def list_names(self) -> list[str]:
        """``os.listdir`` of the root."""
        try:
            return sorted(os.listdir(self.location))
        except (FileNotFoundError, NotADirectoryError):
            return []
