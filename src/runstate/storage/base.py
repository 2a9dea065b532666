"""The storage interface: where the bytes of checkpoints go, and how a checkpoint is committed.

Everything above this package (the manager, ``runstate.save/load``, the reader, ``verify``)
talks to a :class:`Store` rooted at a run directory (or at one checkpoint) and never calls
``os`` or a network client itself. Two backends implement it:

* :mod:`runstate.storage.local`: a POSIX directory; a checkpoint is built in a hidden
  temporary directory and committed by one atomic ``rename``.
* :mod:`runstate.storage.fsspec_store`: any fsspec URL (``s3://``, ``memory://``,
  ``file://``...). Object stores have no atomic rename: a checkpoint is written in place
  under its final prefix and ``manifest.json``, written **last**, is the commit marker.

Both keep the same invariant for readers: :meth:`Store.list_committed` lists only complete
checkpoints, and a checkpoint is complete exactly when its ``manifest.json`` is visible.

Several processes may write files of ONE checkpoint (distributed saves): one of them calls
:meth:`Store.begin`, hands :attr:`Staging.location` (a plain string) to the others, which
call :meth:`Store.attach` and write their files; only the one that began it commits.
"""

from __future__ import annotations

import abc
import re
import uuid
from contextlib import AbstractContextManager
from types import TracebackType
from typing import IO, Protocol

from runstate.errors import CheckpointError, CheckpointWriteError

__all__ = ["LOCK_NAME", "STEP_RE", "Lock", "Staging", "Store", "step_dirname"]

#: Committed checkpoints of a run are named ``step-<digits>``, exactly as :func:`step_dirname`
#: writes them (at least 12 digits, zero-padded): one name per step, so what is listed is what
#: is read (an unpadded ``step-1200`` is not a checkpoint of the run).
STEP_RE = re.compile(r"^step-([0-9]{12}|[1-9][0-9]{12,})\Z")
#: The writer lock of a run directory.
LOCK_NAME = ".lock"


def step_dirname(step: int) -> str:
    """The name of a committed step's checkpoint: ``step-000000000100``."""
    return f"step-{step:012d}"


class Lock(Protocol):
    """The writer lock of a run: one writer per run."""

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        ...

    def acquire(self) -> None:
        """Take the lock or raise ``LockError`` naming the holder."""
        ...

    def release(self) -> None:
        """Release the lock (idempotent)."""
        ...


class Staging(abc.ABC):
    """One checkpoint being written, not yet visible to readers.

    Use it as a context manager: an exception inside the block aborts the checkpoint (and an
    ``OSError`` becomes ``CheckpointWriteError``); leaving the block of a staging that began
    the checkpoint without committing it aborts it too. An attached staging (``can_commit``
    False) is left alone on a normal exit: the process that began the checkpoint commits it.

    Attributes:
        location: where the checkpoint's files are written: pass it to :meth:`Store.attach`
            in another process to write files into the same checkpoint.
        final: where the checkpoint becomes visible once committed.
        can_commit: False for a staging obtained with :meth:`Store.attach`.
        parallel_writes: how many files it is worth writing at the same time.
    """

    location: str
    final: str
    can_commit: bool
    parallel_writes: int = 1

    @abc.abstractmethod
    def open_write(self, name: str) -> AbstractContextManager[IO[bytes]]:
        """A new binary file ``name`` in the checkpoint; durable (fsynced or uploaded) when the block exits.

        Args:
            name: a plain file name (no ``/``), unique within the checkpoint.
        """

    @abc.abstractmethod
    def commit(self, manifest: bytes) -> str:
        """Write ``manifest.json`` last and make the checkpoint visible; on error nothing is visible.

        Returns:
            The committed checkpoint's location.

        Raises:
            StepExistsError: the checkpoint appeared meanwhile (another writer).
            CheckpointWriteError: the storage failed; nothing was committed.
            CheckpointError: this staging was attached and cannot commit.
        """

    @abc.abstractmethod
    def abort(self) -> None:
        """Remove everything written so far (best effort, idempotent)."""

    @abc.abstractmethod
    def reader(self) -> Store:
        """A store rooted at the files written so far (to read them back before committing)."""

    def local_dir(self) -> str | None:
        """The local directory holding the files, when there is one (used to drop page caches)."""
        return None

    def write_error(self, exc: OSError) -> CheckpointWriteError:
        """The ``CheckpointWriteError`` that reports ``exc`` (what failed, where, what to do)."""
        reason = exc.strerror or str(exc)
        return CheckpointWriteError(
            exc.errno or 0,
            f"cannot write checkpoint {self.final}: {reason}; nothing was committed, check the storage and try again",
        )

    def _refuse_commit(self) -> None:
        if not self.can_commit:
            raise CheckpointError(
                f"{self.location}: this staging was attached to a checkpoint begun elsewhere and cannot "
                "commit it; the process that called Store.begin() commits"
            )

    def __enter__(self) -> Staging:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self.abort()
            if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
                raise self.write_error(exc) from exc
        elif self.can_commit and not getattr(self, "committed", False):
            self.abort()


