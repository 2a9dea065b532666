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
from typing import Any

from runstate._impl.group import Group
from runstate._impl.reader import CheckpointReader
from runstate._impl.restore import RestoreReport, restore_state
from runstate.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from runstate.format.manifest import MANIFEST_NAME
from runstate.storage import Store, step_dirname

__all__ = ["RunRestorer"]

logger = logging.getLogger("runstate")

Renames = Mapping[str, Sequence[tuple[str, str]]]


class RunRestorer:
    """Restores from the committed checkpoints of the run at ``store``, with every process of ``group``."""

    def __init__(self, store: Store, group: Group) -> None:
        self._store = store
        self._group = group

    def restore_from(
        self,
        store: Store,
        state: MutableMapping[str, Any],
        strict: bool,
        rename: Renames | None,
        exclude: str | Iterable[str] | None,
    ) -> RestoreReport:
        """Restore ``state`` from the checkpoint at ``store`` (a missing manifest is damage)."""
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
            return restore_state(reader, state, strict=strict, rename=rename, group=self._group, exclude=exclude)

    def restore_newest(
        self,
        state: MutableMapping[str, Any],
        *,
        strict: bool,
        fallback: bool,
        rename: Renames | None,
        exclude: str | Iterable[str] | None,
        damaged: set[int],
    ) -> tuple[int, RestoreReport] | None:
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
                    report = self.restore_from(self._store.child(step_dirname(candidate)), state, strict, rename, exclude)
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
                return candidate, report
            if not vanished:
                break
        if skipped:
            raise CorruptCheckpointError(
                f"{self._store.location}: every checkpoint is damaged, nothing was restored:\n  " + "\n  ".join(skipped)
            )
        return None

    def list_committed(self) -> dict[int, str]:
        """The committed steps, listed again when the listing came back empty.

        A listing that races with the writer's retention can see the step being deleted but
        not the one committed just before (a directory listing is not a snapshot); the writer
        commits before it deletes, so a second listing sees the new step.
        """
        for _attempt in range(3):
            committed = self._store.list_committed()
            if committed:
                break
        return committed

    def _list(self) -> dict[int, str]:
        """Committed steps; under torch.distributed rank 0 lists and every process gets its list."""
        if not self._group.distributed:
            return self.list_committed()
        committed = self.list_committed() if self._group.rank == 0 else {}
        listed = self._group.broadcast_text(",".join(map(str, committed)))
        return {s: self._store.join(step_dirname(s)) for s in (int(x) for x in listed.split(",") if x)}

    def _vanished(self, step: int) -> bool:
        """True when ``step`` is no longer committed (every process agrees under torch.distributed)."""
        gone = step not in self._store.list_committed() if self._group.rank == 0 else False
        return bool(self._group.all_max(int(gone))) if self._group.distributed else gone
