"""``CheckpointManager``: a run directory of step checkpoints, behind one small facade.

Layout: ``<dir>/step-000000000100/`` per committed step, leftovers of interrupted saves or
deletions, and ``.lock`` for the single writer, taken when a writing manager is created so
that a second writer fails at once, not at its first save. A read-only manager
(``read_only=True``) never takes the lock: an evaluation job lists and restores while training
writes. Rolling back (``restore(state, step=S)`` in a writer, with newer steps committed) sets
the newer steps aside, so that the new branch is the run. Where the bytes go is the business
of :mod:`runstate.storage`: a local directory or any fsspec URL (``s3://bucket/run``).

The manager only composes parts that each keep one concern, and adds none of its own but
the order of the calls:

* :class:`~runstate._impl.run_dir.RunDirectory`: the store, the writer lock, listing steps,
  ``info``, ``latest_step``;
* a saver from :func:`~runstate._impl.savers.make_saver`: how a checkpoint is written (in
  this thread, in the background with ``async_save=True``, or by every process of a
  ``torch.distributed`` group); ``async_save`` only picks the saver;
* :class:`~runstate.policies.SaveCadence` (whether ``save`` writes at a step) and
  :class:`~runstate.policies.Retention` (which checkpoints survive), applied by
  :class:`~runstate._impl.housekeeping.RunHousekeeping` with leftovers, damaged steps and
  rollbacks;
* :class:`~runstate._impl.preemption.PreemptionWatcher`: ``save_on_signals``;
* :class:`~runstate._impl.run_restore.RunRestorer`: restoring the newest intact step next to
  a live writer, with the result as a :class:`~runstate.RestoreResult`.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Mapping, MutableMapping, Sequence
from types import TracebackType
from typing import Any

from runstate._impl.group import current_group
from runstate._impl.housekeeping import RunHousekeeping
from runstate._impl.incremental import Incremental
from runstate._impl.pipeline import CheckpointInfo, validate_state
from runstate._impl.preemption import EXIT_PREEMPTED, PreemptionWatcher, signal_numbers
from runstate._impl.restore_report import RestoreReport
from runstate._impl.restore_result import RestoreResult
from runstate._impl.run_dir import RunDirectory, as_step
from runstate._impl.run_restore import RestoreOptions, RunRestorer
from runstate._impl.savers import make_saver
from runstate.adapters import prepare_loaders
from runstate.errors import CheckpointConfigError, CheckpointError
from runstate.format.compress import Compression, resolve_compression
from runstate.policies import Retention, SaveCadence

__all__ = ["EXIT_PREEMPTED", "CheckpointManager"]


class _Default(enum.Enum):
    """Marks a keyword argument left out, so that giving it next to its policy object is refused."""

    UNSET = "default"

    def __repr__(self) -> str:
        return "<default>"


_UNSET = _Default.UNSET


def _policy(kind: type[Any], given: Any, **keywords: Any) -> Any:
    """``given`` (a ``kind`` instance) or a ``kind`` built from the keyword arguments given.

    Args:
        kind: :class:`Retention` or :class:`SaveCadence`.
        given: the ``retention=`` / ``cadence=`` argument.
        keywords: the manager's keyword arguments for the same concern (``save_every_steps``
            sets the field ``every_steps``), :data:`_UNSET` when left out.

    Raises:
        CheckpointConfigError: ``given`` is not a ``kind``, both were given, or a value is bad.
    """
    chosen = {name: value for name, value in keywords.items() if value is not _UNSET}
    option = "retention" if kind is Retention else "cadence"
    if given is None:
        return kind(**{name.removeprefix("save_"): value for name, value in chosen.items()})
    if not isinstance(given, kind):
        raise CheckpointConfigError(f"{option} must be a runstate.{kind.__name__}, got {given!r}")
    if chosen:
        raise CheckpointConfigError(
            f"{option}={given!r} and {', '.join(chosen)} both set the {option}: give the {kind.__name__} "
            "object or the keyword arguments, not both"
        )
    return given


class CheckpointManager:
    """Saves, retains and restores the checkpoints of one training run.

    Attributes:
        EXIT_PREEMPTED: 75, the exit status :attr:`exit_code` gives after a preemption save.
        directory: the run's location (an absolute path, or the URL).
        retention: the :class:`~runstate.Retention` policy in use.
        cadence: the :class:`~runstate.SaveCadence` in use.
        last_restore_report: the report of the last :meth:`restore` (the same object as
            its result's ``.report``), or None before any.

    Args:
        directory: the run directory; a writing manager creates it (with its ``.lock``). A URL such as
            ``s3://bucket/runs/exp`` or ``memory://exp`` stores the run through fsspec with the
            object-store protocol (``manifest.json`` last as the commit marker, an advisory
            ``.lock`` object: one writer per run is then your responsibility).
        keep_last: keep the N newest checkpoints (None keeps all; 3 when neither it nor
            ``retention`` is given).
        keep_every: also keep every checkpoint whose step is divisible by this.
        keep_best: also keep the M best checkpoints by ``metrics[best_metric]``.
        best_metric: the metric ranking checkpoints for ``keep_best``.
        best_mode: ``"min"`` (lower is better) or ``"max"``.
        save_every_steps: ``save`` writes only at steps divisible by this...
        save_every_seconds: ...or when this many seconds passed since the last save.
        retention: the retention policy as one object, instead of ``keep_last``,
            ``keep_every``, ``keep_best``, ``best_metric`` and ``best_mode`` (giving both
            raises :class:`CheckpointConfigError`).
        cadence: the save cadence as one object, instead of ``save_every_steps`` and
            ``save_every_seconds`` (giving both raises :class:`CheckpointConfigError`).
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
            error and exits with status 1. :meth:`warmup` allocates the host buffers ahead.
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
        compression: ``"zstd"`` (or a :class:`runstate.Compression`) to compress the tensor
            files losslessly (``pip install runstate[zstd]``); None (the default) writes
            them as they are. Reading needs no option: a compressed checkpoint says so.
        incremental: write only the tensors that changed since the last checkpoint this
            manager saved or restored; the others are referred to (tensor files live in the
            run's ``blobs/`` folder, removed once no checkpoint refers to them; see
            docs/format.md section 15). ``True`` (or ``"hash"``) hashes every tensor that
            has a candidate and compares. ``"versions"`` also skips reading a frozen
            parameter (``requires_grad=False``) whose storage and version counter did not
            change: faster, but only for code that never writes frozen tensors through
            ``.data``, NumPy or DLPack (which move no version counter; PEFT's
            ``merge_adapter`` does). Single process only. Combines with ``compression``:
            tensors are compared by their decoded bytes, new blobs are compressed.
            ``runstate copy`` makes one checkpoint standalone.

    Raises:
        CheckpointConfigError: an option is invalid (``keep_last=0``, ``best_mode="x"``,
            ``read_only`` with ``async_save``...); nothing was read or written.
        LockError: (a writer) another live manager writes to this directory.

    Example:
        >>> with runstate.CheckpointManager("runs/exp", save_every_steps=100,  # doctest: +SKIP
        ...                                 save_on_signals=(signal.SIGTERM,)) as mgr:
        ...     start = mgr.restore(state) or 0  # a RestoreResult (the step), or None
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
        keep_last: int | _Default | None = _UNSET,
        keep_every: int | _Default | None = _UNSET,
        keep_best: int | _Default | None = _UNSET,
        best_metric: str | _Default | None = _UNSET,
        best_mode: str | _Default = _UNSET,
        save_every_steps: int | _Default | None = _UNSET,
        save_every_seconds: float | _Default | None = _UNSET,
        save_on_signals: Sequence[int] = (),
        async_save: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        group: Any = None,
        read_only: bool = False,
        require_exact: bool = False,
        retention: Retention | None = None,
        cadence: SaveCadence | None = None,
        compression: str | Compression | None = None,
        incremental: bool | str = False,
    ) -> None:
        self.compression: Compression | None = resolve_compression(compression)
        self.retention: Retention = _policy(
            Retention,
            retention,
            keep_last=keep_last,
            keep_every=keep_every,
            keep_best=keep_best,
            best_metric=best_metric,
            best_mode=best_mode,
        )
        self.cadence: SaveCadence = _policy(
            SaveCadence, cadence, save_every_steps=save_every_steps, save_every_seconds=save_every_seconds
        )
        self.read_only = bool(read_only)
        self.require_exact = bool(require_exact)
        if self.read_only and (async_save or save_on_signals):
            raise CheckpointConfigError(
                "read_only=True cannot be combined with async_save or save_on_signals: a read-only manager never "
                "saves; drop those options, or create a writing manager"
            )
        signums = signal_numbers(save_on_signals)
        self._group = current_group(group)
        if incremental not in (False, True, "hash", "versions"):
            raise CheckpointConfigError(
                f'incremental must be False, True, "hash" or "versions", got {incremental!r}'
            )
        if incremental and self._group.distributed:
            raise CheckpointConfigError(
                "incremental=True is not supported under torch.distributed yet (each process would need its "
                "own dedup state); use incremental=False"
            )
        self._run = RunDirectory(directory, storage_options, self._group, read_only=self.read_only)
        self._incremental = Incremental(self._run.store, trust_versions=incremental == "versions") if incremental else None
        self.directory = self._run.location
        self._saver = make_saver(self._run.store, self._group, async_save=bool(async_save))
        try:
            self._run.take_lock()
            references = self._incremental.references if self._incremental is not None else None
            self._upkeep = RunHousekeeping(self._run.store, self.retention, self._run.lock, references=references)
            self._restorer = RunRestorer(self._run)
            self._preemption = PreemptionWatcher(signums)
        except BaseException:  # nothing half-made stays behind: no thread, exit hook or lock
            try:
                self._saver.close()
            finally:
                self._run.lock.release()
            raise
        self.last_restore_report: RestoreReport | None = None
        self._last_save = time.monotonic()
        self._closed = False

    @property
    def preempted(self) -> bool:
        """True once a checkpoint was written after one of ``save_on_signals`` arrived."""
        return self._preemption.preempted

    @property
    def exit_code(self) -> int:
        """The status to exit with: :data:`EXIT_PREEMPTED` (75) once :attr:`preempted`, else 0.

        ``runstate run`` restarts a job that exits with 75, so a loop that stops on
        ``mgr.preempted`` ends with ``sys.exit(mgr.exit_code)`` and is resumed, never
        mistaken for a finished run.
        """
        return self._preemption.exit_code

    @property
    def signal_received(self) -> int | None:
        """The number of the last ``save_on_signals`` signal received, if any."""
        return self._preemption.received

    @property
    def last_blocking_seconds(self) -> float:
        """How long the last ``save`` that wrote blocked training (``async_save``: the snapshot)."""
        return self._saver.last_blocking_seconds

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
            self._saver.close()
        finally:
            self._run.lock.release()
            self._preemption.close()
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
        return self._run.path(step)

    def leftovers(self) -> list[str]:
        """Remains of interrupted saves or deletions (``.tmp-*``, ``.del-*``; on object stores
        ``step-*`` prefixes without ``manifest.json``): never committed."""
        self._saver.settle()  # a deletion by retention in progress is not a leftover
        return self._run.store.list_leftovers()

    def abandoned(self) -> list[tuple[int, str]]:
        """``(step, location)`` of the checkpoints of branches abandoned by a rollback, by step.

        They are kept for inspection as ``step-N.abandoned-<12 hex>`` (never read, never
        deleted by retention); ``clean(abandoned=True)`` or ``runstate gc --abandoned`` removes them.
        """
        self._saver.settle()
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
        if not self._run.exists():
            return []
        return self._upkeep.clean(dry_run=dry_run, abandoned=abandoned)

    def steps(self) -> list[int]:
        """Committed steps, oldest first (retention of the last save applied)."""
        self._saver.settle()
        return self._run.steps()

    def latest_step(self, *, verified: bool = False) -> int | None:
        """The newest committed step, or None when there is none.

        Args:
            verified: by default only names are listed (a committed step has its
                ``step-N`` name and, on object stores, its ``manifest.json``): a damaged step
                still counts. With True, every byte of the newest steps is checked
                (:func:`runstate.verify`, reading them whole) and the newest step that passes
                is returned.
        """
        self._saver.settle()
        return self._run.latest_step(verified=verified)

    def info(self, step: int) -> CheckpointInfo:
        """The :class:`CheckpointInfo` of a committed step.

        Raises:
            CheckpointNotFoundError: ``step`` is not committed.
        """
        self._saver.settle()
        return self._run.info(step)

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
        step = as_step(step)
        validate_state(state, f"{self!r}.save(step={step})")
        prepare_loaders(state, saving=True, require_exact=self.require_exact)
        now = time.monotonic()
        due, signalled = self._due(step, now, force)
        if not due:
            return False
        self._saver.save(
            step,
            state,
            metrics,
            verify=verify,
            before_start=lambda: self._upkeep.before_save(step),
            after_commit=lambda _info: self._upkeep.after_save(step),
            compression=self.compression,
            incremental=self._incremental,
        )
        self._last_save = now
        if signalled:
            self._preemption.saved(step)
        return True

    def warmup(self, state: Mapping[str, Any]) -> int:
        """Allocate the host buffers an ``async_save`` snapshot of ``state`` needs, now.

        The first async save otherwise allocates them while training waits, and fresh memory
        is slow to touch (on a VM, several times a copy into buffers that exist). Call it once
        before training, with the state you will save; later saves reuse the buffers (a
        tensor that changes size gets a new one at the save that meets it). Idempotent; waits
        for the save in flight first; nothing is written. A no-op for a manager without
        ``async_save``.

        Args:
            state: the named items you will pass to :meth:`save`.

        Returns:
            The bytes of buffers allocated by this call (0 when they already existed, or
            without ``async_save``).

        Raises:
            UnsupportedTypeError: a value cannot be stored (what ``save`` would raise).
            AsyncSaveError: the previous background save failed.
            CheckpointError: the manager is read-only or closed.

        Example:
            >>> mgr = runstate.CheckpointManager("runs/exp", async_save=True)  # doctest: +SKIP
            >>> mgr.warmup({"model": model, "optimizer": opt})  # doctest: +SKIP
        """
        self._check_writable("warmup")
        validate_state(state, f"{self!r}.warmup()")
        prepare_loaders(state, saving=True, require_exact=self.require_exact)
        return self._saver.warmup(state)

    def _due(self, step: int, now: float, force: bool) -> tuple[bool, bool]:
        """Whether ``save`` writes at ``step``, and whether because of a signal."""
        signalled = self._preemption.pending
        due = force or signalled or self.cadence.should_save(step, now - self._last_save)
        if self._group.distributed and (self.cadence.every_seconds is not None or self._preemption.watching):
            # Clocks and signals differ between processes: save when any process wants to.
            due = bool(self._group.all_max(int(due)))
            signalled = bool(self._group.all_max(int(signalled)))
        return due, signalled

    def wait(self) -> None:
        """Block until the save in flight (``async_save=True``) is committed, and the retention after
        the last save is done.

        Raises:
            AsyncSaveError: the background save failed; its exception is the ``__cause__``.
        """
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
    ) -> RestoreResult | None:
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

        Returns:
            A :class:`~runstate.RestoreResult`: the restored step (an int, so
            ``mgr.restore(state) or 0`` is the step to resume from) with ``.report``, what
            did not match (with ``strict=False``: missing, unexpected and shape-mismatched
            keys per item, optimizer parameters matched by name, new or dropped), also kept
            as :attr:`last_restore_report`, and ``.path``. None when the run holds no
            checkpoint (state unchanged).

        Raises:
            CheckpointNotFoundError: ``step`` was given and is not committed.
            CorruptCheckpointError: the checkpoint is damaged (and ``fallback`` is False, or
                ``step`` was given, or no checkpoint is intact).
            StateMismatchError: ``strict`` and the state does not match the checkpoint.
        """
        validate_state(state, f"{self!r}.restore()")
        prepare_loaders(state, saving=False)
        self.wait()
        options = RestoreOptions(strict, rename, exclude)
        if step is None:
            result = self._restorer.restore_newest(state, options, fallback=fallback, damaged=self._upkeep.corrupt)
        else:
            step = as_step(step)
            result = self._restorer.restore_step(step, state, options)
            if not self.read_only and self._group.rank == 0:
                self._upkeep.rolled_back(step)
        if result is not None:
            self.last_restore_report = result.report
            if self._incremental is not None:  # the next save refers to the restored tensors
                self._incremental.adopt_manifest(self._run.manifest(int(result)))
        return result
