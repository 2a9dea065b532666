"""Streaming reader and writer of standard safetensors files.

A file is an 8-byte little-endian header length, a JSON header (padded with spaces to a
multiple of 8 bytes), then the raw tensor bytes back to back. The writer knows every
shape in advance, so it writes the header first and then streams one tensor at a time:
the whole file is never built in memory. Every tensor's bytes are hashed with XXH3-64 on
the way out and checked on the way in.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence
from typing import IO, Any

import numpy as np
import xxhash

from runstate.errors import CorruptCheckpointError
from runstate.format.tensors import TensorBlob

__all__ = [
    "WrittenTensor",
    "checksum_range",
    "file_metadata",
    "header_bytes",
    "read_header",
    "read_tensor_bytes",
    "write_safetensors",
]

_CHUNK = 64 * 1024 * 1024
_READ_CHUNK = 8 * 1024 * 1024
_FADVISE = getattr(os, "posix_fadvise", None)
_WRITEBACK_EVERY = 8 * 1024 * 1024
_MAX_HEADER = 100 * 1024 * 1024


class WrittenTensor:
    """Where a tensor landed in its file and the checksum of its bytes."""

    __slots__ = ("begin", "end", "xxh3")

    def __init__(self, begin: int, end: int, xxh3: str) -> None:
        self.begin, self.end, self.xxh3 = begin, end, xxh3


def checksum(data: Any) -> str:
    """XXH3-64 of ``data`` as 16 lowercase hex digits."""
    return xxhash.xxh3_64_hexdigest(data)


def file_metadata(item: str, libs: Iterable[str]) -> dict[str, str]:
    """The ``__metadata__`` of every tensor file of ``item``, given the ``lib`` of each of its tensors."""
    return {"format": "pt" if set(libs) == {"torch"} else "np", "runstate_item": item}


def header_bytes(tensors: Iterable[tuple[str, str, Sequence[int], int, int]], metadata: dict[str, str]) -> bytes:
    """The exact header runstate writes for ``(name, dtype, shape, begin, end)`` tensors, in this order.

    Compact JSON, ``__metadata__`` first, padded with spaces to a multiple of 8 bytes. The
    reader compares a file's header with this, byte for byte: the header is the one part of
    a tensor file that no checksum covers.
    """
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    for name, dtype, shape, begin, end in tensors:
        if name == "__metadata__":  # the encoder never names a tensor so: see RESERVED_TENSOR_NAMES
            raise ValueError("a tensor cannot be named __metadata__, the safetensors header's reserved key")
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    raw += b" " * (-len(raw) % 8)
    return raw


def _in_file_order(tensors: Sequence[tuple[str, TensorBlob]]) -> Iterable[tuple[str, str, Sequence[int], int, int]]:
    offset = 0
    for name, blob in tensors:
        yield name, blob.dtype, blob.shape, offset, offset + blob.nbytes
        offset += blob.nbytes


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a chunk to disk now, so the final fsync does not wait for all of it.

    On Linux, POSIX_FADV_DONTNEED on freshly written (dirty) pages starts their writeback
    without waiting for it; the disk then works while the next chunk is hashed and copied.
    Measured: durable saves about 15-25% faster. A no-op where fadvise does not exist.
    """
    if _FADVISE is not None and length:
        _FADVISE(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _fileno(f: IO[bytes]) -> int | None:
    try:
        return f.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return None


def write_safetensors(
    f: IO[bytes], tensors: Sequence[tuple[str, TensorBlob]], metadata: dict[str, str]
) -> tuple[int, dict[str, WrittenTensor]]:
    """Write ``tensors`` as a safetensors file to the binary file ``f``, from its start.

    The caller opens ``f`` and makes it durable (fsync, upload) when closing it. On a real
    file (one with a ``fileno``), the kernel is asked every 8 MiB to
    start writing the pages already written, so the caller's final fsync waits less.

    Returns:
        The file size and, per tensor name, its data offsets and checksum.
    """
    header = header_bytes(_in_file_order(tensors), metadata)
    written: dict[str, WrittenTensor] = {}
    fd = _fileno(f)
    position = f.write(struct.pack("<Q", len(header)) + header) or 0
    flushed = 0
    offset = 0
    for name, blob in tensors:
        data = blob.read()
        if data.nbytes != blob.nbytes:
            raise RuntimeError(f"tensor {name!r} produced {data.nbytes} bytes, expected {blob.nbytes}")
        digest = checksum(data)
        for start in range(0, data.nbytes, _CHUNK):
            view = data[start : start + _CHUNK]
            while view.nbytes:
                n = f.write(view) or 0
                view = view[n:]
                position += n
                if fd is not None and position - flushed >= _WRITEBACK_EVERY:  # not per tiny tensor
                    _start_writeback(fd, flushed, position - flushed)
                    flushed = position
        written[name] = WrittenTensor(offset, offset + blob.nbytes, digest)
        offset += blob.nbytes
    return 8 + len(header) + offset, written


def read_header(f: IO[bytes], path: str, size: int | None = None) -> tuple[dict[str, Any], int, bytes]:
    """Parse a safetensors header.

    Args:
        f: the file, positioned at its start.
        path: its name, for error messages.
        size: the file's size; taken from ``fstat`` when None.

    Returns:
        The header, the offset where tensor data begins, and the header's raw bytes.

    Raises:
        CorruptCheckpointError: a header length past the file's end or the limit (checked
            before anything is allocated), or a header that is not a JSON object.
    """
    raw = f.read(8)
    if len(raw) != 8:
        raise CorruptCheckpointError(f"{path}: truncated safetensors file (no header length)")
    (n,) = struct.unpack("<Q", raw)
    if n > _MAX_HEADER:
        raise CorruptCheckpointError(f"{path}: safetensors header length {n} is implausible")
    available = (os.fstat(f.fileno()).st_size if size is None else size) - 8
    if n > available:
        raise CorruptCheckpointError(f"{path}: truncated safetensors header ({n} bytes announced, {available} in the file)")
    body = f.read(n)
    if len(body) != n:
        raise CorruptCheckpointError(f"{path}: truncated safetensors header")
    try:
        header = json.loads(body)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, absurd nesting, 4300+ digit numbers
        raise CorruptCheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: safetensors header is not a JSON object")
    return header, 8 + n, body


def checksum_range(f: IO[bytes], path: str, data_start: int, begin: int, end: int) -> str:
    """XXH3-64 of the bytes ``[begin, end)`` of the data section, hashed as a stream.

    Memory stays at one :data:`_READ_CHUNK` buffer whatever the tensor's size, so a tensor
    larger than the free memory can still be verified.
    """
    hasher = xxhash.xxh3_64()
    buf = np.empty(min(end - begin, _READ_CHUNK), dtype=np.uint8)
    f.seek(data_start + begin)
    left = end - begin
    while left:
        view = buf.data[: min(left, buf.nbytes)]
        n = f.readinto(view)  # type: ignore[attr-defined]
        if not n:
            raise CorruptCheckpointError(
                f"{path}: file is truncated (expected {end - begin} bytes at offset {data_start + begin}, "
                f"got {end - begin - left})"
            )
        hasher.update(view[:n])
        left -= n
    return hasher.hexdigest()


def read_tensor_bytes(f: IO[bytes], path: str, data_start: int, begin: int, end: int) -> np.ndarray:
    """Read the bytes ``[begin, end)`` of the data section into a new uint8 array."""
    out = np.empty(end - begin, dtype=np.uint8)
    f.seek(data_start + begin)
    view = out.data
    got = 0
    while got < out.nbytes:
        n = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            raise CorruptCheckpointError(
                f"{path}: file is truncated (expected {out.nbytes} bytes at offset {data_start + begin}, got {got})"
            )
        got += n
    return out
