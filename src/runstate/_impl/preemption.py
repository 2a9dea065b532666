"""The preemption watcher of a ``CheckpointManager(save_on_signals=...)``.

A scheduler sends a signal (``SIGTERM``, ``SIGUSR1``...) some time before it kills a job. The
handler only records it (no I/O in a signal handler, see :mod:`runstate._impl.signals`); the
next ``save`` sees :attr:`PreemptionWatcher.pending`, writes regardless of the cadence and
calls :meth:`PreemptionWatcher.saved`, after which ``preempted`` is True and ``exit_code`` is
:data:`EXIT_PREEMPTED`. Invariant: ``preempted`` becomes True only once a checkpoint written
after the signal is committed (or, with ``async_save``, handed to the background writer).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable

from runstate._impl.signals import subscribe, unsubscribe
from runstate.errors import CheckpointConfigError

__all__ = ["EXIT_PREEMPTED", "PreemptionWatcher", "signal_numbers"]

logger = logging.getLogger("runstate")

#: The exit status of a job that stopped after its preemption save (``EX_TEMPFAIL``, "try
#: again"): ``runstate run`` restarts such a job at once, without counting it as a failure.
EXIT_PREEMPTED = 75


def signal_numbers(save_on_signals: Iterable[int]) -> tuple[int, ...]:
    """The signals to watch, checked before anything is installed.

    Raises:
        CheckpointConfigError: a value is not a catchable signal, or signals are given
            outside the main thread (Python installs handlers there only).
    """
    if isinstance(save_on_signals, (str, bytes)) or not isinstance(save_on_signals, Iterable):
        raise CheckpointConfigError(
            f"save_on_signals must be a sequence of signal numbers such as (signal.SIGTERM,), got {save_on_signals!r}"
        )
    catchable = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}
    signums = tuple(save_on_signals)
    for signum in signums:
        if isinstance(signum, bool) or not isinstance(signum, int) or signum not in catchable:
            raise CheckpointConfigError(
                f"save_on_signals: {signum!r} is not a signal a handler can be installed for; "
                "give signal numbers such as signal.SIGTERM or signal.SIGUSR1 (never SIGKILL or SIGSTOP)"
            )
    if signums and threading.current_thread() is not threading.main_thread():
        raise CheckpointConfigError(
            f"save_on_signals={signums!r}: signal handlers can only be installed from the main thread; "
            "create the CheckpointManager there, or leave save_on_signals empty"
        )
    return signums


class PreemptionWatcher:
    """Records the ``save_on_signals`` signals delivered to this process, for one manager.

    Args:
        signums: the signals to watch, from :func:`signal_numbers` (may be empty: then
            nothing is installed).

    Attributes:
        received: the number of the last signal received, if any.
        preempted: True once a checkpoint was saved after a signal.
    """

    def __init__(self, signums: tuple[int, ...]) -> None:
        self.received: int | None = None
        self.preempted = False
        self._signums: tuple[int, ...] = ()
        for signum in signums:
            subscribe(signum, id(self), self._on_signal)
        self._signums = signums

    def _on_signal(self, signum: int) -> None:
        self.received = signum  # only a flag: the next save() does the I/O

    @property
    def watching(self) -> bool:
        """True while signals are watched (the manager is open and some were given)."""
        return bool(self._signums)

    @property
    def pending(self) -> bool:
        """True when a signal arrived and no checkpoint was saved after it yet."""
        return self.received is not None and not self.preempted

    @property
    def exit_code(self) -> int:
        """:data:`EXIT_PREEMPTED` once :attr:`preempted`, else 0."""
        return EXIT_PREEMPTED if self.preempted else 0

    def saved(self, step: int) -> None:
        """A checkpoint was saved after the signal: the job should now stop."""
        self.preempted = True
        logger.warning("saved step %d after signal %s; mgr.preempted is now True", step, self.received)

    def close(self) -> None:
        """Stop watching; the last watcher of a signal puts its previous handler back. Idempotent."""
        for signum in self._signums:
            unsubscribe(signum, id(self))
        self._signums = ()
