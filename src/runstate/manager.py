"""``CheckpointManager``: a run directory of step checkpoints.

Layout: ``<dir>/step-000000000100/`` per committed step, leftovers of interrupted saves or
deletions (hidden ``.tmp-*``/``.del-*`` locally, ``step-*`` prefixes without a manifest on
object stores), and ``.lock`` for the single writer. Readers (``steps``, ``info``,
``restore``) never take the lock and only ever see committed steps, so an evaluation job
can read while training writes. Where the bytes go is the business of
:mod:`runstate.storage`: a local directory or any fsspec URL (``s3://bucket/run``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import FrameType, TracebackType
from typing import Any

from runstate.checkpoint import (
    CheckpointInfo,
    PreparedState,
    prepare,
    validate_state,
    validate_step,
    write_checkpoint,
)
from runstate.errors import (
    AsyncSaveError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    StepExistsError,
)
from runstate.format.manifest import MANIFEST_NAME
from runstate.group import current_group
from runstate.parallel import save_together
from runstate.policies import Retention, SaveCadence
from runstate.reader import CheckpointReader
from runstate.restore import RestoreReport, restore_state
from runstate.snapshot import SnapshotPool
from runstate.storage import Staging, Store, open_store, step_dirname
from runstate.verify import verify_reader

__all__ = ["CheckpointManager"]

logger = logging.getLogger("runstate")


class CheckpointManager:
    """Saves, retains and restores the checkpoints of one training run.

    Args:
        directory: the run directory; created on the first save. A URL such as
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
            handler); the previous handlers are restored by :meth:`close`. Must be created in
            the main thread when signals are given.
        async_save: ``save`` copies the state's tensors into reused host buffers (a
            point-in-time snapshot) and returns; a background thread writes and commits it.
            At most one save is in flight: the next ``save`` waits for it. A background
            failure is raised by the next ``save``, :meth:`wait` or :meth:`close`.
        storage_options: fsspec options for a URL (credentials, ``client_kwargs``,
            ``default_block_size`` for the upload part size...).
        group: the processes that save together: None uses the default
            ``torch.distributed`` process group when one is initialized (create the
            manager after ``init_process_group``), else this process alone. Every process
            then calls ``save`` and ``restore`` alike; see :mod:`runstate.distributed`
            for which process writes what.

    Example:
        >>> with runstate.CheckpointManager("runs/exp", save_every_steps=100) as mgr:  # doctest: +SKIP
        ...     start = mgr.restore(state) or 0
        ...     for step in range(start, total):
        ...         train_step()
        ...         mgr.save(step + 1, state)
    """

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
    ) -> None:
        self._store: Store = open_store(directory, storage_options=storage_options)
        self.directory = self._store.location
        self._group = current_group(group)
        if self._group.distributed and async_save:
            raise CheckpointError(
                "async_save=True is not supported under torch.distributed yet: every process would write "
                "from a background thread while training runs collectives; use async_save=False"
            )
        if self._store.is_local and os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointWriteError(20, f"{self.directory} is a file; a CheckpointManager needs a directory")
        self.retention = Retention(keep_last, keep_every, keep_best, best_metric, best_mode)
        self.cadence = SaveCadence(save_every_steps, save_every_seconds)
        self._lock = self._store.lock()
        self._last_save = time.monotonic()
        self._closed = False
        self._corrupt: set[int] = set()  # steps found damaged by restore(): never deleted or overwritten
        self._signal: int | None = None
        self.last_restore_report: RestoreReport | None = None
        self.last_blocking_seconds = 0.0
        self._pool = SnapshotPool()
        self._pending: tuple[int, Future[None]] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runstate-save") if async_save else None
        self._preempted = False
        self._previous_handlers: dict[int, Any] = {}
        if save_on_signals:
            self._install_handlers(tuple(save_on_signals))

    def _install_handlers(self, signums: tuple[int, ...]) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise CheckpointError(
                f"save_on_signals={signums!r}: signal handlers can only be installed from the main thread; "
                "create the CheckpointManager there, or leave save_on_signals empty"
            )
        for signum in signums:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signal = signum  # only a flag: the next save() does the I/O

    @property
    def preempted(self) -> bool:
        """True once a checkpoint was written after one of ``save_on_signals`` arrived."""
        return self._preempted

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
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            self._lock.release()
            while self._previous_handlers:
                signum, handler = self._previous_handlers.popitem()
                signal.signal(signum, handler)
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"{self!r} is closed; create a new CheckpointManager")

    def path(self, step: int) -> str:
        """The directory of ``step``'s checkpoint (whether or not it exists)."""
        return self._store.join(step_dirname(validate_step(step)))

    def leftovers(self) -> list[str]:
        """Remains of interrupted saves or deletions (``.tmp-*``, ``.del-*``; on object stores
        ``step-*`` prefixes without ``manifest.json``): never committed."""
        return self._store.list_leftovers()

    def clean(self, *, dry_run: bool = False) -> list[str]:
        """Remove the leftovers of interrupted saves; committed checkpoints are never touched.

        Takes the writer lock, so it never removes the temporary of a save in progress.

        Args:
            dry_run: only list what would be removed.

        Returns:
            The paths removed (or that would be removed).

        Raises:
            LockError: another live process is writing to this directory.
        """
        self._check_open()
        if self._store.is_local and not os.path.isdir(self.directory):
            return []
        self._lock.acquire()
        return self.leftovers() if dry_run else self._store.remove_leftovers()

    def steps(self) -> list[int]:
        """Committed steps, oldest first."""
        return list(self._store.list_committed())

    def latest_step(self) -> int | None:
        """The newest committed step, or None when there is none."""
        steps = self.steps()
        return steps[-1] if steps else None

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
            LockError: another live manager writes to this directory.
            UnsupportedTypeError: a value cannot be stored (nothing is written).
            CheckpointWriteError: the disk failed; older checkpoints are intact.
        """
        self._check_open()
        step = validate_step(step)
        validate_state(state, f"{self!r}.save(step={step})")
        now = time.monotonic()
        signalled = self._signal is not None and not self._preempted
        due = force or signalled or self.cadence.should_save(step, now - self._last_save)
        if self._group.distributed and (self.cadence.every_seconds is not None or self._previous_handlers):
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
            self._claim(step)
            self._last_save = now
            if self._executor is not None:
                started = time.monotonic()
                self._pool.snapshot(prepared)  # the only part that blocks training
                self.last_blocking_seconds = time.monotonic() - started
                self._pending = (step, self._executor.submit(self._write, step, prepared, verify))
            else:
                self._write(step, prepared, verify)
        if signalled:
            self._preempted = True
            logger.warning("saved step %d after signal %s; mgr.preempted is now True", step, self._signal)
        return True

    def _claim(self, step: int) -> None:
        """Take the writer lock, remove leftovers of interrupted saves, check ``step`` is free."""
        self._lock.acquire()  # no-op once held
        for leftover in self._store.remove_leftovers():  # interrupted saves or deletions
            logger.info("removed leftover of an interrupted save or deletion: %s", leftover)
        if step not in self._corrupt and self._store.exists(step_dirname(step)):
            raise StepExistsError(f"{self.path(step)} already exists; save under a new step or delete it first")

    def _save_together(self, step: int, state: Mapping[str, Any], metrics: Mapping[str, Any] | None, verify: bool) -> None:
        """Save from every process of the group (rank 0 commits; see :mod:`runstate.parallel`)."""

        def start() -> None:  # on rank 0 only
            self._claim(step)
            self._move_aside_if_corrupt(step)

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
                self._apply_retention(step)
            except CheckpointError as exc:
                logger.warning("step %d is saved, but removing older checkpoints failed: %s", step, exc)

    def _write(self, step: int, prepared: PreparedState, verify: bool) -> None:
        started = time.monotonic()
        self._move_aside_if_corrupt(step)
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
            " in the background" if self._executor is not None else "",
        )
        try:
            self._apply_retention(step)
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
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        try:
            future.result()
        except Exception as exc:
            raise AsyncSaveError(
                f"{self.path(step)}: the background save of step {step} failed, nothing was committed: {exc}",
                step=step,
            ) from exc

    def _move_aside_if_corrupt(self, step: int) -> None:
        """A step found corrupt by ``restore`` is kept for inspection under another name."""
        path, name = self.path(step), step_dirname(step)
        if step in self._corrupt and self._store.exists(name):
            try:
                aside = self._store.rename(name, f"{name}.corrupt-{int(time.time())}")
            except OSError as exc:
                raise CheckpointWriteError(
                    exc.errno or 0, f"cannot move the damaged {path} aside to save step {step} again: {exc}"
                ) from exc
            self._corrupt.discard(step)
            logger.warning("moved corrupt checkpoint %s aside to %s before saving step %d again", path, aside, step)

    def _apply_retention(self, just_saved: int) -> None:
        committed = {s: p for s, p in self._store.list_committed().items() if s not in self._corrupt}
        metrics: dict[int, Mapping[str, Any]] = {}
        if self.retention.needs_metrics:
            for s, p in committed.items():
                try:
                    with CheckpointReader(self._store.child(step_dirname(s))) as reader:
                        metrics[s] = reader.info().metrics
                except CheckpointError as exc:
                    logger.warning("retention: cannot read %s (%s); ranking it last", p, exc)
        keep = self.retention.to_keep(list(committed), metrics, protected=(just_saved,))
        for s in committed:
            if s not in keep:
                self._store.delete(step_dirname(s))

    def restore(
        self,
        state: MutableMapping[str, Any],
        *,
        step: int | None = None,
        strict: bool = True,
        fallback: bool = True,
        rename: Mapping[str, Sequence[tuple[str, str]]] | None = None,
    ) -> int | None:
        r"""Restore ``state`` from the newest checkpoint (or ``step``).

        Args:
            state: the live state; restored in place (see :func:`runstate.load`).
            step: restore this step instead of the newest.
            strict: require the state to match the checkpoint exactly.
            fallback: when the newest checkpoint is damaged, log a WARNING naming it and
                restore the newest one that is intact instead. Damaged checkpoints are never
                deleted: retention skips them, and they stay for inspection.
            rename: per item, regex substitutions applied to the stored keys before matching,
                e.g. ``{"model": [(r"^module\.", "")]}`` for a checkpoint written under DDP.

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
        self.wait()
        if step is not None:
            self._restore_from(self._existing(step), state, strict, rename)
            return step
        skipped: list[str] = []
        if self._group.distributed:  # rank 0 lists; every process tries the same steps, in the same order
            committed = self._store.list_committed() if self._group.rank == 0 else {}
            listed = self._group.broadcast_text(",".join(map(str, committed)))
            steps = [int(s) for s in listed.split(",") if s]
            committed = {s: self._store.join(step_dirname(s)) for s in steps}
        else:
            committed = self._store.list_committed()
        for candidate, path in reversed(committed.items()):
            try:
                self._restore_from(self._store.child(step_dirname(candidate)), state, strict, rename)
            except CorruptCheckpointError as exc:
                self._corrupt.add(candidate)
                if not fallback:
                    raise
                logger.warning("skipping damaged checkpoint %s: %s", path, exc)
                skipped.append(f"{path}: {exc}")
                continue
            if skipped:
                logger.warning("restored step %d after skipping %d damaged checkpoint(s)", candidate, len(skipped))
            return candidate
        if skipped:
            raise CorruptCheckpointError(
                f"{self.directory}: every checkpoint is damaged, nothing was restored:\n  " + "\n  ".join(skipped)
            )
        return None

    def _restore_from(
        self,
        store: Store,
        state: MutableMapping[str, Any],
        strict: bool,
        rename: Mapping[str, Sequence[tuple[str, str]]] | None,
    ) -> None:
        error: CheckpointError | None = None
        try:
            reader = CheckpointReader(store)
        except CheckpointNotFoundError as exc:  # a committed directory always has a manifest
            error = CorruptCheckpointError(f"{store.location}: {MANIFEST_NAME} is missing", file=MANIFEST_NAME)
            error.__cause__ = exc
        except CheckpointError as exc:
            error = exc
        if self._group.distributed and self._group.all_min(0 if error else 1) == 0 and error is None:
            reader.close()  # another process cannot read this manifest: all of them skip it alike
            error = CorruptCheckpointError(f"{store.location}: another process cannot read {MANIFEST_NAME}")
        if error is not None:
            raise error
        with reader:
            self.last_restore_report = restore_state(reader, state, strict=strict, rename=rename, group=self._group)


def _drop_page_cache(directory: str) -> None:
    """Ask the kernel to forget cached pages of the files, so a read-back hits the disk."""
    for name in os.listdir(directory):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
