"""How deep a typed tree may nest, and enough Python stack to walk one that deep.

Typed trees are encoded, decoded and turned into JSON by recursion (``json`` itself recurses
in C), which counts against the interpreter's recursion limit together with the caller's own
frames. So without care, whether a checkpoint loads would depend on how deep in the call stack
``load`` or ``restore`` is called, and a tree that saved from a shallow stack could fail to
load from a deep one, and be called damaged. Two rules make the outcome independent of the
caller:

* a tree is at most :data:`MAX_TREE_DEPTH` nodes deep, checked identically when encoding
  (``UnsupportedTypeError``, before anything is written) and decoding (``CorruptCheckpointError``:
  runstate never writes a deeper tree);
* every walk of a tree runs inside :func:`stack_room`, which makes sure the recursion limit
  leaves room for a tree of that depth above the caller's frames, raising the limit for the
  duration of the walk when it would not.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["MAX_TREE_DEPTH", "stack_room"]

#: Nodes from an item's root (depth 1) to its deepest leaf; deeper trees are refused.
MAX_TREE_DEPTH = 100

# Recursion levels one tree level may need: up to three Python frames in the encoder or
# decoder (a node, a comprehension, a helper), and three JSON levels (a dict node's object,
# its "v" array and the [key, node] pair). Plus slack for the frames around the recursion.
_ROOM = 4 * MAX_TREE_DEPTH + 300

_lock = threading.Lock()
_users = 0
_original: int | None = None
_raised_to = 0


def _stack_depth() -> int:
    depth = 0
    frame = sys._getframe()
    while frame is not None:
        depth += 1
        frame = frame.f_back  # type: ignore[assignment]
    return depth


@contextmanager
def stack_room(levels: int = _ROOM) -> Iterator[None]:
    """Run the body with at least ``levels`` recursion levels left above the current frame.

    The recursion limit is raised only when needed, and put back when the last walk in any
    thread ends (unless someone else changed it meanwhile).
    """
    global _users, _original, _raised_to
    needed = _stack_depth() + levels
    with _lock:
        _users += 1
        current = sys.getrecursionlimit()
        if needed > current:
            if _original is None:
                _original = current
            sys.setrecursionlimit(needed)
            _raised_to = needed
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0 and _original is not None:
                if sys.getrecursionlimit() == _raised_to:
                    sys.setrecursionlimit(_original)
                _original, _raised_to = None, 0
