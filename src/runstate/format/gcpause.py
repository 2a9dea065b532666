"""Walks that build one object per value run with Python's cyclic garbage collector paused.

Encoding a state, and turning its manifest into JSON, creates a few container objects per
value that all stay alive until the walk ends (tree nodes, tensor blobs, index entries). The
collector runs after every 700 net new containers and, every so often, walks every object of
the program, including the hundreds of thousands torch creates at import: for a state of
10,000 tiny tensors these full collections cost more than the rest of the save (measured on
2 cores: 0.35 s of a 0.57 s save, in a program that had not frozen torch's objects with
``gc.freeze()``). None of these objects is garbage while the walk runs, so the collector can
only waste time there. The remedy is Mercurial's (``util.nogc``): the collector is disabled
for the duration of such a walk, and enabled again when the last walk in any thread ends,
unless the program had disabled it itself. Garbage made meanwhile is collected as usual
afterwards (reference counting frees at once everything that is not in a cycle, paused or not).

Only walks that compute are wrapped (encoding a state; a manifest to and from JSON), never
runstate's file or network I/O (writing and reading the tensors), so a slow disk never keeps
the collector off; the program's own code that a walk calls (its objects' ``state_dict()``)
runs with the collector on (:func:`gc_resumed`).
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["gc_paused", "gc_resumed"]

_lock = threading.Lock()
_users = 0
_disabled = False  # True while a walk of ours has the collector disabled
_fork_hook = False  # whether _after_fork_in_child is registered (on first use, not at import)


def _after_fork_in_child() -> None:
    """A process forked while another thread's walk had the collector off (DataLoader workers
    forked next to a save in a thread): no walk runs in the child, so the collector goes back on."""
    global _users, _disabled, _lock
    _lock = threading.Lock()  # the parent's may have been held by a thread the child does not have
    _users = 0
    if _disabled:
        _disabled = False
        gc.enable()


@contextmanager
def gc_paused() -> Iterator[None]:
    """Run the body with the cyclic garbage collector disabled (reentrant, thread-safe).

    The collector is disabled by the first walk to start (when it is enabled) and enabled again
    when the last one in any thread ends, unless someone enabled it meanwhile.
    """
    global _users, _disabled, _fork_hook
    with _lock:
        if not _fork_hook and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork_in_child)
            _fork_hook = True
        _users += 1
        if _users == 1 and gc.isenabled():
            gc.disable()
            _disabled = True
    try:
        yield
    finally:
        with _lock:
            _users = max(0, _users - 1)  # 0 already: a child forked inside the walk (reset at fork)
            if _users == 0 and _disabled:
                _disabled = False
                if not gc.isenabled():
                    gc.enable()


@contextmanager
def gc_resumed() -> Iterator[None]:
    """Run the body with the collector as the program had it, inside a :func:`gc_paused` walk.

    For the program's own code a walk calls (a ``state_dict()``, a registered ``get_state``):
    it may block for long (an all-gather waiting for a slow rank) while other threads make
    cyclic garbage, which must not pile up meanwhile.
    """
    with _lock:
        resumed = _disabled and not gc.isenabled()
        if resumed:
            gc.enable()
    try:
        yield
    finally:
        if resumed:
            with _lock:
                if _disabled and gc.isenabled():
                    gc.disable()
