"""Restoring a live state from the newest intact checkpoint of a run, next to a live writer.

A run is read while its writer may be saving and deleting (an evaluation job next to
training, ``keep_last=1``). Two different things can make a listed step unreadable, and they
must not be confused: the step is damaged (a flipped byte, a missing file: fall back to an
older step, and remember it so retention never deletes it), or the writer's retention
deleted it after it was listed (not damage: list the run again and take the newest committed
step). Invariant: a step is reported damaged only if it is still committed after the failure.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from runstate._impl.group import agree
from runstate._impl.reader import CheckpointReader
from runstate._impl.restore import restore_state
from runstate._impl.restore_report import RestoreReport
from runstate._impl.restore_result import RestoreResult
from runstate._impl.run_dir import RunDirectory
from runstate.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from runstate.format.manifest import MANIFEST_NAME
from runstate.storage import Store

__all__ = ["RestoreOptions", "RunRestorer"]

logger = logging.getLogger("runstate")

Renames = Mapping[str, Sequence[tuple[str, str]]]


@dataclass(frozen=True)
class RestoreOptions:
    """How to match a live state to a checkpoint (see ``CheckpointManager.restore``)."""

    strict: bool = True
    rename: Renames | None = None
    exclude: str | Iterable[str] | None = None


class RunRestorer:
    """Restores from the committed checkpoints of ``run``, with every process of its group."""

    def __init__(self, run: RunDirectory) -> None:
        self._run = run
        self._group = run.group

    def restore_from(self, store: Store, state: MutableMapping[str, Any], options: RestoreOptions) -> RestoreReport:
        """Restore ``state`` from the checkpoint at ``store`` (a missing manifest is damage).

        Every process opens the manifest; when one cannot, all of them skip it alike.
        """
        error: CheckpointError | None = None
        reader: CheckpointReader | None = None
        try:
            reader = CheckpointReader(store)
        except CheckpointNotFoundError as exc:  # a committed directory always has a manifest
            error = CorruptCheckpointError(f"{store.location}: {MANIFEST_NAME} is missing", file=MANIFEST_NAME)
            error.__cause__ = exc
        except CheckpointError as exc:
            error = exc
        try:
            agree(
                self._group,
                error,
                lambda: CorruptCheckpointError(f"{store.location}: another process cannot read {MANIFEST_NAME}"),
            )
        except CheckpointError:
            if reader is not None:
                reader.close()
            raise
        assert reader is not None  # agree() raised otherwise
        with reader:
            return restore_state(
                reader, state, strict=options.strict, rename=options.rename, group=self._group, exclude=options.exclude
            )

    def restore_step(self, step: int, state: MutableMapping[str, Any], options: RestoreOptions) -> RestoreResult:
        """Restore ``state`` from the committed ``step``.

        Raises:
            CheckpointNotFoundError: ``step`` is not committed, or the writer's retention
                deleted it while it was read (that is not damage).
            CorruptCheckpointError: ``step`` is damaged.
        """
        try:
            report = self.restore_from(self._run.existing(step), state, options)
        except CorruptCheckpointError as exc:
            if self._run.is_committed(step):
                raise
            raise CheckpointNotFoundError(  # the writer's retention deleted it under us: not damage
                f"step {step} of {self._run.location} was deleted (by the writer's retention) while it was being "
                f"read; nothing was restored: restore a newer step (steps: {self._run.steps()})"
            ) from exc
        return RestoreResult(step, report, self._run.path(step))

    def restore_newest(
        self, state: MutableMapping[str, Any], options: RestoreOptions, *, fallback: bool, damaged: set[int]
    ) -> RestoreResult | None:
        """Restore the newest intact step; None when the run holds no checkpoint.

        Args:
            damaged: steps found damaged are added to it.

        Raises:
            CorruptCheckpointError: the newest is damaged and not ``fallback``, or all are.
            StateMismatchError: ``strict`` and the state does not match.
        """
        skipped: list[str] = []
        tried: set[int] = set()
        while True:
            committed = {s: p for s, p in self._list().items() if s not in tried}
            vanished = False
            for candidate, path in reversed(committed.items()):
                tried.add(candidate)
                try:
                    report = self.restore_from(self._run.step_store(candidate), state, options)
                except CheckpointError as exc:
                    if self._vanished(candidate):  # a writer's retention deleted it after we listed: list again
                        logger.info("step %d was deleted while it was being read; listing the run again", candidate)
                        vanished = True
                        break
                    if not isinstance(exc, CorruptCheckpointError):
                        raise
                    damaged.add(candidate)
                    if not fallback:
                        raise
                    logger.warning("skipping damaged checkpoint %s: %s", path, exc)
                    skipped.append(f"{path}: {exc}")
                    continue
                if skipped:
                    logger.warning("restored step %d after skipping %d damaged checkpoint(s)", candidate, len(skipped))
                return RestoreResult(candidate, report, path)
            if not vanished:
                break
        if skipped:
            raise CorruptCheckpointError(
                f"{self._run.location}: every checkpoint is damaged, nothing was restored:\n  " + "\n  ".join(skipped)
            )
        return None

    def _list(self) -> dict[int, str]:
        """Committed steps; under torch.distributed rank 0 lists and every process gets its list."""
        if not self._group.distributed:
            return self._run.committed()
        committed = self._run.committed() if self._group.rank == 0 else {}
        listed = self._group.broadcast_text(",".join(map(str, committed)))
        return {s: self._run.path(s) for s in (int(x) for x in listed.split(",") if x)}

    def _vanished(self, step: int) -> bool:
        """True when ``step`` is no longer committed (every process agrees under torch.distributed)."""
        gone = not self._run.is_committed(step) if self._group.rank == 0 else False
        return bool(self._group.all_max(int(gone)))
