"""One process-wide signal handler shared by every ``CheckpointManager(save_on_signals=...)``.

A signal has one handler per process. If each manager installed its own, the second would
silently replace the first (which would then never save), and closing them in another order
than they were created would put back a handler that belongs to a closed manager, or the
default one while another manager still waits for the signal. So the first subscriber for a
signal installs :func:`_dispatch`, remembering the handler it replaced; every subscriber is
called on each delivery; when the last one unsubscribes, the remembered handler is put back,
whatever the order of the unsubscriptions. A handler installed by someone else meanwhile is
left in place.

Invariant: while a signal has subscribers, its handler is :func:`_dispatch` (unless someone
else replaced it), and a subscriber's callback only records the signal (no I/O in a handler).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["subscribe", "unsubscribe"]

#: signal number -> {subscriber token: callback}
_subscribers: dict[int, dict[int, Callable[[int], None]]] = {}
#: signal number -> the handler that was in place before :func:`_dispatch` was installed
_original: dict[int, Any] = {}
_lock = threading.Lock()


def _dispatch(signum: int, frame: FrameType | None) -> None:
    callbacks = list(_subscribers.get(signum, {}).values())
    for callback in callbacks:
        callback(signum)
    if not callbacks and signum in _original:  # the last subscriber left from another thread
        original = _original.pop(signum)
        signal.signal(signum, original if original is not None else signal.SIG_DFL)
        if callable(original):
            original(signum, frame)
        elif original == signal.SIG_DFL:
            os.kill(os.getpid(), signum)  # what would have happened without runstate


def subscribe(signum: int, token: int, callback: Callable[[int], None]) -> None:
    """Call ``callback(signum)`` on every delivery of ``signum`` until :func:`unsubscribe`.

    Must be called from the main thread (Python installs signal handlers there only).

    Args:
        signum: the signal.
        token: identifies the subscriber for :func:`unsubscribe` (a manager's
            :class:`~runstate._impl.preemption.PreemptionWatcher` passes its ``id``).
        callback: a function that only records the signal.
    """
    with _lock:
        current = signal.getsignal(signum)
        if current is not _dispatch:
            previous = signal.signal(signum, _dispatch)
            if signum not in _original or not _subscribers.get(signum):
                _original[signum] = previous
        _subscribers.setdefault(signum, {})[token] = callback


def unsubscribe(signum: int, token: int) -> None:
    """Stop calling ``token``'s callback; the last one out puts the original handler back.

    Idempotent. Called from another thread than the main one, the dispatcher stays installed
    (a no-op for this signal) because only the main thread can change handlers.
    """
    with _lock:
        subscribers = _subscribers.get(signum)
        if subscribers is None or subscribers.pop(token, None) is None or subscribers:
            return
        del _subscribers[signum]
        original = _original.pop(signum, signal.SIG_DFL)
        if threading.current_thread() is not threading.main_thread():
            _original[signum] = original
            return
        if signal.getsignal(signum) is _dispatch:  # a handler installed by someone else stays
            signal.signal(signum, original if original is not None else signal.SIG_DFL)
