"""The run directory of a ``CheckpointManager``: where its steps are, and who may write them.

A run is one :class:`~runstate.storage.Store` holding ``step-N`` checkpoints. This module
answers the questions asked of it without changing it (which steps are committed, which is
the newest intact one, what a step holds) and keeps the single-writer rule: a writing
manager takes the run's ``.lock`` when it is created (rank 0 under ``torch.distributed``,
every process failing alike), so that a second writer fails at once, not at its first save;
a read-only one never takes it. Listing is read again when it raced with the writer's
retention: a step deleted while it was listed or checked is not damage.
"""

from __future__ import annotations

import errno
import logging
import weakref
from collections.abc import Mapping
from typing import Any

from runstate._impl.group import Group, agree
from runstate._impl.pipeline import CheckpointInfo, validate_step
from runstate._impl.reader import CheckpointReader
from runstate._impl.restore_result import RestoreResult
from runstate._impl.verify import verify_reader
from runstate.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    FormatVersionError,
    LockError,
    UnsupportedTypeError,
)
from runstate.format.manifest import Manifest
from runstate.storage import Store, open_store, step_dirname

__all__ = ["RunDirectory", "as_step"]

logger = logging.getLogger("runstate")


def as_step(step: Any) -> int:
    """``step`` checked to be a non-negative int (a :class:`RestoreResult` counts as its int).

    Raises:
        UnsupportedTypeError: ``step`` is not a non-negative int.
    """
    return validate_step(int(step) if isinstance(step, RestoreResult) else step)


class RunDirectory:
    """The steps of one run, its writer lock, and what can be read from it.

    Args:
        directory: a local directory or a URL (see ``CheckpointManager``).
        storage_options: fsspec options for a URL.
        group: the processes of the job (rank 0 takes the lock).
        read_only: never take the lock (a reader next to a live writer).

    Raises:
        CheckpointWriteError: a file is where the run directory should be.
    """

    def __init__(
        self, directory: Any, storage_options: Mapping[str, Any] | None, group: Group, *, read_only: bool
    ) -> None:
        self.store: Store = open_store(directory, storage_options=storage_options)
        self.location = self.store.location
        self.group = group
        self.read_only = read_only
        if self.store.is_local:  # one request on an object store: only checked on a local disk
            self.store.check_directory("a CheckpointManager needs a directory")
        self.lock = self.store.lock()
        # A writer dropped without close() (``CheckpointManager(d).steps()``) frees its lock.
        weakref.finalize(self, self.lock.release)

    def take_lock(self) -> None:
        """A writer takes the run's lock (rank 0 under torch.distributed; every process fails
        alike); a read-only one does nothing.

        Raises:
            LockError: another live process writes to this run.
        """
        if self.read_only:
            return
        error: CheckpointError | None = None
        if self.group.rank == 0:
            try:
                self.lock.acquire()
            except CheckpointError as exc:
                error = exc
        agree(
            self.group,
            error,
            lambda: LockError(
                errno.EWOULDBLOCK,
                f"{self.location}: rank 0 could not take the writer lock (see its error); nothing was written",
            ),
        )

    def path(self, step: Any) -> str:
        """The location of ``step``'s checkpoint (whether or not it exists)."""
        return self.store.join(step_dirname(as_step(step)))

    def step_store(self, step: int) -> Store:
        """The store of ``step``'s checkpoint (whether or not it exists)."""
        return self.store.child(step_dirname(step))

    def committed(self) -> dict[int, str]:
        """The committed steps (step -> location), listed again when the listing came back empty.

        A listing that races with the writer's retention can see the step being deleted but
        not the one committed just before (a directory listing is not a snapshot); the writer
        commits before it deletes, so a second listing sees the new step.
        """
        for _attempt in range(3):
            committed = self.store.list_committed()
            if committed:
                break
        return committed

    def exists(self) -> bool:
        """False when a local run directory was never created (an object store: always True)."""
        return not self.store.is_local or self.store.kind() == "directory"

    def steps(self) -> list[int]:
        """Committed steps, oldest first."""
        return list(self.committed())

    def is_committed(self, step: int) -> bool:
        """True when ``step`` is committed now (one listing, no retry)."""
        return step in self.store.list_committed()

    def existing(self, step: Any) -> Store:
        """The store of a committed step.

        Raises:
            CheckpointNotFoundError: ``step`` is not committed.
        """
        step = as_step(step)
        committed = self.store.list_committed()
        if step not in committed:
            listed = ", ".join(map(str, committed)) or "none"
            raise CheckpointNotFoundError(f"no checkpoint for step {step} in {self.location} (steps: {listed})")
        return self.step_store(step)

    def info(self, step: Any) -> CheckpointInfo:
        """The :class:`CheckpointInfo` of a committed step (``CheckpointNotFoundError`` if not)."""
        with CheckpointReader(self.existing(step)) as reader:
            return reader.info()

    def manifest(self, step: int) -> Manifest | None:
        """The manifest of a committed step, or None when it cannot be read (any reason)."""
        try:
            with CheckpointReader(self.step_store(step)) as reader:
                return reader.manifest
        except CheckpointError:
            return None

    def latest_step(self, *, verified: bool) -> int | None:
        """The newest committed step (with ``verified``, the newest whose every byte checks)."""
        steps = self.steps()
        if not verified:
            return steps[-1] if steps else None
        tried: set[int] = set()
        while True:  # listed again whenever the writer's retention deleted a step while it was checked
            for step in reversed([s for s in steps if s not in tried]):
                tried.add(step)
                if self._intact(step):
                    return step
                if step not in self.steps():  # deleted meanwhile by the writer: not damage, list again
                    break
                logger.warning("latest_step(verified=True): step %d fails verification; trying older ones", step)
            else:
                return None
            steps = self.steps()

    def _intact(self, step: int) -> bool:
        """True when every byte of ``step`` checks; False when damaged (or deleted meanwhile).

        Raises:
            CheckpointReadError: the machine failed, not the checkpoint (open-file limit,
                memory...), and the step is still committed.
            FormatVersionError: the step was written by a newer runstate.
            UnsupportedTypeError: reading it needs a package this machine lacks (zstandard).
                Neither is damage: falling back to an older step (and a rollback setting the
                newer ones aside) would lose training for a missing upgrade.
        """
        try:
            return verify_reader(CheckpointReader(self.step_store(step))).ok
        except CheckpointReadError:
            if step in self.steps():
                raise
            return False
        except (FormatVersionError, UnsupportedTypeError):
            raise
        except CheckpointError:
            return False
