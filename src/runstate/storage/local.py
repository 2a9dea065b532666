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
so a symlink planted in a run directory is refused, never followed (:mod:`._fs`); the
locks and their behaviour across ``fork()`` are in :mod:`._locks`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from typing import IO

from runstate.errors import CheckpointWriteError, StepExistsError
from runstate.format.manifest import MANIFEST_NAME
from runstate.storage._fs import (
    drop_page_cache,
    entry_kind,
    makedirs_durable,
    modified,
    nofollow,
    open_regular,
    tree_size,
    write_error,
)
from runstate.storage._fs import fsync_dir as fsync_dir
from runstate.storage._locks import Flock, NoDirectoryLocks, claim_dir
from runstate.storage._locks import RunLock as RunLock
from runstate.storage._rundir import LEFTOVER_PREFIXES as LEFTOVER_PREFIXES
from runstate.storage._rundir import LEFTOVER_RE, hidden_name, list_leftovers, remove_leftovers
from runstate.storage._rundir import delete_directory as delete_directory
from runstate.storage._rundir import list_committed as list_committed
from runstate.storage.base import (
    BLOBS_DIR,
    INTERRUPTED_DELETION,
    INTERRUPTED_SAVE,
    AttachedStaging,
    BegunStaging,
    EntryKind,
    Extra,
    Store,
    step_dirname,
)

__all__ = ["LocalAttachedStaging", "LocalStaging", "LocalStore", "commit_directory", "local_path"]
# The ``X as X`` imports above are re-exports, for tests and benchmarks that import them from here.

_STEP_NAME = re.compile(r"^step-([0-9]+)\Z")


def local_path(location: str | os.PathLike[str]) -> str:
    """A local path as the OS should see it: ``~`` and ``~user`` expanded, as a shell would.

    Relative paths stay relative (to the working directory); every place that needs a
    parent directory takes it from the absolute path, so a bare name such as ``"ckpt"``
    works like ``"./ckpt"``.
    """
    return os.path.expanduser(os.fspath(location))


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
            raise write_error(exc, "cannot write checkpoint", final) from exc
        raise


class _LocalFiles:
    """What both kinds of local staging share: new files in a directory, fsynced on close."""

    location: str
    final: str
    parallel_writes = 1  # one local disk: sequential writes with early writeback are fastest

    def __init__(self, tmp: str, final: str) -> None:
        self.location = tmp
        self.final = final
        self._written: list[str] = []

    @contextlib.contextmanager
    def open_write(self, name: str) -> Iterator[IO[bytes]]:
        """A new file in the temporary directory, fsynced when the block exits."""
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"{name!r} is not a plain file name")
        path = os.path.join(self.location, name)
        with open(path, "xb", buffering=0, opener=nofollow) as f:
            self._written.append(path)
            yield f
            os.fsync(f.fileno())

    def write_error(self, exc: OSError) -> CheckpointWriteError:
        """A message with a hint per errno (disk full, quota, permissions, read-only)."""
        return write_error(exc, "cannot write checkpoint", self.final)

    def reader(self) -> Store:
        """A store rooted at the temporary directory."""
        return LocalStore(self.location)

    def drop_caches(self) -> None:
        """Drop the page cache of the files written so far (``posix_fadvise``)."""
        drop_page_cache(self.location)


class LocalStaging(_LocalFiles, BegunStaging):
    """A checkpoint being built in a hidden ``.tmp-<name>-<hex>`` directory next to its final name."""

    def __init__(self, tmp: str, final: str, *, claim: Flock | None = None) -> None:
        super().__init__(tmp, final)
        self.committed = False
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
        tmp = os.path.join(parent, hidden_name("tmp", name))
        try:
            makedirs_durable(parent)
            for _ in range(100):  # a cleanup that removed our new directory before we locked it: retry
                tmp = os.path.join(parent, hidden_name("tmp", name))
                os.mkdir(tmp)
                try:
                    claim = claim_dir(tmp)
                except NoDirectoryLocks:  # save unprotected: only the lock holder cleans up here
                    return cls(tmp, final)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.rmdir(tmp)
                    raise
                if claim is not None:
                    return cls(tmp, final, claim=claim)
                with contextlib.suppress(OSError):
                    os.rmdir(tmp)
            raise OSError(errno.EAGAIN, "another process keeps removing the temporary directory")
        except OSError as exc:
            raise write_error(exc, "cannot create", tmp) from exc

    def commit(self, manifest: bytes) -> str:
        """Write ``manifest.json`` (fsynced) and rename the directory into place."""
        try:
            with open(os.path.join(self.location, MANIFEST_NAME), "xb", opener=nofollow) as f:
                f.write(manifest)
                f.flush()
                os.fsync(f.fileno())
            self.publish()
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError) and not isinstance(exc, (StepExistsError, CheckpointWriteError)):
                raise write_error(exc, "cannot write checkpoint", self.final) from exc
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
        """Remove the temporary directory, with every file in it."""
        if self.committed:
            return
        shutil.rmtree(self.location, ignore_errors=True)
        self._unclaim()


