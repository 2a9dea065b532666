"""The save in flight of ``CheckpointManager(async_save=True)``, written by one background thread.

Invariant: a background failure is never lost. It is raised, as :class:`AsyncSaveError` with
the original exception chained, by the next :meth:`BackgroundSaver.wait` (the manager's next
``save``, ``wait``, ``restore``, ``clean`` or ``close``). A process that exits before any of
them waits for the save at interpreter exit (before ``concurrent.futures`` shuts its executors
down, so the save can still use its threads),
and if it failed, logs the error at ERROR and exits with status 1, so a supervisor never
takes a lost checkpoint for a finished run.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from runstate.errors import AsyncSaveError

__all__ = ["BackgroundSaver"]

logger = logging.getLogger("runstate")


class BackgroundSaver:
    """At most one save in flight, on one thread; registered for interpreter exit until :meth:`shutdown`.

    Also runs the synchronous saver's retention (``thread_name="runstate-retention"``): the same
    one-job-at-a-time thread, waited for by the next call and at interpreter exit.

    Args:
        thread_name: the prefix of the thread's name.
    """

    def __init__(self, thread_name: str = "runstate-save") -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._pending: tuple[int, str, Future[None]] | None = None
        self._pid = os.getpid()  # a forked child inherits the hooks but not the thread
        self._at_exit = functools.partial(_finish_at_exit, weakref.ref(self))
        atexit.register(self._at_exit)
        # Also before concurrent.futures' own exit hook, which refuses new work to every
        # executor (compression threads, parallel uploads) while it joins the writer: the save
        # in flight must finish with them. Hooks run last-registered first, so this one runs
        # before it. A private hook of the threading module, hence the guard.
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            with contextlib.suppress(RuntimeError):  # already shutting down: atexit still waits
                register(self._at_exit)

    def submit(self, step: int, where: str, write: Callable[[], None]) -> None:
        """Run ``write`` in the background (the previous save must have been waited for)."""
        self._pending = (step, where, self._executor.submit(write))

    @property
    def forked(self) -> bool:
        """True in a process forked from the one that made this saver (it has no thread there)."""
        return self._pid != os.getpid()

    def wait(self) -> None:
        """Block until the save in flight is committed (at once in a forked child: the save is the parent's).

        The handle is dropped only once the save is done, so that a second caller (another
        thread, or the next call after a Ctrl-C interrupted this wait) waits for it too.

        Raises:
            AsyncSaveError: the background save failed; its exception is the ``__cause__``.
        """
        pending = self._pending
        if pending is None or self.forked:
            return
        step, where, future = pending
        try:
            future.result()
        except Exception as exc:
            if self._pending is pending:  # a failure is raised once
                self._pending = None
            raise AsyncSaveError(
                f"{where}: the background save of step {step} failed, nothing was committed: {exc}", step=step
            ) from exc
        if self._pending is pending:
            self._pending = None

    def shutdown(self) -> None:
        """Stop the thread (after the save in flight) and drop the exit hook. Idempotent."""
        self._executor.shutdown(wait=True)
        atexit.unregister(self._at_exit)


def _finish_at_exit(ref: weakref.ref[BackgroundSaver]) -> None:
    """At interpreter exit: collect the save left in flight; a failure is logged, exit status 1."""
    saver = ref()
    if saver is None or saver.forked:
        # A forked child (a DataLoader worker) runs the hooks at its exit too, but the save in
        # flight is the parent's: waiting for it here would hang the child forever.
        return
    try:
        saver.wait()
    except AsyncSaveError as exc:
        logger.error("%s (the process exits without close() or wait(); exiting with status 1)", exc, exc_info=exc)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                stream.flush()
        logging.shutdown()
        os._exit(1)  # the status Python would give an uncaught exception; later exit handlers are skipped
