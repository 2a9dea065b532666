"""Streaming reader and writer of standard safetensors files.

A file is an 8-byte little-endian header length, a JSON header (padded with spaces to a
multiple of 8 bytes), then the raw tensor bytes back to back. The writer knows every
shape in advance, so it writes the header first and then streams one tensor at a time:
the whole file is never built in memory. Every tensor's bytes are hashed with XXH3-64 on
the way out and checked on the way in.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Iterable, Sequence
from json.encoder import encode_basestring_ascii as _quote  # json.dumps(ensure_ascii=True)'s own
from typing import IO, Any

import numpy as np
import xxhash

from runstate.errors import CorruptCheckpointError
from runstate.format.compress import Compression, Packer, Packing
from runstate.format.tensors import DTYPE_SIZES, TensorBlob

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
#: Tensors smaller than this are copied into one buffer and written with the tensors around them
#: (up to :data:`_GATHER_BYTES` at a time): 10,000 tiny tensors cost a few writes, not 10,000.
_GATHER_BELOW = 64 * 1024
_GATHER_BYTES = 1024 * 1024


class WrittenTensor:
    """Where a tensor landed in its file and the checksum of its (stored) bytes.

    ``packing`` is set for a compressed tensor: it is then stored as ``U8`` of shape
    ``[end - begin]`` and ``packing`` describes the decoded tensor.
    """

    __slots__ = ("begin", "end", "packing", "xxh3")

    def __init__(self, begin: int, end: int, xxh3: str, packing: Packing | None = None) -> None:
        self.begin, self.end, self.xxh3, self.packing = begin, end, xxh3, packing


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
    # Written piece by piece (a few times faster than json.dumps of a dict of dicts, for files of
    # many tiny tensors), to exactly the bytes of
    # json.dumps({"__metadata__": metadata, name: {"dtype", "shape", "data_offsets"}, ...},
    # separators=(",", ":"), ensure_ascii=True): the same string escaping, integers in decimal.
    pieces = ['"__metadata__":' + json.dumps(metadata, separators=(",", ":"), ensure_ascii=True)] if metadata else []
    seen: set[str] = set()
    for name, dtype, shape, begin, end in tensors:
        if name == "__metadata__":  # the encoder never names a tensor so: see RESERVED_TENSOR_NAMES
            raise ValueError("a tensor cannot be named __metadata__, the safetensors header's reserved key")
        if name in seen:
            raise ValueError(f"tensor {name!r} is listed twice")
        seen.add(name)
        dims = ",".join([_integer(d) for d in shape])
        pieces.append(
            f'{_quote(name)}:{{"dtype":{_quote(dtype)},"shape":[{dims}],'
            f'"data_offsets":[{_integer(begin)},{_integer(end)}]}}'
        )
    raw = ("{" + ",".join(pieces) + "}").encode("ascii")
    raw += b" " * (-len(raw) % 8)
    return raw


def _integer(value: int) -> str:
    """An integer as JSON writes it (refusing what json.dumps would refuse, or write otherwise)."""
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return str(value)


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
    f: IO[bytes],
    tensors: Sequence[tuple[str, TensorBlob]],
    metadata: dict[str, str],
    *,
    compression: Compression | None = None,
    plain: frozenset[str] = frozenset(),
) -> tuple[int, dict[str, WrittenTensor]]:
    """Write ``tensors`` as a safetensors file to the binary file ``f``, from its start.

    The caller opens ``f`` and makes it durable (fsync, upload) when closing it. On a real
    file (one with a ``fileno``), the kernel is asked every 8 MiB to
    start writing the pages already written, so the caller's final fsync waits less.

    Args:
        f: the new file.
        tensors: name and blob of each tensor, in file order.
        metadata: the header's ``__metadata__``.
        compression: compress tensors of at least ``compression.min_bytes`` (see
            :func:`write_compressed`); None writes every tensor as it is.
        plain: names never compressed (blocks of sharded tensors).

    Returns:
        The file size and, per tensor name, its data offsets and checksum.
    """
    if compression is not None:
        packed = {n for n, b in tensors if b.nbytes >= compression.min_bytes and n not in plain}
        if packed:
            return write_compressed(f, tensors, metadata, compression, frozenset(packed))
    header = header_bytes(_in_file_order(tensors), metadata)
    written: dict[str, WrittenTensor] = {}
    sink = _Sink(f, f.write(struct.pack("<Q", len(header)) + header) or 0)
    gathered = bytearray()  # consecutive small tensors, written together (one write, not one each)
    offset = 0
    for name, blob in tensors:
        data = blob.read()
        nbytes = data.nbytes
        if nbytes != blob.nbytes:
            raise RuntimeError(f"tensor {name!r} produced {nbytes} bytes, expected {blob.nbytes}")
        digest = checksum(data)
        if nbytes < _GATHER_BELOW:
            gathered += data
            if len(gathered) >= _GATHER_BYTES:
                sink.write(gathered)
                gathered = bytearray()  # a new one: a file object may keep what it was given
        else:
            if gathered:
                sink.write(gathered)
                gathered = bytearray()
            for start in range(0, nbytes, _CHUNK):
                sink.write(data[start : start + _CHUNK])
        written[name] = WrittenTensor(offset, offset + nbytes, digest)
        offset += nbytes
    if gathered:
        sink.write(gathered)
    return 8 + len(header) + offset, written


class _Sink:
    """Writes whole buffers to ``f`` from ``position``, starting the kernel's writeback as it goes."""

    def __init__(self, f: IO[bytes], position: int, *, writeback: bool = True) -> None:
        # no fileno() on a spool: asking for it moves a SpooledTemporaryFile to disk
        self.f, self.fd = f, _fileno(f) if writeback else None
        self.position = self.flushed = position

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            n = self.f.write(view) or 0
            view = view[n:]
            self.position += n
            if self.fd is not None and self.position - self.flushed >= _WRITEBACK_EVERY:
                _start_writeback(self.fd, self.flushed, self.position - self.flushed)
                self.flushed = self.position


