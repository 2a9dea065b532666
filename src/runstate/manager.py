"""``CheckpointManager``: a run directory of step checkpoints.

Layout: ``<dir>/step-000000000100/`` per committed step, leftovers of interrupted saves or
deletions (hidden ``.tmp-*``/``.del-*`` locally, ``step-*`` prefixes without a manifest on
object stores), and ``.lock`` for the single writer, taken when a writing manager is
created so that a second writer fails at once, not at its first save. A read-only manager
(``read_only=True``) never takes the lock: an evaluation job lists and restores while training
writes, and a step that retention deletes between listing and reading is not damage (the
listing is read again). Rolling back (``restore(state, step=S)`` in a writer, with newer
steps committed) sets the newer steps aside as ``step-N.abandoned-<12 hex>``, so that the new
branch is the run. Where the bytes go is the business of :mod:`runstate.storage`: a local
directory or any fsspec URL (``s3://bucket/run``).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from types import TracebackType
from typing import Any

from runstate._impl.background import BackgroundSaver
from runstate._impl.checkpoint import (
    CheckpointInfo,
    PreparedState,
    prepare,
    validate_state,
    validate_step,
    write_checkpoint,
)
from runstate._impl.group import current_group, raise_together
from runstate._impl.housekeeping import RunHousekeeping
from runstate._impl.parallel import save_together
from runstate._impl.reader import CheckpointReader
from runstate._impl.restore import RestoreReport
from runstate._impl.run_restore import RunRestorer
from runstate._impl.signals import subscribe, unsubscribe
from runstate._impl.snapshot import SnapshotPool
from runstate.adapters import prepare_loaders
from runstate.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointWriteError,
    CorruptCheckpointError,
    LockError,
)
from runstate.policies import Retention, SaveCadence
from runstate.storage import Staging, Store, open_store, step_dirname
from runstate.verify import verify_reader

__all__ = ["EXIT_PREEMPTED", "CheckpointManager"]

logger = logging.getLogger("runstate")

#: The exit status of a job that stopped after its preemption save (``EX_TEMPFAIL``, "try
#: again"): ``runstate run`` restarts such a job at once, without counting it as a failure.
EXIT_PREEMPTED = 75


class CheckpointManager:
    """Saves, retains and restores the checkpoints of one training run.

    Attributes:
        EXIT_PREEMPTED: 75, the exit status :attr:`exit_code` gives after a preemption save.

    Args:
        directory: the run directory; a writing manager creates it (with its ``.lock``). A URL such as
            ``s3://bucket/runs/exp`` or ``memory://exp`` stores the run through fsspec with the
            object-store protocol (``manifest.json`` last as the commit marker, an advisory
            ``.lock`` object: one writer per run is then your responsibility).
        keep_last: keep the N newest checkpoints (None keeps all).
        keep_every: also keep every checkpoint whose step is divisible by this.
        keep_best: also keep the M best checkpoints by ``metrics[best_metric]``.
        best_metric: the metric ranking checkpoints for ``keep_best``.
        best_mode: ``"min"`` (lower is better) or ``"max"``.
        save_every_steps: ``save`` writes only at steps divisible by this...
        save_every_seconds: ...or when this many seconds passed since the last save.
        save_on_signals: signals (e.g. ``signal.SIGTERM`` sent by a scheduler before
            preemption) after which the next ``save`` writes regardless of the cadence and
            sets :attr:`preempted`. The handler only sets a flag (no I/O in a signal
            handler). Several managers may listen to the same signal: each is told (one
            process-wide handler), and the handler that was there before the first is put
            back when the last one closes, in any order. Must be created in the main thread
            when signals are given.
        async_save: ``save`` copies the state's tensors into reused host buffers (a
            point-in-time snapshot) and returns; a background thread writes and commits it.
            At most one save is in flight: the next ``save`` waits for it. A background
            failure is raised by the next ``save``, :meth:`wait` or :meth:`close`; a process
            that exits without them waits for the save at exit, and if it failed, logs the
            error and exits with status 1.
        storage_options: fsspec options for a URL (credentials, ``client_kwargs``,
            ``default_block_size`` for the upload part size...).
        group: the processes that save together: None uses the default
            ``torch.distributed`` process group when one is initialized (create the
            manager after ``init_process_group``), else this process alone. Every process
            then calls ``save`` and ``restore`` alike; see :mod:`runstate.distributed`
            for which process writes what.
        read_only: a reader for evaluation jobs: ``restore``, ``steps``, ``latest_step`` and
            ``info`` work, nothing is ever written or moved, and no lock is taken; ``save``
            and ``clean`` raise. A writing manager (the default) takes the run's writer lock
            when it is created: ``LockError`` then, not at the first save, when another live
            process writes the run.
        require_exact: refuse (``UnsupportedTypeError`` at ``save``) a state holding a data
            loader that cannot resume exactly (``torch.utils.data.DataLoader``, an iterator),
            instead of logging one WARNING at the first save.

    Raises:
        LockError: (a writer) another live manager writes to this directory.

    Example:
        >>> with runstate.CheckpointManager("runs/exp", save_every_steps=100,  # doctest: +SKIP
        ...                                 save_on_signals=(signal.SIGTERM,)) as mgr:
        ...     start = mgr.restore(state) or 0
        ...     for step in range(start, total):
        ...         train_step()
        ...         mgr.save(step + 1, state)
        ...         if mgr.preempted:
        ...             break
        >>> sys.exit(mgr.exit_code)  # doctest: +SKIP
    """

    EXIT_PREEMPTED = EXIT_PREEMPTED

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = 3,
        keep_every: int | None = None,
        keep_best: int | None = None,
        best_metric: str | None = None,
        best_mode: str = "min",
        save_every_steps: int | None = None,
        save_every_seconds: float | None = None,
        save_on_signals: Sequence[int] = (),
        async_save: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        group: Any = None,
        read_only: bool = False,
        require_exact: bool = False,
    ) -> None:
        self._store: Store = open_store(directory, storage_options=storage_options)
        self.directory = self._store.location
        self.read_only = bool(read_only)
        self.require_exact = bool(require_exact)
        self._group = current_group(group)
        if self.read_only and (async_save or save_on_signals):
            raise CheckpointError(
                "read_only=True cannot be combined with async_save or save_on_signals: a read-only manager never "
                "saves; drop those options, or create a writing manager"
            )
        if self._group.distributed and async_save:
            raise CheckpointError(
                "async_save=True is not supported under torch.distributed yet: every process would write "
                "from a background thread while training runs collectives; use async_save=False"
            )
        if self._store.is_local and os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointWriteError(20, f"{self.directory} is a file; a CheckpointManager needs a directory")
        self.retention = Retention(keep_last, keep_every, keep_best, best_metric, best_mode)
        self.cadence = SaveCadence(save_every_steps, save_every_seconds)
        signums = tuple(save_on_signals)
        if signums and threading.current_thread() is not threading.main_thread():
            raise CheckpointError(
                f"save_on_signals={signums!r}: signal handlers can only be installed from the main thread; "
                "create the CheckpointManager there, or leave save_on_signals empty"
            )
        self._lock = self._store.lock()
        self._last_save = time.monotonic()
        self._closed = False
        self._upkeep = RunHousekeeping(self._store, self.retention, self._lock)
        self._restorer = RunRestorer(self._store, self._group)
        self._signal: int | None = None
        self.last_restore_report: RestoreReport | None = None
        self.last_blocking_seconds = 0.0
        self._pool = SnapshotPool()
        self._preempted = False
        self._signums: tuple[int, ...] = ()
        self._saver: BackgroundSaver | None = None
        if not self.read_only:
            self._take_lock()
        # A writer dropped without close() (``CheckpointManager(d).steps()``) frees its lock.
        weakref.finalize(self, self._lock.release)
        if async_save:
            self._saver = BackgroundSaver()
        for signum in signums:
            subscribe(signum, id(self), self._on_signal)
        self._signums = signums

    def _take_lock(self) -> None:
        """Take the writer lock (rank 0 under torch.distributed); every process fails alike."""
        error: CheckpointError | None = None
        if self._group.rank == 0:
            try:
                self._lock.acquire()
            except CheckpointError as exc:
                error = exc
        raise_together(
            self._group,
            error,
            lambda: LockError(
                errno.EWOULDBLOCK,
                f"{self.directory}: rank 0 could not take the writer lock (see its error); nothing was written",
            ),
        )

    def _on_signal(self, signum: int) -> None:
        self._signal = signum  # only a flag: the next save() does the I/O

    @property
    def preempted(self) -> bool:
        """True once a checkpoint was written after one of ``save_on_signals`` arrived."""
        return self._preempted

    @property
    def exit_code(self) -> int:
        """The status to exit with: :data:`EXIT_PREEMPTED` (75) once :attr:`preempted`, else 0.

        ``runstate run`` restarts a job that exits with 75, so a loop that stops on
        ``mgr.preempted`` ends with ``sys.exit(mgr.exit_code)`` and is resumed, never
        mistaken for a finished run.
        """
        return EXIT_PREEMPTED if self._preempted else 0

    @property
    def signal_received(self) -> int | None:
        """The number of the last ``save_on_signals`` signal received, if any."""
        return self._signal

    def __repr__(self) -> str:
        return f"CheckpointManager({self.directory!r})"

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Finish the save in flight, release the writer lock and restore previous signal
        handlers. Idempotent.

        Raises:
            AsyncSaveError: the last background save failed (everything is released anyway).
        """
        try:
            self.wait()
        finally:
            if self._saver is not None:
                self._saver.shutdown()
            self._lock.release()
            for signum in self._signums:
                unsubscribe(signum, id(self))
            self._signums = ()
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"{self!r} is closed; create a new CheckpointManager")

    def _check_writable(self, what: str) -> None:
        self._check_open()
        if self.read_only:
            raise CheckpointError(
                f"{self!r} is read-only (read_only=True) and cannot {what}; only the one process that writes "
                "this run creates its CheckpointManager without read_only"
            )

    def path(self, step: int) -> str:
        """The directory of ``step``'s checkpoint (whether or not it exists)."""
        return self._store.join(step_dirname(validate_step(step)))

    def leftovers(self) -> list[str]:
        """Remains of interrupted saves or deletions (``.tmp-*``, ``.del-*``; on object stores
        ``step-*`` prefixes without ``manifest.json``): never committed."""
        return self._store.list_leftovers()

    def abandoned(self) -> list[tuple[int, str]]:
        """``(step, location)`` of the checkpoints of branches abandoned by a rollback, by step.

        They are kept for inspection as ``step-N.abandoned-<12 hex>`` (never read, never
        deleted by retention); ``clean(abandoned=True)`` or ``runstate gc --abandoned`` removes them.
        """
        return self._upkeep.abandoned()

    def clean(self, *, dry_run: bool = False, abandoned: bool = False) -> list[str]:
        """Remove the leftovers of interrupted saves; committed checkpoints are never touched.

        Waits for the save in flight first (``async_save``), so it never removes the
        temporary directory of a save in progress; another process's saves are excluded by
        the writer lock.

        Args:
            dry_run: only list what would be removed.
            abandoned: also remove the checkpoints set aside by a rollback (:meth:`abandoned`).

        Returns:
            The paths removed (or that would be removed).

        Raises:
            AsyncSaveError: the save in flight failed (nothing was removed).
            CheckpointError: the manager is read-only.
        """
        self._check_writable("remove leftovers")
        self.wait()  # the temporary directory of the save in flight is not a leftover
        if self._store.is_local and not os.path.isdir(self.directory):
            return []
        return self._upkeep.clean(dry_run=dry_run, abandoned=abandoned)

    def steps(self) -> list[int]:
        """Committed steps, oldest first."""
        return list(self._restorer.list_committed())

    def latest_step(self, *, verified: bool = False) -> int | None:
        """The newest committed step, or None when there is none.

        Args:
            verified: by default only names are listed (a committed step has its
                ``step-N`` name and, on object stores, its ``manifest.json``): a damaged step
                still counts. With True, every byte of the newest steps is checked
                (:func:`runstate.verify`, reading them whole) and the newest step that passes
                is returned.
        """
        steps = self.steps()
        if not verified:
            return steps[-1] if steps else None
        tried: set[int] = set()
        while True:  # listed again whenever the writer's retention deleted a step while it was checked
            for step in reversed([s for s in steps if s not in tried]):
                tried.add(step)
                try:
                    intact = verify_reader(CheckpointReader(self._store.child(step_dirname(step)))).ok
                except CheckpointReadError:  # the machine, not the checkpoint (open-file limit, memory...)
                    if step in self.steps():
                        raise
                    intact = False
                except CheckpointError:
                    intact = False
                if intact:
                    return step
                if step not in self.steps():  # deleted meanwhile by the writer: not damage, list again
                    break
                logger.warning("latest_step(verified=True): step %d fails verification; trying older ones", step)
            else:
                return None
            steps = self.steps()

    def info(self, step: int) -> CheckpointInfo:
        """The :class:`CheckpointInfo` of a committed step.

        Raises:
            CheckpointNotFoundError: ``step`` is not committed.
        """
        with CheckpointReader(self._existing(step)) as reader:
            return reader.info()

    def _existing(self, step: int) -> Store:
        step = validate_step(step)
        committed = self._store.list_committed()
        if step not in committed:
            listed = ", ".join(map(str, committed)) or "none"
            raise CheckpointNotFoundError(f"no checkpoint for step {step} in {self.directory} (steps: {listed})")
        return self._store.child(step_dirname(step))

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
        verify: bool = False,
    ) -> bool:
        """Save ``state`` as step ``step`` if the cadence says so (or ``force``).

        Args:
            step: the training step (a non-negative int).
            state: the named items to save (see :func:`runstate.save`).
            metrics: numbers recorded with the checkpoint (used by ``keep_best``).
            force: write even when the cadence says the step is not due.
            verify: read every byte back from disk (page cache dropped) and check it before
                committing. Costs one extra read of the checkpoint; off by default.

        Returns:
            True when a checkpoint was written and committed.

        Raises:
            StepExistsError: ``step`` is already committed.
            LockError: (object stores) another writer took the advisory lock over meanwhile.
            UnsupportedTypeError: a value cannot be stored (nothing is written).
            CheckpointWriteError: the disk failed; older checkpoints are intact.
            CheckpointError: the manager is read-only.
        """
        self._check_writable("save")
        step = validate_step(step)
        validate_state(state, f"{self!r}.save(step={step})")
        prepare_loaders(state, saving=True, require_exact=self.require_exact)
        now = time.monotonic()
        signalled = self._signal is not None and not self._preempted
        due = force or signalled or self.cadence.should_save(step, now - self._last_save)
        if self._group.distributed and (self.cadence.every_seconds is not None or self._signums):
            # Clocks and signals differ between processes: save when any process wants to.
            due = bool(self._group.all_max(int(due)))
            signalled = bool(self._group.all_max(int(signalled)))
        if not due:
            return False
        if self._group.distributed:
            self._save_together(step, state, metrics, verify)
            self._last_save = now
        else:
            self.wait()  # at most one save in flight; re-raises a failed background save
            prepared = prepare(state, metrics)
            self._upkeep.claim(step)
            self._last_save = now
            if self._saver is not None:
                started = time.monotonic()
                self._pool.snapshot(prepared)  # the only part that blocks training
                self.last_blocking_seconds = time.monotonic() - started
                self._saver.submit(step, self.path(step), functools.partial(self._write, step, prepared, verify))
            else:
                self._write(step, prepared, verify)
        if signalled:
            self._preempted = True
            logger.warning("saved step %d after signal %s; mgr.preempted is now True", step, self._signal)
        return True

    def _save_together(self, step: int, state: Mapping[str, Any], metrics: Mapping[str, Any] | None, verify: bool) -> None:
        """Save from every process of the group (rank 0 commits; see :mod:`runstate._impl.parallel`)."""

        def start() -> None:  # on rank 0 only
            self._upkeep.claim(step)
            self._upkeep.move_aside_if_corrupt(step)

        started = time.monotonic()
        def check(staging: Staging, manifest: bytes) -> None:  # rank 0, every process's files durable
            self._read_back(staging, step)(manifest)

        save_together(
            self._group,
            self._store,
            step_dirname(step),
            state,
            step=step,
            metrics=metrics,
            before_start=start,
            before_commit=check if verify else None,
        )
        if self._group.rank == 0:
            logger.info(
                "saved step %d from %d processes in %.2f s", step, self._group.size, time.monotonic() - started
            )
            try:
                self._upkeep.apply_retention(step)
            except CheckpointError as exc:
                logger.warning("step %d is saved, but removing older checkpoints failed: %s", step, exc)

    def _write(self, step: int, prepared: PreparedState, verify: bool) -> None:
        started = time.monotonic()
        self._upkeep.move_aside_if_corrupt(step)
        with self._store.begin(step_dirname(step)) as staging:
            check = self._read_back(staging, step) if verify else None
            info = write_checkpoint(staging, prepared, step=step, before_commit=check)
        seconds = time.monotonic() - started
        logger.info(
            "saved step %d: %.1f MB in %.2f s (%.2f GB/s)%s",
            step,
            info.nbytes / 1e6,
            seconds,
            info.nbytes / 1e9 / max(seconds, 1e-9),
            " in the background" if self._saver is not None else "",
        )
        try:
            self._upkeep.apply_retention(step)
        except CheckpointError as exc:  # the new checkpoint is committed: do not fail the save
            logger.warning("step %d is saved, but removing older checkpoints failed: %s", step, exc)

    def _read_back(self, staging: Staging, step: int) -> Callable[[bytes], None]:
        def check(manifest: bytes) -> None:
            directory = staging.local_dir()
            if directory is not None:
                _drop_page_cache(directory)
            report = verify_reader(CheckpointReader(staging.reader(), manifest=manifest))
            if not report.ok:
                raise CorruptCheckpointError(
                    f"{self.path(step)}: read-back verification failed, nothing was committed: "
                    + "; ".join(map(str, report.problems))
                )

        return check

    def wait(self) -> None:
        """Block until the save in flight (``async_save=True``) is committed.

        Raises:
            AsyncSaveError: the background save failed; its exception is the ``__cause__``.
        """
        if self._saver is not None:
            self._saver.wait()

    def restore(
        self,
        state: MutableMapping[str, Any],
        *,
        step: int | None = None,
        strict: bool = True,
        fallback: bool = True,
        rename: Mapping[str, Sequence[tuple[str, str]]] | None = None,
        exclude: Sequence[str] | None = None,
    ) -> int | None:
        r"""Restore ``state`` from the newest checkpoint (or ``step``).

        Restoring an older ``step`` in a writing manager is a **rollback**: once it
        succeeded, every newer committed step is set aside as ``step-N.abandoned-<12 hex>``
        (kept, listed by :meth:`abandoned` and ``runstate ls``, removed only by
        ``clean(abandoned=True)`` / ``runstate gc --abandoned``), so that a restart resumes the
        new branch, its step numbers can be saved again, and retention keeps ``step`` through
        the first ``keep_last`` saves after it. A read-only manager never moves anything.

        Args:
            state: the live state; restored in place (see :func:`runstate.load`).
            step: restore this step instead of the newest.
            strict: require the state to match the checkpoint exactly.
            fallback: when the newest checkpoint is damaged, log a WARNING naming it and
                restore the newest one that is intact instead. Damaged checkpoints are never
                deleted: retention skips them, and they stay for inspection.
            rename: per item, regex substitutions applied to the stored keys before matching,
                e.g. ``{"model": [(r"^module\.", "")]}`` for a checkpoint written under DDP.
            exclude: item names or glob patterns to leave alone (run metadata such as a
                ``config`` the resumed run sets itself; see :func:`runstate.load`).

        After a restore, :attr:`last_restore_report` tells what did not match (with
        ``strict=False``: missing, unexpected and shape-mismatched keys per item, and
        optimizer parameters matched by name, new or dropped).

        Returns:
            The restored step, or None when the directory holds no checkpoint (state unchanged).

        Raises:
            CheckpointNotFoundError: ``step`` was given and is not committed.
            CorruptCheckpointError: the checkpoint is damaged (and ``fallback`` is False, or
                ``step`` was given, or no checkpoint is intact).
            StateMismatchError: ``strict`` and the state does not match the checkpoint.
        """
        validate_state(state, f"{self!r}.restore()")
        prepare_loaders(state, saving=False)
        self.wait()
        if step is not None:
            try:
                report = self._restorer.restore_from(self._existing(step), state, strict, rename, exclude)
            except CorruptCheckpointError as exc:
                if step in self._store.list_committed():
                    raise
                raise CheckpointNotFoundError(  # the writer's retention deleted it under us: not damage
                    f"step {step} of {self.directory} was deleted (by the writer's retention) while it was being "
                    f"read; nothing was restored: restore a newer step (steps: {self.steps()})"
                ) from exc
            self.last_restore_report = report
            if not self.read_only and self._group.rank == 0:
                self._upkeep.rolled_back(step)
            return step
        found = self._restorer.restore_newest(
            state, strict=strict, fallback=fallback, rename=rename, exclude=exclude, damaged=self._upkeep.corrupt
        )
        if found is None:
            return None
        restored, self.last_restore_report = found
        return restored


def _drop_page_cache(directory: str) -> None:
    """Ask the kernel to forget cached pages of the files, so a read-back hits the disk."""
    for name in os.listdir(directory):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
