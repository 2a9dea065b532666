"""Point-in-time snapshots of a captured state, for saving in the background.

An async save must not write values that training changes after ``save()`` returned, so the
bytes of every tensor are copied into host buffers first; the background writer then reads
only those. The buffers are kept and reused by the next snapshot (a state's tensors rarely
change size), so memory stays at one copy of the state however many saves happen.

Why the buffers are plain anonymous mappings: a first snapshot pays for fresh memory, and
NumPy asks for transparent huge pages on large arrays (``MADV_HUGEPAGE``); with the kernel's
``defrag=madvise`` default, every huge-page fault may then compact memory synchronously,
which made a first snapshot block seconds on a VM whose freed memory goes back to the host.
A private anonymous mapping without that advice faults 4 KiB pages as ``malloc`` memory
does. :meth:`SnapshotPool.reserve` (``CheckpointManager.warmup``) allocates and faults the
buffers in ahead of time, so the first save copies at the speed of the later ones.
"""

from __future__ import annotations

import contextlib
import mmap
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from runstate._impl.pipeline import Captured
from runstate.adapters import copy_bytes

__all__ = ["SnapshotPool"]

_MAP_FROM = 1 << 20  # buffers of at least 1 MiB get their own mapping; smaller ones come from malloc
_MAP_FLAGS = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux: fault every page in at once, in the kernel
# Linux >= 4.14 (Python 3.11's mmap lacks the name; 18 is Linux's value, nowhere else's)
_MADV_WIPEONFORK: int | None = getattr(mmap, "MADV_WIPEONFORK", 18 if sys.platform.startswith("linux") else None)


class SnapshotPool:
    """Reusable host buffers, one per tensor of the state (keyed by item and tensor name)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], np.ndarray] = {}
        self.allocated_bytes = 0  # every byte ever allocated, for tests and benchmarks

    @property
    def nbytes(self) -> int:
        """Bytes held by the pool."""
        return sum(b.nbytes for b in self._buffers.values())

    def reserve(self, captured: Captured, *, populate: bool = False) -> int:
        """Make the pool hold exactly one buffer of the right size per tensor of ``captured``.

        Buffers that already fit are kept; those of tensors no longer in the state are dropped.
        Must not be called while a snapshot is still being written.

        Args:
            captured: the state whose tensors the next snapshots copy.
            populate: fault the new buffers' pages in now (what ``warmup`` does), instead of at
                the first copy into them.

        Returns:
            The bytes newly allocated (0 when every buffer already fitted).
        """
        sizes = _sizes(captured)
        for key in set(self._buffers) - set(sizes):
            del self._buffers[key]
        new = 0
        for key, nbytes in sizes.items():
            buf = self._buffers.get(key)
            if buf is None or buf.nbytes != nbytes:
                self._buffers[key] = _host_buffer(nbytes, populate=populate)
                new += nbytes
        self.allocated_bytes += new
        return new

    def snapshot(self, captured: Captured) -> Captured:
        """Copy every tensor's bytes into the pool; the blobs then read from the copies.

        Must not be called while a previous snapshot is still being written.
        """
        self.reserve(captured)
        for item, (_tree, enc) in captured.items.items():
            for name, blob in enc.blobs.items():
                buf = self._buffers[(item, name)]
                copy_bytes(buf, blob.read())  # a framework may copy large buffers with several threads
                blob.read = _reader(buf)
        return captured


def _sizes(captured: Captured) -> Mapping[tuple[str, str], int]:
    return {(item, name): blob.nbytes for item, (_t, enc) in captured.items.items() for name, blob in enc.blobs.items()}


def _host_buffer(nbytes: int, *, populate: bool) -> np.ndarray:
    """A writable uint8 buffer of ``nbytes``: its own anonymous mapping when large (see the module
    docstring), else NumPy's; with ``populate``, its pages already faulted in."""
    if nbytes >= _MAP_FROM and _MAP_FLAGS:
        try:
            area = mmap.mmap(-1, nbytes, flags=_MAP_FLAGS | (_POPULATE if populate else 0))
        except OSError as exc:  # ENOMEM: say what it was for, as NumPy's MemoryError would
            raise MemoryError(
                f"cannot allocate {nbytes} bytes of host memory for an async save's snapshot: {exc}; "
                "free host memory, or save with async_save=False (no snapshot copy)"
            ) from exc
        # A process forked later (DataLoader workers) gets zero pages here instead of sharing
        # them copy-on-write: the next snapshot would otherwise copy every page it writes.
        if _MADV_WIPEONFORK is not None:
            with contextlib.suppress(OSError, ValueError):  # older kernels: fork shares them
                area.madvise(_MADV_WIPEONFORK)
        buf = np.frombuffer(area, dtype=np.uint8)  # keeps the mapping alive; unmapped with the last view
        if populate and not _POPULATE:
            buf.fill(0)
        return buf
    buf = np.empty(nbytes, dtype=np.uint8)
    if populate:
        buf.fill(0)
    return buf


def _reader(buf: np.ndarray) -> Any:
    def read() -> memoryview:
        data: memoryview = buf.data
        return data

    return read