def _seekable(f: IO[bytes]) -> bool:
    try:
        return bool(f.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def write_compressed(
    f: IO[bytes],
    tensors: Sequence[tuple[str, TensorBlob]],
    metadata: dict[str, str],
    compression: Compression,
    packed: frozenset[str],
) -> tuple[int, dict[str, WrittenTensor]]:
    """Write a safetensors file in which the tensors named in ``packed`` are zstd-compressed.

    The header must come first but the compressed sizes are known only once written. On a
    seekable file, room is reserved for the header computed with every compressed tensor at
    its largest possible size (its raw size: a piece that does not shrink is stored as is);
    the data is written after it in one pass, then the real header
    is written at the start, padded with spaces to the reserved room (a few bytes per tensor;
    a JSON parser ignores them, and docs/format.md allows them in such a file). On a file that
    cannot seek (an object-store upload), the data section goes through a temporary spool
    (in memory up to 64 MiB, then on disk) and the exact header is written first.
    """
    sizes = [
        (n, "U8", (b.nbytes,)) if n in packed else (n, b.dtype, b.shape)  # a compressed tensor never grows
        for n, b in tensors
    ]
    if _seekable(f):
        room = len(header_bytes(_offsets(sizes), metadata))
        f.seek(8 + room)
        offset, written, stored = _write_data(_Sink(f, 8 + room), tensors, compression, packed)
        header = header_bytes(_offsets(stored), metadata)
        if len(header) > room:  # cannot happen: every stored size is at most its raw size
            raise RuntimeError(f"compressed header needs {len(header)} bytes, {room} were reserved")
        header += b" " * (room - len(header))
        f.seek(0)
        _Sink(f, 0).write(struct.pack("<Q", len(header)) + header)
        f.seek(8 + room + offset)
        return 8 + room + offset, written
    with tempfile.SpooledTemporaryFile(max_size=_CHUNK) as spool:
        offset, written, stored = _write_data(_Sink(spool, 0, writeback=False), tensors, compression, packed)
        header = header_bytes(_offsets(stored), metadata)
        out = _Sink(f, 0)
        out.write(struct.pack("<Q", len(header)) + header)
        spool.seek(0)
        while piece := spool.read(_READ_CHUNK):
            out.write(piece)
    return 8 + len(header) + offset, written


def _write_data(
    sink: _Sink, tensors: Sequence[tuple[str, TensorBlob]], compression: Compression, packed: frozenset[str]
) -> tuple[int, dict[str, WrittenTensor], list[tuple[str, str, Sequence[int]]]]:
    """Write the data section; return its size, where each tensor landed and its stored dtype and shape."""
    with Packer(compression) as packer:  # one pool of threads for every tensor of the file
        return _write_tensors(sink, tensors, packer, packed)


def _write_tensors(
    sink: _Sink, tensors: Sequence[tuple[str, TensorBlob]], packer: Packer, packed: frozenset[str]
) -> tuple[int, dict[str, WrittenTensor], list[tuple[str, str, Sequence[int]]]]:
    written: dict[str, WrittenTensor] = {}
    stored: list[tuple[str, str, Sequence[int]]] = []
    offset = 0
    for name, blob in tensors:
        data = blob.read()
        if data.nbytes != blob.nbytes:
            raise RuntimeError(f"tensor {name!r} produced {data.nbytes} bytes, expected {blob.nbytes}")
        begin = sink.position
        if name in packed:
            hasher = xxhash.xxh3_64()

            def emit(piece: Any, hasher: Any = hasher) -> None:
                hasher.update(piece)
                sink.write(piece)

            packing = packer.compress(np.frombuffer(data, np.uint8), blob.dtype, blob.shape, emit)
            n = sink.position - begin
            written[name] = WrittenTensor(offset, offset + n, hasher.hexdigest(), packing)
            stored.append((name, "U8", (n,)))
        else:
            digest = checksum(data)
            for start in range(0, data.nbytes, _CHUNK):
                sink.write(data[start : start + _CHUNK])
            n = blob.nbytes
            written[name] = WrittenTensor(offset, offset + n, digest)
            stored.append((name, blob.dtype, blob.shape))
        offset += n
    return offset, written, stored


def _offsets(tensors: Sequence[tuple[str, str, Sequence[int]]]) -> Iterable[tuple[str, str, Sequence[int], int, int]]:
    offset = 0
    for name, dtype, shape in tensors:
        n = DTYPE_SIZES[dtype] * math.prod(shape)
        yield name, dtype, shape, offset, offset + n
        offset += n


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
