"""The storage interface: where the bytes of checkpoints go, and how a checkpoint is committed.

Only this package touches storage. Everything above it (the manager, ``runstate.save/load``,
the reader, ``verify``, the CLI) talks to a :class:`Store` rooted at a run directory (or at
the parent of one checkpoint, see :func:`runstate.storage.parent_store`): it lists committed
steps, leftovers and set-aside checkpoints with their kind (:meth:`Store.list_extras`),
begins or attaches a staging area, drops caches, takes the writer lock, and never calls
``os`` or a network client, nor parses a hidden name, itself. Two backends implement it:

* :mod:`runstate.storage.local`: a POSIX directory; a checkpoint is built in a hidden
  temporary directory and committed by one atomic ``rename``.
* :mod:`runstate.storage.fsspec_store`: any fsspec URL (``s3://``, ``memory://``,
  ``file://``...). Object stores have no atomic rename: a checkpoint is written in place
  under its final prefix and ``manifest.json``, written **last**, is the commit marker.

Both keep the same invariant for readers: :meth:`Store.list_committed` lists only complete
checkpoints, and a checkpoint is complete exactly when its ``manifest.json`` is visible.

Several processes may write files of ONE checkpoint (distributed saves): one of them calls
:meth:`Store.begin` and gets a :class:`BegunStaging`, hands its :attr:`Staging.location` (a
plain string) to the others, which call :meth:`Store.attach` and get an
:class:`AttachedStaging`: they write their files, and only the one that began it commits.
"""

from __future__ import annotations

import abc
import errno
import re
import time
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Literal, Protocol

from runstate.errors import CheckpointError, CheckpointWriteError

__all__ = [
    "ABANDONED",
    "BLOBS_DIR",
    "DAMAGED",
    "INTERRUPTED_DELETION",
    "INTERRUPTED_SAVE",
    "LOCK_NAME",
    "MISNAMED",
    "STEP_RE",
    "AttachedStaging",
    "BegunStaging",
    "EntryKind",
    "Extra",
    "Lock",
    "Staging",
    "Store",
    "step_dirname",
]

#: Committed checkpoints of a run are named ``step-<digits>``, exactly as :func:`step_dirname`
#: writes them (at least 12 digits, zero-padded): one name per step, so what is listed is what
#: is read (an unpadded ``step-1200`` is not a checkpoint of the run).
STEP_RE = re.compile(r"^step-([0-9]{12}|[1-9][0-9]{12,})\Z")
#: The writer lock of a run directory.
LOCK_NAME = ".lock"
#: The folder of a run that holds the tensor files of incremental checkpoints (docs/format.md
#: section 15): written before the checkpoints that refer to them are committed, removed only
#: once no checkpoint refers to them.
BLOBS_DIR = "blobs"

#: Kinds of :class:`Extra`: the remains of a save or a deletion that was interrupted (never
#: committed; the next writer removes them).
INTERRUPTED_SAVE = "interrupted save"
INTERRUPTED_DELETION = "interrupted deletion"
#: A committed checkpoint found damaged by a restore and moved aside as ``step-N.corrupt-<unix seconds>``.
DAMAGED = "damaged"
#: A checkpoint of a branch abandoned by a rollback, set aside as ``step-N.abandoned-<12 hex>``
#: (also the tag given to :meth:`Store.set_aside`).
ABANDONED = "abandoned"
#: ``step-<digits>`` that is not the run's own name for that step (``step-1200``): never read.
MISNAMED = "misnamed"

_DAMAGED_RE = re.compile(r"^step-([0-9]+)\.corrupt-[0-9]+\Z")
_STEP_LIKE_RE = re.compile(r"^step-([0-9]+)\Z")

#: What :meth:`Store.kind` reports: a regular file (an object), a directory (a prefix), or
#: anything else (a FIFO, a device, a socket).
EntryKind = Literal["file", "directory", "other"]


def _aside_re(tag: str) -> re.Pattern[str]:
    """The names :meth:`Store.set_aside` gives with ``tag``: ``step-N.<tag>-<12 hex>``."""
    return re.compile(r"^step-([0-9]+)\." + re.escape(tag) + r"-[0-9a-f]{12}\Z")


def step_dirname(step: int) -> str:
    """The name of a committed step's checkpoint: ``step-000000000100``."""
    return f"step-{step:012d}"


