"""Point-in-time snapshots of a captured state, for saving in the background.

An async save must not write values that training changes after ``save()`` returned, so the
bytes of every tensor are copied into host buffers first; the background writer then reads
only those. The buffers are kept and reused by the next snapshot (a state's tensors rarely
change size), so memory stays at one copy of the state however many saves happen.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runstate._impl.pipeline import Captured
from runstate.adapters import copy_bytes

__all__ = ["SnapshotPool"]


class SnapshotPool:
    """Reusable host buffers, one per tensor of the state (keyed by item and tensor name)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], np.ndarray] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held by the pool."""
        return sum(b.nbytes for b in self._buffers.values())

    def snapshot(self, captured: Captured) -> Captured:
        """Copy every tensor's bytes into the pool; the blobs then read from the copies.

        Must not be called while a previous snapshot is still being written.
        """
        used: set[tuple[str, str]] = set()
        for item, (_tree, enc) in captured.items.items():
            for name, blob in enc.blobs.items():
                key = (item, name)
                used.add(key)
                buf = self._buffers.get(key)
                if buf is None or buf.nbytes != blob.nbytes:
                    buf = np.empty(blob.nbytes, dtype=np.uint8)
                    self._buffers[key] = buf
                copy_bytes(buf, blob.read())  # a framework may copy large buffers with several threads
                blob.read = _reader(buf)
        for key in set(self._buffers) - used:
            del self._buffers[key]
        return captured


def _reader(buf: np.ndarray) -> Any:
    def read() -> memoryview:
        data: memoryview = buf.data
        return data

    return read
