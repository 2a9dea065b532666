"""Reading the tensors of one item of a local checkpoint at once, hashed while in the CPU cache.

A restore reads every byte, checks it against its XXH3 checksum and keeps it in a staging
buffer until everything verified (nothing live changes before). Reading a tensor whole and
then hashing it walks its bytes through memory twice; here each piece of at most
:data:`CHUNK` bytes is hashed right after ``preadv`` put it into the staging buffer, while it
is still in the CPU cache, so hashing costs little more than the copy out of the page cache.
Several tensors are read at once by a few threads (``preadv`` and XXH3 on large pieces run
without the GIL): one core copies while another hashes, and a cold read keeps several
requests in flight. Nothing is believed here: the digest is returned, the reader compares it
with the manifest.

Only what can be read with ``preadv`` at an offset is read here: uncompressed tensors of
local files. The file is opened and its header checked by the reader first; a duplicate of
its descriptor is used and closed here, so the reader's own limit on open files holds.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import xxhash

from runstate.errors import CorruptCheckpointError

__all__ = ["BATCH", "CHUNK", "MIN_BYTES", "Range", "read_and_hash", "read_file_and_hash", "read_ranges", "workers"]

#: Bytes read and hashed at a time: small enough to be hashed from the CPU cache.
CHUNK = 1 << 20

#: Below this many bytes in all, an item is read tensor by tensor (threads would cost more).
MIN_BYTES = 8 << 20

#: Small tensors are read in batches of about this many bytes per thread task.
BATCH = 4 << 20

_MAX_WORKERS = 4
_SEQUENTIAL = getattr(os, "POSIX_FADV_SEQUENTIAL", None)


@dataclass(frozen=True)
class Range:
    """One tensor's bytes in a file: ``length`` bytes at ``offset``.

    Attributes:
        key: what the result is filed under (the tensor's name).
        fd: the open file (a duplicate the caller closes after :func:`read_ranges`).
        offset: where the bytes start in the file.
        length: how many bytes.
        where: the file, for messages.
        empty: makes the uint8 array of ``length`` bytes they are read into.
    """

    key: str
    fd: int
    offset: int
    length: int
    where: str
    empty: Callable[[int], np.ndarray]


def workers() -> int:
    """Threads that read at once: one per core, at most four."""
    return max(1, min(_MAX_WORKERS, os.cpu_count() or 1))


def _truncated(where: str, size: int, offset: int, got: int) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{where}: file is truncated (expected {size} bytes at offset {offset}, got {got})")


def _fill_and_hash(read_at: Callable[[memoryview, int], int], offset: int, out: np.ndarray, where: str) -> str:
    """Fill ``out`` from ``offset`` on with ``read_at(piece, position)``, hashing each piece as it arrives."""
    hasher = xxhash.xxh3_64()
    view = out.data
    got, size = 0, out.nbytes
    while got < size:
        piece = view[got : got + CHUNK]
        n = read_at(piece, offset + got)
        if not n:
            raise _truncated(where, size, offset, got)
        hasher.update(piece[:n])
        got += n
    return hasher.hexdigest()


def read_and_hash(fd: int, offset: int, out: np.ndarray, where: str) -> str:
    """Read ``out.nbytes`` bytes at ``offset`` of ``fd`` into ``out``, hashing each piece as it arrives.

    Returns:
        The XXH3-64 of the bytes, as 16 lowercase hex digits.

    Raises:
        CorruptCheckpointError: the file ends before them.
        OSError: the read failed.
    """
    return _fill_and_hash(lambda piece, position: os.preadv(fd, [piece], position), offset, out, where)


def read_file_and_hash(f: IO[bytes], offset: int, out: np.ndarray, where: str) -> str:
    """:func:`read_and_hash` for a file object (any store's): seeks, then reads piece by piece."""
    f.seek(offset)
    return _fill_and_hash(lambda piece, _position: f.readinto(piece), offset, out, where)  # type: ignore[attr-defined]


def _batches(ranges: Sequence[Range]) -> list[list[Range]]:
    """Consecutive ranges grouped so that each task reads at least :data:`BATCH` bytes (or one range)."""
    out: list[list[Range]] = []
    size = BATCH
    for r in ranges:
        if size >= BATCH:
            out.append([])
            size = 0
        out[-1].append(r)
        size += r.length
    return out


def read_ranges(
    ranges: Sequence[Range], guard: Callable[[str, Callable[[], Any]], Any]
) -> dict[str, Future[tuple[np.ndarray, str]]]:
    """Read every range into a new array with its XXH3, several at a time.

    Ranges are read in the order given by a few threads, small ones in batches (give them in
    file order, so that a cold read stays nearly sequential). Each one's failure is kept in its
    future and raised when its result is asked for, so the caller reports the first damage in
    its own order. Returns once every read finished.

    Args:
        ranges: what to read.
        guard: runs one read and turns an error that is not damage into the caller's kind
            (``guard(where, read)``).

    Returns:
        A done future per range key: ``(bytes, xxh3 hex digest)``, or the error.
    """
    if _SEQUENTIAL is not None:
        for fd in {r.fd for r in ranges}:
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, _SEQUENTIAL)  # a larger readahead window for a cold read
    futures: dict[str, Future[tuple[np.ndarray, str]]] = {r.key: Future() for r in ranges}

    def one(r: Range) -> tuple[np.ndarray, str]:
        out = r.empty(r.length)
        return out, read_and_hash(r.fd, r.offset, out, r.where)

    def task(batch: list[Range]) -> None:
        for r in batch:
            future = futures[r.key]
            try:
                future.set_result(guard(r.where, lambda r=r: one(r)))  # type: ignore[misc]
            except BaseException as exc:  # kept for the caller, raised when it asks for this tensor
                future.set_exception(exc)

    batches = _batches(ranges)
    with ThreadPoolExecutor(max_workers=min(workers(), len(batches)) or 1, thread_name_prefix="runstate-read") as pool:
        for batch in batches:
            pool.submit(task, batch)
    return futures