@dataclass(frozen=True)
class Extra:
    """An entry of a run that is runstate's but not a committed checkpoint (see :meth:`Store.list_extras`).

    Attributes:
        name: the entry's name under the store's root.
        location: its full location (a path or a URL).
        kind: :data:`INTERRUPTED_SAVE`, :data:`INTERRUPTED_DELETION`, :data:`DAMAGED`,
            :data:`ABANDONED` or :data:`MISNAMED`.
        step: the step it belongs to, when its name says it.
    """

    name: str
    location: str
    kind: str
    step: int | None


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

    It comes in two kinds: a :class:`BegunStaging` (from :meth:`Store.begin`: this process
    commits it, or aborts it whole) and an :class:`AttachedStaging` (from
    :meth:`Store.attach`: files written into a checkpoint another process began).

    Use it as a context manager: an exception inside the block aborts it (and an ``OSError``
    becomes ``CheckpointWriteError``); what a normal exit does depends on the kind.

    Attributes:
        location: where the checkpoint's files are written: pass it to :meth:`Store.attach`
            in another process to write files into the same checkpoint.
        final: where the checkpoint becomes visible once committed.
        parallel_writes: how many files it is worth writing at the same time.
    """

    location: str
    final: str
    parallel_writes: int = 1

    @abc.abstractmethod
    def open_write(self, name: str) -> AbstractContextManager[IO[bytes]]:
        """A new binary file ``name`` in the checkpoint; durable (fsynced or uploaded) when the block exits.

        As with any Python file object, ``write(b)`` must be done with ``b`` when it returns (copy
        it to keep it): runstate reuses its buffers (gathered small tensors, compressed chunks).

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
        """Remove what was written (best effort, idempotent): see the two kinds."""

    @abc.abstractmethod
    def reader(self) -> Store:
        """A store rooted at the files written so far (to read them back before committing)."""

    def drop_caches(self) -> None:
        """Have the next read of the files written so far come from the storage, not a cache."""
        return None  # backends without a cache of their own: nothing to drop

    def write_error(self, exc: OSError) -> CheckpointWriteError:
        """The ``CheckpointWriteError`` that reports ``exc`` (what failed, where, what to do)."""
        message = (
            f"cannot write checkpoint {self.final}: {exc.strerror or exc}; nothing was committed, "
            "check the storage and try again"
        )
        return CheckpointWriteError(exc.errno, message) if exc.errno else CheckpointWriteError(message)

    @abc.abstractmethod
    def _leave(self) -> None:
        """What leaving the ``with`` block without an exception does."""

    def __enter__(self) -> Staging:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self.abort()
            if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
                raise self.write_error(exc) from exc
        else:
            self._leave()


class BegunStaging(Staging):
    """A checkpoint this process began (:meth:`Store.begin`): it commits it, or aborts it whole.

    :meth:`abort` removes every file of the checkpoint, also those attached processes wrote;
    leaving the ``with`` block without committing aborts it.

    Attributes:
        committed: True once :meth:`commit` succeeded (``abort`` then does nothing).
    """

    committed: bool = False

    def _leave(self) -> None:
        if not self.committed:
            self.abort()


