"""What the writer of a run does to its directory besides writing checkpoints.

Leftovers of interrupted saves are removed, old checkpoints are deleted by the retention
policy, a checkpoint found damaged is set aside before its step is saved again, and a
rollback sets the abandoned branch aside. Invariant: a committed checkpoint leaves the run
only through retention (deleted), or set aside under a name no reader takes for a step
(``step-N.corrupt-T`` when damaged, ``step-N.abandoned-<12 hex>`` after a rollback), where
it stays until the user removes it. Those names are made and parsed by :mod:`runstate.storage`
(``Store.set_aside_damaged``, ``Store.set_aside``, ``Store.list_aside``), never here.

Incremental runs keep tensor files in the run's blob area: a blob is removed here, after
the deletions, when no manifest of the run refers to it any more
(:func:`~runstate._impl.incremental.collect_blobs`).

Why a rollback sets steps aside: after ``restore(state, step=100)`` on a run holding 100,
200 and 300, training goes on from 100. Were 200 and 300 left committed, a restart would
resume the abandoned branch, saving step 200 again would fail, and retention would count
them and delete step 100 first.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from runstate._impl.incremental import BlobReferences, collect_blobs
from runstate._impl.reader import CheckpointReader
from runstate.errors import CheckpointError, CheckpointWriteError, StepExistsError
from runstate.policies import Retention
from runstate.storage import ABANDONED, Lock, Store, step_dirname

__all__ = ["RunHousekeeping"]

logger = logging.getLogger("runstate")


class RunHousekeeping:
    """The writer's upkeep of a run directory: leftovers, retention, damaged steps, rollbacks.

    Args:
        store: the run directory.
        retention: which checkpoints to keep.
        lock: the run's writer lock (held by the writer).
        references: the blobs each manifest of the run refers to, shared with the writer's
            incremental state (which tells what it commits); None: a new one.

    Attributes:
        corrupt: steps found damaged by a restore: never deleted by retention, set aside
            before their step is saved again.
    """

    def __init__(
        self, store: Store, retention: Retention, lock: Lock, *, references: BlobReferences | None = None
    ) -> None:
        self._store = store
        self.retention = retention
        self._lock = lock
        self.corrupt: set[int] = set()
        self._rollback: int | None = None  # rolled back to this step; newer ones still to set aside
        self._rolled_back_to: int | None = None  # kept by retention through the first keep_last saves
        self._saves_since_rollback = 0
        self._references = references if references is not None else BlobReferences()

    def _path(self, step: int) -> str:
        return self._store.join(step_dirname(step))

    def claim(self, step: int) -> None:
        """Before a save: refresh the lock, remove leftovers, finish a rollback, check ``step`` is free.

        Raises:
            StepExistsError: ``step`` is committed (and not known damaged).
            CheckpointWriteError: the storage failed.
        """
        self._lock.acquire()  # no-op once held (refreshes an object-store lock)
        for leftover in self._store.remove_leftovers():  # interrupted saves or deletions
            logger.info("removed leftover of an interrupted save or deletion: %s", leftover)
        self.abandon_newer()  # never commit a step of the new branch next to the old one
        if step not in self.corrupt and self._store.exists(step_dirname(step)):
            raise StepExistsError(f"{self._path(step)} already exists; save under a new step or delete it first")

    def before_save(self, step: int) -> None:
        """Before ``step`` is written (rank 0): :meth:`claim` it, and set a damaged ``step`` aside.

        Raises:
            StepExistsError: ``step`` is committed (and not known damaged).
            CheckpointWriteError: the storage failed.
        """
        self.claim(step)
        self.move_aside_if_corrupt(step)

    def after_save(self, step: int) -> None:
        """After ``step`` is committed (rank 0): apply retention; a failure is logged, not raised
        (the new checkpoint is committed: the save did not fail)."""
        try:
            self.apply_retention(step)
        except CheckpointError as exc:
            logger.warning("step %d is saved, but removing older checkpoints failed: %s", step, exc)

    def rolled_back(self, step: int) -> None:
        """``step`` was restored: set every newer committed step aside (now, or before the next save)."""
        if not any(s > step for s in self._store.list_committed()):
            return
        self._rollback = step
        try:
            self.abandon_newer()
        except CheckpointError as exc:  # the state is restored: the next save retries before committing
            logger.warning(
                "rolled back to step %d, but setting the newer steps aside failed (%s); the next save retries "
                "before it commits",
                step,
                exc,
            )

    def abandon_newer(self) -> None:
        """After a rollback, set every committed step newer than the one restored aside.

        Newest first, each move durable before the next: a crash in between leaves the older
        part of the abandoned branch committed, never a gap in it.

        Raises:
            CheckpointWriteError: a move failed; the rollback stays pending.
        """
        if self._rollback is None:
            return
        step = self._rollback
        for newer in sorted((s for s in self._store.list_committed() if s > step), reverse=True):
            aside = self._store.set_aside(step_dirname(newer), ABANDONED)
            self.corrupt.discard(newer)
            logger.warning("rolled back to step %d: step %d of the abandoned branch is kept as %s", step, newer, aside)
        self._rollback = None
        self._rolled_back_to, self._saves_since_rollback = step, 0

    def move_aside_if_corrupt(self, step: int) -> None:
        """A step found corrupt by ``restore`` is kept for inspection under another name."""
        path, name = self._path(step), step_dirname(step)
        if step in self.corrupt and self._store.exists(name):
            try:
                aside = self._store.set_aside_damaged(name)
            except OSError as exc:
                message = f"cannot move the damaged {path} aside to save step {step} again: {exc}"
                raise (CheckpointWriteError(exc.errno, message) if exc.errno else CheckpointWriteError(message)) from exc
            self.corrupt.discard(step)
            logger.warning("moved corrupt checkpoint %s aside to %s before saving step %d again", path, aside, step)

    def apply_retention(self, just_saved: int) -> None:
        """Delete the committed checkpoints the retention policy does not keep.

        Never deletes ``just_saved``, a damaged step, or the step rolled back to during the
        first ``keep_last`` saves after the rollback.
        """
        committed = {s: p for s, p in self._store.list_committed().items() if s not in self.corrupt}
        metrics: dict[int, Mapping[str, Any]] = {}
        if self.retention.needs_metrics:
            for s, p in committed.items():
                try:
                    with CheckpointReader(self._store.child(step_dirname(s))) as reader:
                        metrics[s] = reader.info().metrics
                except CheckpointError as exc:
                    logger.warning("retention: cannot read %s (%s); ranking it last", p, exc)
        protected = [just_saved]
        if self._rolled_back_to is not None:
            self._saves_since_rollback += 1
            if self.retention.keep_last is None or self._saves_since_rollback <= self.retention.keep_last:
                protected.append(self._rolled_back_to)
            else:
                self._rolled_back_to = None
        keep = self.retention.to_keep(list(committed), metrics, protected=protected)
        deleted = False
        for s in committed:
            if s not in keep:
                self._store.delete(step_dirname(s))
                deleted = True
        if deleted:  # only a deletion (or a killed save, collected with it) leaves blobs unreferenced
            for blob in collect_blobs(self._store, references=self._references):
                logger.info("removed blob no checkpoint refers to: %s", blob)

    def abandoned(self) -> list[tuple[int, str]]:
        """``(step, location)`` of every checkpoint set aside by a rollback, by step."""
        return [(step, self._store.join(name)) for step, name in self._store.list_aside(ABANDONED)]

    def clean(self, *, dry_run: bool, abandoned: bool) -> list[str]:
        """Remove leftovers (and, with ``abandoned``, abandoned branches); return what was removed."""
        self._lock.acquire()
        aside = [name for _, name in self._store.list_aside(ABANDONED)] if abandoned else []
        if dry_run:
            listed = self._store.list_leftovers() + [self._store.join(name) for name in aside]
            return listed + collect_blobs(self._store, dry_run=True, ignore=set(aside), references=self._references)
        removed = self._store.remove_leftovers()
        for name in aside:
            self._store.delete(name)
            removed.append(self._store.join(name))
        # after the manifests that referred to them are gone
        return removed + collect_blobs(self._store, references=self._references)