class Store(abc.ABC):
    """A run directory (or one checkpoint) on some storage.

    Names passed to its methods are relative to :attr:`location` and use ``/`` as separator;
    locations returned are full strings (a local path or a URL) that :func:`open_store` accepts.

    Attributes:
        location: the root of this store, as given (a path or a URL).
    """

    location: str

    # -- layout -----------------------------------------------------------------------------
    @abc.abstractmethod
    def join(self, name: str) -> str:
        """The full location of ``name`` under this store."""

    @abc.abstractmethod
    def child(self, name: str) -> Store:
        """A store rooted at ``name`` (e.g. one checkpoint of a run), sharing this one's connection."""

    @property
    @abc.abstractmethod
    def is_local(self) -> bool:
        """True for a plain local directory (POSIX semantics: rename, fsync, flock)."""

    # -- reading -----------------------------------------------------------------------------
    @abc.abstractmethod
    def open_read(self, name: str) -> tuple[IO[bytes], int]:
        """Open ``name`` for reading; return a binary file (``seek``/``read``/``readinto``) and its size.

        Raises:
            FileNotFoundError: ``name`` does not exist.
            CorruptCheckpointError: ``name`` is not a regular file (symlinks are refused locally).
        """

    @abc.abstractmethod
    def exists(self, name: str = "") -> bool:
        """True when ``name`` (a file or a directory/prefix) exists; ``""`` is the root itself."""

    @abc.abstractmethod
    def list_committed(self) -> dict[int, str]:
        """Map step to location for every committed checkpoint (``step-N`` with a manifest), oldest first."""

    @abc.abstractmethod
    def list_leftovers(self) -> list[str]:
        """Locations of the remains of interrupted saves or deletions; readers ignore them."""

    # -- writing -----------------------------------------------------------------------------
    @abc.abstractmethod
    def begin(self, name: str | int) -> Staging:
        """Start writing the checkpoint ``name`` (a step number means ``step-<N>``).

        Raises:
            StepExistsError: ``name`` is already committed.
            CheckpointWriteError: the storage failed.
        """

    @abc.abstractmethod
    def attach(self, location: str) -> Staging:
        """Write files into the uncommitted checkpoint another process began (cannot commit)."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Delete a committed checkpoint so that no reader ever sees it half-deleted.

        Raises:
            CheckpointWriteError: the storage failed.
        """

    @abc.abstractmethod
    def rename(self, name: str, new_name: str) -> str:
        """Move a checkpoint to ``new_name`` (not a committed name); return its new location."""

    @abc.abstractmethod
    def remove_leftovers(self) -> list[str]:
        """Remove the remains of interrupted saves or deletions; call only while holding :meth:`lock`."""

    @abc.abstractmethod
    def lock(self) -> Lock:
        """The writer lock of this run (not yet acquired)."""

    # -- checkpoints set aside (kept for the user, never read as part of the run) ----------------
    def set_aside(self, name: str, tag: str) -> str:
        """Move the checkpoint ``name`` to ``<name>.<tag>-<12 hex>`` durably; return its new location.

        Readers and retention ignore the new name (it is not ``step-N``); :meth:`list_aside`
        finds it again. Backends whose ``rename`` is not durable by itself override this.

        Raises:
            CheckpointWriteError: the storage failed; ``name`` is still where it was.
        """
        return self.rename(name, f"{name}.{tag}-{uuid.uuid4().hex[:12]}")

    def list_aside(self, tag: str) -> list[tuple[int, str]]:
        """``(step, name)`` of every checkpoint set aside with ``tag``, by step."""
        found = []
        for name in self.list_names():
            m = re.match(r"^step-([0-9]+)\." + re.escape(tag) + r"-[0-9a-f]{12}\Z", name)
            if m:
                found.append((int(m.group(1)), name))
        return sorted(found)

    def list_names(self) -> list[str]:
        """The names of the entries directly under the root (empty when it does not exist)."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its entries")
