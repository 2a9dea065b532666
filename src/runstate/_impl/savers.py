"""How a :class:`~runstate.CheckpointManager` writes a step: one small strategy per way of saving.

* :class:`SyncSaver` writes and commits before ``save`` returns; with a group of several
  processes it is the collective saver: every process calls it, rank 0 commits.
* :class:`AsyncSaver` copies the state's tensors into reused host buffers (a point-in-time
  snapshot) and writes and commits in a background thread, at most one save in flight.

Both run the one pipeline of :mod:`runstate._impl.pipeline` (capture, then write and
commit); the manager's cadence, retention and preemption handling sit around them, in
``before_start`` and ``after_commit``. Invariant: a save that fails commits nothing, and
a background failure is never lost (see :mod:`runstate._impl.background`).
"""

from __future__ import annotations

import abc
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from runstate._impl.background import BackgroundSaver
from runstate._impl.group import Group, SingleProcess
from runstate._impl.incremental import Incremental
from runstate._impl.pipeline import Captured, CheckpointInfo, capture, save_checkpoint
from runstate._impl.reader import CheckpointReader
from runstate._impl.snapshot import SnapshotPool
from runstate._impl.verify import verify_reader
from runstate.errors import CheckpointConfigError, CorruptCheckpointError
from runstate.format.compress import Compression
from runstate.storage import Staging, Store, step_dirname

__all__ = ["AsyncSaver", "Saver", "SyncSaver", "make_saver"]

logger = logging.getLogger("runstate")


@dataclass(frozen=True)
class _Job:
    """One captured step to write, and what to do once it is committed."""

    step: int
    captured: Captured
    verify: bool
    after_commit: Callable[[CheckpointInfo], None]


class Saver(abc.ABC):
    """Writes the checkpoint of one step of a run directory (:func:`make_saver` picks the kind).

    Attributes:
        last_blocking_seconds: how long the last :meth:`save` kept training waiting for the
            state's bytes (async: the snapshot; sync: 0.0, the whole save blocks).
    """

    def __init__(self, store: Store, group: Group) -> None:
        self._store = store
        self._group = group
        self.last_blocking_seconds = 0.0

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        metrics: Mapping[str, Any] | None,
        *,
        verify: bool,
        before_start: Callable[[], None],
        after_commit: Callable[[CheckpointInfo], None],
        compression: Compression | None = None,
        incremental: Incremental | None = None,
    ) -> None:
        """Save ``state`` as step ``step``.

        Args:
            step: a validated step; ``state`` a validated state (loaders prepared).
            metrics: recorded with the checkpoint.
            verify: read every byte back from the storage (caches dropped) before committing.
            before_start: called once on rank 0 in the calling thread before anything is
                written (lock, leftovers, damaged step set aside); raising stops the save.
            after_commit: called on rank 0 once the checkpoint is committed (retention), in
                the thread that committed it; it should log its own failures, not raise.
            compression: how to compress the tensor files (None: as they are).
            incremental: the run's dedup state (tensor files in the blob area), or None.

        Raises:
            AsyncSaveError: (async) the previous background save failed.
            CheckpointError: the save failed; nothing was committed.
        """
        self.wait()  # at most one save in flight; re-raises a failed background save
        captured = capture(
            state, metrics, self._group, where=self._store.join(step_dirname(step)),
            compression=compression,
            incremental=incremental,
        )
        self._save(_Job(step, captured, verify, after_commit), before_start)

    @abc.abstractmethod
    def _save(self, job: _Job, before_start: Callable[[], None]) -> None:
        """Write and commit a captured step, now or in the background."""

    def warmup(self, state: Mapping[str, Any]) -> int:
        """Allocate ahead of time what a save of ``state`` needs (nothing by default).

        Returns:
            The bytes newly allocated.
        """
        return 0

    def wait(self) -> None:
        """Block until the save in flight is committed (nothing to wait for by default).

        Raises:
            AsyncSaveError: the background save failed; its exception is the ``__cause__``.
        """
        return None

    def close(self) -> None:
        """:meth:`wait`, then release the saver's thread and exit hook even if it raised. Idempotent."""
        return None

    def _commit(self, job: _Job, before_start: Callable[[], None] | None, how: str) -> CheckpointInfo | None:
        """Write and commit ``job`` and log it; return what was committed (None on ranks other than 0)."""
        started = time.monotonic()
        info = save_checkpoint(
            self._store,
            step_dirname(job.step),
            job.captured,
            group=self._group,
            step=job.step,
            before_start=before_start,
            before_commit=_read_back if job.verify else None,
        )
        if self._group.rank != 0:
            return None
        seconds = time.monotonic() - started
        logger.info(
            "saved step %d: %.1f MB in %.2f s (%.2f GB/s)%s%s",
            job.step,
            info.nbytes / 1e6,
            seconds,
            info.nbytes / 1e9 / max(seconds, 1e-9),
            how,
            f" from {self._group.size} processes" if self._group.distributed else "",
        )
        return info

    def settle(self) -> None:
        """Block until the upkeep after the last committed save (retention) is done (nothing by default)."""
        return None


