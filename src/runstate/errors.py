"""The exception hierarchy of runstate.

Every error the library raises on purpose derives from :class:`CheckpointError`, and each
subclass also derives from the built-in exception a caller would naturally catch
(``FileNotFoundError``, ``ValueError``, ...), so existing ``except`` clauses keep working.
Messages always say what failed, where (a path or a key in the state), and what to do.
"""

from __future__ import annotations

__all__ = [
    "AsyncSaveError",
    "CheckpointConfigError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointReadError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "FormatVersionError",
    "LockError",
    "PartialRestoreError",
    "StateMismatchError",
    "StepExistsError",
    "UnsupportedTypeError",
]


class CheckpointError(Exception):
    """Root of every error raised by runstate."""


class CheckpointConfigError(CheckpointError, ValueError):
    """An option passed to runstate is invalid (a bad ``keep_last``, ``rename`` rule, ``exclude``
    pattern, ``best_mode``...): nothing was read or written. The message names the option and
    the values it accepts."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint (or a requested step) does not exist."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A checkpoint's bytes do not match its manifest: a checksum, size or header differs.

    Attributes:
        file: the file inside the checkpoint that is damaged (``manifest.json``,
            ``model.safetensors``...), when known.
        tensor: the tensor whose bytes are damaged, when known.
    """

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None) -> None:
        super().__init__(message)
        self.file = file
        self.tensor = tensor


class StateMismatchError(CheckpointError, ValueError):
    """The state being restored does not match the checkpoint's items, keys or shapes.

    Attributes:
        report: the ``RestoreReport`` listing every mismatch, when the check got that far.
    """

    report: object = None


class PartialRestoreError(StateMismatchError):
    """Restoring failed after some items had already been changed (an item's ``load_state_dict``
    raised in the second phase, after every check of the first phase had passed).

    The live state is then a mix of restored and live values: rebuild the objects (or restart
    the process) before restoring again.

    Attributes:
        restored: the items already restored, as paths (``state['model']``), in order.
        failed: the item whose restore raised; it may be partly changed.
    """

    restored: tuple[str, ...] = ()
    failed: str = ""


class UnsupportedTypeError(CheckpointError, TypeError):
    """A value in the state cannot be stored without pickle."""


class StepExistsError(CheckpointError, FileExistsError):
    """A checkpoint for this step (or at this path) already exists."""


class FormatVersionError(CheckpointError, ValueError):
    """A checkpoint was written by a newer, unknown version of the format."""


class LockError(CheckpointError, BlockingIOError):
    """Another live process is writing checkpoints to the same run directory."""


class CheckpointReadError(CheckpointError, OSError):
    """Reading a checkpoint failed for a reason outside it: too many open files, no memory,
    an I/O, network or permission error. The checkpoint is not known to be damaged, so it is
    never skipped or moved aside as damaged; fix the cause and read it again. The original
    exception is the ``__cause__``.
    """


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (disk full, I/O error, permissions); nothing was committed.

    Raised as ``CheckpointWriteError(exc.errno, message)`` when an ``OSError`` caused it (its
    ``errno`` is kept), and as ``CheckpointWriteError(message)`` (``errno`` None) otherwise.
    """


class AsyncSaveError(CheckpointError, RuntimeError):
    """A save running in the background failed; the original exception is ``__cause__``.

    Attributes:
        step: the step whose save failed.
    """

    def __init__(self, message: str, *, step: int) -> None:
        super().__init__(message)
        self.step = step