class LocalAttachedStaging(_LocalFiles, AttachedStaging):
    """Files written into the temporary directory another process created with :meth:`LocalStore.begin`."""

    def abort(self) -> None:
        """Remove the files this staging wrote (the directory is the owner's)."""
        for path in self._written:
            with contextlib.suppress(OSError):
                os.remove(path)


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

    def kind(self, name: str = "") -> EntryKind | None:
        """``os.stat`` (following symlinks): a regular file, a directory, something else, or None."""
        return entry_kind(self.join(name))

    def size(self, name: str = "") -> int:
        """Bytes of the files under ``name`` (``lstat`` sizes: symlinks not followed)."""
        return tree_size(self.join(name))

    def modified(self, name: str = "") -> float | None:
        """The ``lstat`` modification time of ``name``."""
        return modified(self.join(name))

    def drop_caches(self, name: str = "") -> None:
        """``posix_fadvise(DONTNEED)`` on each regular file directly under ``name``."""
        drop_page_cache(self.join(name))

    def list_committed(self) -> dict[int, str]:
        """Committed ``step-N`` directories."""
        return list_committed(self.location)

    def list_leftovers(self) -> list[str]:
        """``.tmp-<name>-<12 hex>`` and ``.del-<name>-<12 hex>`` directories no live process holds."""
        return list_leftovers(self.location)

    def _leftover(self, location: str) -> Extra:
        name = os.path.basename(location)
        m = LEFTOVER_RE.match(name)
        kind = INTERRUPTED_DELETION if m is not None and m.group(1) == "del" else INTERRUPTED_SAVE
        step = _STEP_NAME.match(m.group(2)) if m is not None else None
        return Extra(name, location, kind, int(step.group(1)) if step else None)

    def begin(self, name: str | int) -> LocalStaging:
        """A hidden temporary directory next to ``name``."""
        return LocalStaging.begin(self.join(step_dirname(name) if isinstance(name, int) else name))

    def attach(self, location: str) -> LocalAttachedStaging:
        """Write into the temporary directory ``location`` that :meth:`begin` created elsewhere."""
        m = LEFTOVER_RE.match(os.path.basename(location))
        if m is None or m.group(1) != "tmp" or not os.path.isdir(location):
            raise CheckpointWriteError(
                errno.ENOENT,
                f"cannot attach to {location}: not the temporary directory of a checkpoint being saved; "
                "pass the Staging.location of the process that called begin()",
            )
        return LocalAttachedStaging(location, os.path.join(os.path.dirname(location), m.group(2)))

    def delete(self, name: str) -> None:
        """Rename to a hidden ``.del-`` name, then remove."""
        delete_directory(self.join(name))

    def rename(self, name: str, new_name: str) -> str:
        """``os.rename``."""
        src, dst = self.join(name), self.join(new_name)
        try:
            os.rename(src, dst)
        except OSError as exc:
            raise write_error(exc, "cannot rename", src, f"it stays where it is (wanted {dst})") from exc
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
            raise write_error(exc, "cannot make durable the move of", self.join(name), f"it is now {moved}") from exc
        return moved

    def list_names(self) -> list[str]:
        """``os.listdir`` of the root."""
        try:
            return sorted(os.listdir(self.location))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def sibling(self, name: str) -> LocalStore:
        """The directory ``name`` next to the root."""
        return LocalStore(os.path.join(os.path.dirname(os.path.abspath(self.location)), name))

    @contextlib.contextmanager
    def open_blob_write(self, name: str) -> Iterator[IO[bytes]]:
        """A new file in ``<root>/blobs``, fsynced when the block exits (the folder: :meth:`sync_blobs`)."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"{name!r} is not a plain file name")
        folder = self.join(BLOBS_DIR)
        makedirs_durable(folder)
        path = os.path.join(folder, name)
        try:
            with open(path, "xb", buffering=0, opener=nofollow) as f:
                yield f
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise

    def sync_blobs(self) -> None:
        """fsync ``<root>/blobs``, so that the entries of the files written there are durable."""
        fsync_dir(self.join(BLOBS_DIR))

    def list_blobs(self) -> dict[str, int]:
        """The regular ``.safetensors`` files of ``<root>/blobs`` (symlinks and others ignored)."""
        found: dict[str, int] = {}
        try:
            entries = list(os.scandir(self.join(BLOBS_DIR)))
        except (FileNotFoundError, NotADirectoryError):
            return found
        for entry in entries:
            if entry.name.endswith(".safetensors") and not entry.name.startswith(".") and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    found[entry.name] = entry.stat(follow_symlinks=False).st_size
        return dict(sorted(found.items()))

    def delete_blob(self, name: str) -> None:
        """``os.unlink`` of ``<root>/blobs/<name>``."""
        path = os.path.join(self.join(BLOBS_DIR), name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise write_error(exc, "cannot remove", path, "it stays (unreferenced: only disk space)") from exc