def make_saver(store: Store, group: Group, *, async_save: bool) -> Saver:
    """The saver for a run directory: async or sync (collective when ``group`` has several processes).

    Raises:
        CheckpointConfigError: ``async_save`` with a distributed group.
    """
    if not async_save:
        return SyncSaver(store, group)
    if group.distributed:
        raise CheckpointConfigError(
            "async_save=True is not supported under torch.distributed yet: every process would write "
            "from a background thread while training runs collectives; use async_save=False"
        )
    return AsyncSaver(store)


class SyncSaver(Saver):
    """Writes and commits before :meth:`save` returns; with a group of several processes, the
    collective saver: every process calls it alike and rank 0 commits.

    In one process, the upkeep after a commit (retention: deleting old checkpoints and blobs no
    checkpoint refers to any more, milliseconds to seconds for a large checkpoint) runs in a
    background thread while training goes on; :meth:`settle` (called by the manager before it
    lists, restores, cleans or saves again, and by :meth:`close`) waits for it. It deletes
    only what retention deleted before, and a kill during it leaves what a kill during an
    inline deletion leaves (the next save's retention and leftover removal finish the job).
    """

    def __init__(self, store: Store, group: Group) -> None:
        super().__init__(store, group)
        self._upkeep: BackgroundSaver | None = None  # made at the first commit (and again in a forked child)

    def _save(self, job: _Job, before_start: Callable[[], None]) -> None:
        info = self._commit(job, before_start, "")
        if info is None:
            return
        upkeep = functools.partial(_after_commit, job.step, job.after_commit, info)  # not the captured state
        if not self._group.distributed:
            try:
                if self._upkeep is None or self._upkeep.forked:
                    self._upkeep = BackgroundSaver("runstate-retention")
                self._upkeep.submit(job.step, self._store.join(step_dirname(job.step)), upkeep)
                return
            except RuntimeError:  # no thread can be started (limits, interpreter exiting): inline
                pass
        upkeep()

    def settle(self) -> None:
        """See :meth:`Saver.settle` (also from another thread; at once in a forked child)."""
        if self._upkeep is not None:
            self._upkeep.wait()  # _after_commit logs its failures, never raises

    def wait(self) -> None:
        """See :meth:`Saver.wait` (a synchronous save is committed when it returns: waits for its upkeep)."""
        self.settle()

    def close(self) -> None:
        """See :meth:`Saver.close`."""
        upkeep, self._upkeep = self._upkeep, None
        if upkeep is not None and not upkeep.forked:
            upkeep.shutdown()  # after the upkeep in flight


class AsyncSaver(Saver):
    """Snapshots the state and writes it in a background thread; one save in flight (one process).

    :meth:`save` returns once the tensors are copied; the write goes on in the background.

    Args:
        store: the run directory's store.

    Attributes:
        pool: the host buffers of the snapshot, reused from save to save.
    """

    def __init__(self, store: Store) -> None:
        super().__init__(store, SingleProcess())
        self.pool = SnapshotPool()
        self._background = BackgroundSaver()

    def warmup(self, state: Mapping[str, Any]) -> int:
        """Allocate and fault in the snapshot buffers of ``state`` (waits for the save in flight first).

        Raises:
            AsyncSaveError: the previous background save failed.
            CheckpointError: ``state`` cannot be saved (what ``save`` would raise).
        """
        self.wait()  # the buffers may be in use by the writer
        captured = capture(state, None, self._group, where=f"{self._store.join('')}: warmup")
        return self.pool.reserve(captured, populate=True)

    def _save(self, job: _Job, before_start: Callable[[], None]) -> None:
        before_start()  # here, so that its errors (a step already saved...) raise from save()
        started = time.monotonic()
        self.pool.snapshot(job.captured)  # the only part that blocks training
        self.last_blocking_seconds = time.monotonic() - started
        self._background.submit(job.step, self._store.join(step_dirname(job.step)), functools.partial(self._write, job))

    def _write(self, job: _Job) -> None:
        info = self._commit(job, None, " in the background")
        if info is not None:
            _after_commit(job.step, job.after_commit, info)  # already off the training thread

    def wait(self) -> None:
        """See :meth:`Saver.wait`."""
        self._background.wait()

    def close(self) -> None:
        """See :meth:`Saver.close`."""
        try:
            self.wait()
        finally:
            self._background.shutdown()


def _after_commit(step: int, after_commit: Callable[[CheckpointInfo], None], info: CheckpointInfo) -> None:
    """Run the upkeep after ``step``'s commit; a failure is logged (the checkpoint is committed)."""
    try:
        after_commit(info)
    except Exception:
        logger.exception("step %d is saved, but the upkeep after it (retention) failed", step)


def _read_back(staging: Staging, manifest: bytes) -> None:
    """Read every file of a checkpoint about to be committed back from the storage, and check it.

    Raises:
        CorruptCheckpointError: a byte differs from what the manifest says.
    """
    staging.drop_caches()
    report = verify_reader(CheckpointReader(staging.reader(), manifest=manifest))
    if not report.ok:
        raise CorruptCheckpointError(
            f"{staging.final}: read-back verification failed, nothing was committed: "
            + "; ".join(map(str, report.problems))
        )