class AttachedStaging(Staging):
    """Files written into a checkpoint another process began (:meth:`Store.attach`).

    It cannot commit (the process that began the checkpoint does); :meth:`abort` removes only
    the files it wrote, and leaving the ``with`` block normally leaves them to the owner.
    """

    def commit(self, manifest: bytes) -> str:
        """Refused: only the process that called :meth:`Store.begin` commits.

        Raises:
            CheckpointError: always.
        """
        raise CheckpointError(
            f"{self.location}: this staging was attached to a checkpoint begun elsewhere and cannot "
            "commit it; the process that called Store.begin() commits"
        )

    def _leave(self) -> None:
        pass


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
        """True when ``name`` (a file or a directory/prefix) exists; ``""`` is the root itself.

        Locally a symlink exists even when its target does not (``os.path.lexists``).
        """

    @abc.abstractmethod
    def kind(self, name: str = "") -> EntryKind | None:
        """What ``name`` is (``""``: the root): ``"file"``, ``"directory"``, ``"other"``, or None when missing.

        For messages and checks only: it follows symlinks locally (as ``os.path.isdir``
        does), while every read and write refuses them. On object stores an object is a
        ``"file"`` and a non-empty prefix a ``"directory"``.
        """

    def check_directory(self, needs: str) -> None:
        """Refuse a root that exists and is not a directory (a file where the run should be).

        Args:
            needs: the end of the message, saying what needs a directory
                (``"a CheckpointManager needs a directory"``).

        Raises:
            CheckpointWriteError: ``errno.ENOTDIR``, the root is a file.
        """
        if self.kind() not in (None, "directory"):
            raise CheckpointWriteError(errno.ENOTDIR, f"{self.location} is a file; {needs}")

    @abc.abstractmethod
    def size(self, name: str = "") -> int:
        """Bytes in the files under ``name`` (a file's own size), 0 when missing; symlinks are not followed."""

    def modified(self, name: str = "") -> float | None:
        """When ``name`` was last modified (POSIX seconds), or None when missing or not kept by the backend."""
        return None

    def drop_caches(self, name: str = "") -> None:
        """Have the next read of the files directly under ``name`` come from the storage, not a cache."""
        return None  # backends without a cache of their own: nothing to drop

    @abc.abstractmethod
    def list_committed(self) -> dict[int, str]:
        """Map step to location for every committed checkpoint (``step-N`` with a manifest), oldest first."""

    @abc.abstractmethod
    def list_leftovers(self) -> list[str]:
        """Locations of the remains of interrupted saves or deletions; readers ignore them."""

    def list_extras(self) -> list[Extra]:
        """Every entry of the run that is runstate's but not a committed checkpoint, with its kind.

        The leftovers :meth:`list_leftovers` finds (:data:`INTERRUPTED_SAVE`,
        :data:`INTERRUPTED_DELETION`), checkpoints set aside as damaged (:data:`DAMAGED`) or
        by a rollback (:data:`ABANDONED`), and ``step-<digits>`` entries that are not the
        run's name for their step (:data:`MISNAMED`); sorted by kind, then name.
        """
        found = [self._leftover(location) for location in self.list_leftovers()]
        abandoned = _aside_re(ABANDONED)
        for name in self.list_names():
            for kind, pattern in ((DAMAGED, _DAMAGED_RE), (ABANDONED, abandoned), (MISNAMED, _STEP_LIKE_RE)):
                m = pattern.match(name)
                if m and not (kind == MISNAMED and STEP_RE.match(name)):
                    found.append(Extra(name, self.join(name), kind, int(m.group(1))))
        return sorted(found, key=lambda e: (e.kind, e.name))

    def _leftover(self, location: str) -> Extra:
        """The :class:`Extra` of a location :meth:`list_leftovers` returned (backends name their own)."""
        name = location.rstrip("/").rsplit("/", 1)[-1]
        m = _STEP_LIKE_RE.match(name)
        return Extra(name, location, INTERRUPTED_SAVE, int(m.group(1)) if m else None)

    # -- writing -----------------------------------------------------------------------------
    @abc.abstractmethod
    def begin(self, name: str | int) -> BegunStaging:
        """Start writing the checkpoint ``name`` (a step number means ``step-<N>``).

        Raises:
            StepExistsError: ``name`` is already committed.
            CheckpointWriteError: the storage failed.
        """

    @abc.abstractmethod
    def attach(self, location: str) -> AttachedStaging:
        """Write files into the uncommitted checkpoint another process began (cannot commit).

        Raises:
            CheckpointWriteError: ``location`` is not the :attr:`Staging.location` of a checkpoint being saved.
        """

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

    def set_aside_damaged(self, name: str) -> str:
        """Move the damaged checkpoint ``name`` to ``<name>.corrupt-<unix seconds>``; return its new location.

        Readers and retention ignore the new name; :meth:`list_extras` lists it as :data:`DAMAGED`.

        Raises:
            CheckpointWriteError: the storage failed; ``name`` is still where it was.
        """
        return self.rename(name, f"{name}.corrupt-{int(time.time())}")

    def list_aside(self, tag: str) -> list[tuple[int, str]]:
        """``(step, name)`` of every checkpoint set aside with ``tag``, by step."""
        found = []
        pattern = _aside_re(tag)
        for name in self.list_names():
            m = pattern.match(name)
            if m:
                found.append((int(m.group(1)), name))
        return sorted(found)

    def list_names(self) -> list[str]:
        """The names of the entries directly under the root (empty when it does not exist)."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its entries")

    # -- the blob area of a run (incremental checkpoints) ---------------------------------------
    def sibling(self, name: str) -> Store:
        """A store rooted at ``name`` in the same parent as this one (a checkpoint's run's ``blobs``)."""
        raise NotImplementedError(f"{type(self).__name__} has no sibling stores; it cannot read incremental checkpoints")

    def blob_area(self) -> Store:
        """For the store of one checkpoint: the store of its run's blob area (``<run>/blobs``)."""
        return self.sibling(BLOBS_DIR)

    def open_blob_write(self, name: str) -> AbstractContextManager[IO[bytes]]:
        """A new file ``name`` in this run's blob area; its bytes durable (fsynced, or uploaded)
        when the block exits, removed when it raises. Its folder entry is durable once
        :meth:`sync_blobs` returned.

        Raises:
            ValueError: ``name`` is not a plain file name.
        """
        raise NotImplementedError(f"{type(self).__name__} has no blob area; it cannot save incremental checkpoints")

    def sync_blobs(self) -> None:
        """Make the entries of the files written into the blob area durable (one folder fsync)."""
        return None  # object stores: an upload is durable when it completes

    def list_blobs(self) -> dict[str, int]:
        """Every ``.safetensors`` file of this run's blob area and its size (empty when there is none)."""
        return {}

    def delete_blob(self, name: str) -> None:
        """Remove the file ``name`` from this run's blob area (gone already: nothing to do).

        Raises:
            CheckpointWriteError: the storage failed.
        """
        raise NotImplementedError(f"{type(self).__name__} has no blob area")
