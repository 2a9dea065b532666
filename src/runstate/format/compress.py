"""Optional lossless compression of tensor bytes: zstd per chunk and per byte plane.

Why chunks: a tensor is cut into chunks of :attr:`Compression.chunk_bytes` raw bytes (1 MiB
by default), each compressed on its own. Writing and reading then hold one chunk at a time
besides the tensor itself, chunks are compressed in parallel (one :class:`Packer` per file),
and a reader knows from the (checksummed) index alone how many bytes each stored piece must
decode to: a frame that claims more is refused before anything is allocated for it.

Why byte-grouping: in a float tensor, the sign/exponent byte of neighbouring elements is
nearly constant while the low mantissa bytes are noise. Each chunk of a float tensor is
split into byte planes (every element's byte 0, then every byte 1, ...), each plane stored
as its own piece: the exponent plane compresses to about a third, the noise planes are
recognised from a 16 KiB sample and stored as they are, at memory speed. A piece is a zstd
frame only when that is shorter, so a compressed tensor never grows.

The stored form is still a plain safetensors tensor: ``U8`` of shape ``[stored nbytes]``. Its
index entry's ``xxh3`` covers the stored bytes; the ``compression`` object holds the decoded
tensor's ``dtype``, ``shape``, ``nbytes`` and ``xxh3`` (docs/format.md, "Compression"). The
``zstandard`` package is imported only when compressing or reading a compressed tensor.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import xxhash

from runstate.errors import CheckpointConfigError, UnsupportedTypeError
from runstate.format.tensors import DTYPE_SIZES

__all__ = [
    "CODEC",
    "DEFAULT_LEVEL",
    "Compression",
    "Packer",
    "Packing",
    "compress_tensor",
    "decode_chunks",
    "resolve_compression",
]

CODEC = "zstd"
#: Chosen by benchmarks/bench_compression.py (docs/performance.md, "Compression"): the cheapest
#: level that keeps byte-grouping's gain. Negative levels stop Huffman-coding literals, the only
#: thing that shrinks an exponent plane, so they store floats almost as they are. No level with
#: a gain keeps a local save on 2 busy cores as fast as an uncompressed one (0.3-0.7x measured):
#: compression pays on storage slower than the compressor (object stores, slow disks).
DEFAULT_LEVEL = 1
DEFAULT_CHUNK_BYTES = 1024 * 1024
#: Tensors smaller than this are stored as they are: a frame's overhead would eat the gain.
DEFAULT_MIN_BYTES = 4096
#: Chunk sizes a reader accepts: bounded memory per chunk, and a multiple of every element size.
MIN_CHUNK_BYTES = 64 * 1024
MAX_CHUNK_BYTES = 64 * 1024 * 1024
_CHUNK_MULTIPLE = 16
#: A zstd frame never decodes to more than about 32,500 times its size (a run of one byte):
#: a piece claiming more than twice that is refused, so a small file cannot claim a huge tensor.
MAX_RATIO = 65536
#: A piece whose first SAMPLE_BYTES compress to more than SAMPLE_KEEP of their size is stored
#: as is, without compressing the rest (measured: noise planes cost most of the time otherwise).
SAMPLE_BYTES = 16 * 1024
SAMPLE_KEEP = 0.97
FILTERS = ("none", "bytegroup")
#: Dtype codes byte-grouped by default: floating point, whose bytes differ in predictability.
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "C64"})
_HEX16 = re.compile(r"[0-9a-f]{16}")
_INSTALL_HINT = "pip install runstate[zstd]"


def zstd_module(action: str) -> ModuleType:
    """The ``zstandard`` module, imported on first use.

    Raises:
        UnsupportedTypeError: it is not installed (the message names the pip extra).
    """
    try:
        import zstandard
    except ImportError:
        raise UnsupportedTypeError(
            f"{action} needs the zstandard package, which is not installed; install it with {_INSTALL_HINT}"
        ) from None
    return zstandard


@dataclass(frozen=True)
class Compression:
    """How to compress tensor files: the ``compression=`` option of save and CheckpointManager.

    ``compression="zstd"`` means ``Compression()``. Compression is lossless: a tensor loads
    back bit for bit.

    Attributes:
        level: zstd level, -7 to 19 (default 1: the cheapest level that keeps byte-grouping's
            gain; negative levels store floats almost as they are, higher ones are slower
            and no smaller on training states, docs/performance.md).
        chunk_bytes: raw bytes per independently compressed chunk (64 KiB to 64 MiB,
            a multiple of 16; 1 MiB by default, so that a tensor of a few MiB is compressed
            by several threads).
        byte_grouping: byte-group float tensors before compressing (recommended).
        min_bytes: tensors smaller than this are stored uncompressed.
        threads: chunks compressed at the same time, across the tensors of a file; 0 picks
            ``min(4, cpu count)``. The bytes written do not depend on it.

    Raises:
        CheckpointConfigError: an option is out of range.

    Example:
        >>> runstate.save("ckpt", state, compression=runstate.Compression(level=3))  # doctest: +SKIP
    """

    level: int = DEFAULT_LEVEL
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    byte_grouping: bool = True
    min_bytes: int = DEFAULT_MIN_BYTES
    threads: int = 0

    def __post_init__(self) -> None:
        if type(self.level) is not int or not -7 <= self.level <= 19:
            raise CheckpointConfigError(f"Compression.level must be an int from -7 to 19, got {self.level!r}")
        chunk = self.chunk_bytes
        if type(chunk) is not int or not MIN_CHUNK_BYTES <= chunk <= MAX_CHUNK_BYTES or chunk % _CHUNK_MULTIPLE:
            raise CheckpointConfigError(
                f"Compression.chunk_bytes must be a multiple of {_CHUNK_MULTIPLE} from {MIN_CHUNK_BYTES} to "
                f"{MAX_CHUNK_BYTES}, got {chunk!r}"
            )
        if type(self.byte_grouping) is not bool:
            raise CheckpointConfigError(f"Compression.byte_grouping must be a bool, got {self.byte_grouping!r}")
        if type(self.min_bytes) is not int or self.min_bytes < 1:
            raise CheckpointConfigError(f"Compression.min_bytes must be a positive int, got {self.min_bytes!r}")
        if type(self.threads) is not int or not 0 <= self.threads <= 64:
            raise CheckpointConfigError(f"Compression.threads must be an int from 0 to 64, got {self.threads!r}")

    @property
    def workers(self) -> int:
        """How many chunks are compressed at the same time."""
        return self.threads or min(4, os.cpu_count() or 1)


def resolve_compression(option: str | Compression | None) -> Compression | None:
    """The ``compression=`` option as a :class:`Compression` (None: no compression).

    Checked when the option is given, so that a save never starts with a codec it cannot use.

    Raises:
        CheckpointConfigError: an unknown value, or the zstandard package is missing.
    """
    if option is None:
        return None
    if isinstance(option, str) and option == CODEC:
        option = Compression()
    if not isinstance(option, Compression):
        raise CheckpointConfigError(f"compression must be None, 'zstd' or a runstate.Compression(...), got {option!r}")
    try:
        zstd_module("compression='zstd'")
    except UnsupportedTypeError as exc:
        raise CheckpointConfigError(str(exc)) from None
    return option


@dataclass(frozen=True)
class Packing:
    """The ``compression`` object of a compressed tensor's index entry.

    Attributes:
        level: the zstd level used (informational).
        filter: ``"bytegroup"`` or ``"none"``.
        chunk: raw bytes per chunk (the last one may be shorter).
        chunks: stored size of every piece, in order: chunk by chunk, and within a chunk
            one piece per byte plane (``bytegroup``) or one for the whole chunk (``none``).
            A piece as long as its raw bytes is stored as is; a shorter one is a zstd frame.
        dtype: dtype code of the decoded bytes.
        shape: shape of the decoded tensor.
        nbytes: number of decoded bytes.
        xxh3: XXH3-64 of the decoded bytes.
    """

    level: int
    filter: str
    chunk: int
    chunks: tuple[int, ...]
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    xxh3: str

    @property
    def itemsize(self) -> int:
        """Bytes per element of the decoded dtype (the byte-group width)."""
        return DTYPE_SIZES[self.dtype]

    @property
    def planes(self) -> int:
        """Pieces per chunk: one per byte plane when byte-grouped, else one."""
        return self.itemsize if self.filter == "bytegroup" else 1

    def pieces(self) -> Iterator[tuple[int, int, int]]:
        """``(chunk start, raw piece size, stored size)`` of every piece, in order."""
        sizes = iter(self.chunks)
        for start in range(0, self.nbytes, self.chunk):
            raw = min(self.chunk, self.nbytes - start) // self.planes
            for _ in range(self.planes):
                yield start, raw, next(sizes)

    def to_json(self) -> dict[str, Any]:
        return {
            "codec": CODEC,
            "level": self.level,
            "filter": self.filter,
            "chunk": self.chunk,
            "chunks": list(self.chunks),
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "xxh3": self.xxh3,
        }

    @classmethod
    def from_json(cls, obj: Any, stored: int) -> Packing:
        """Parse and check a ``compression`` object whose stored bytes number ``stored``.

        Every size a reader will allocate or decode is checked here, against the other sizes
        of the (checksummed) entry, so no frame can make the reader allocate more than the
        index says.

        Raises:
            ValueError: a field is missing, of the wrong type, or inconsistent.
        """
        if not isinstance(obj, dict):
            raise ValueError("compression is not an object")
        if obj.get("codec") != CODEC:
            raise ValueError(f"unknown compression codec {str(obj.get('codec'))[:40]!r}")
        level, filt, chunk = obj["level"], obj["filter"], obj["chunk"]
        if type(level) is not int or filt not in FILTERS:
            raise ValueError(f"compression level {level!r} or filter {str(filt)[:40]!r} is not valid")
        if type(chunk) is not int or not MIN_CHUNK_BYTES <= chunk <= MAX_CHUNK_BYTES or chunk % _CHUNK_MULTIPLE:
            raise ValueError(f"compression chunk {chunk!r} is not a valid chunk size")
        dtype, shape, nbytes, digest = obj["dtype"], obj["shape"], obj["nbytes"], obj["xxh3"]
        if dtype not in DTYPE_SIZES:
            raise ValueError(f"compression dtype {str(dtype)[:40]!r} is unknown")
        if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**63 for d in shape)):
            raise ValueError("compression shape is not a list of sizes")
        if type(nbytes) is not int or nbytes != math.prod(shape) * DTYPE_SIZES[dtype] or nbytes >= 2**63:
            raise ValueError(f"compression nbytes {nbytes!r} does not fit shape {shape[:8]} of {dtype}")
        if not (isinstance(digest, str) and _HEX16.fullmatch(digest)):
            raise ValueError("compression xxh3 is not 16 lowercase hex digits")
        planes = DTYPE_SIZES[dtype] if filt == "bytegroup" else 1
        count = -(-nbytes // chunk) * planes
        sizes = obj["chunks"]
        if not isinstance(sizes, list) or len(sizes) != count:
            raise ValueError(
                f"compression has {len(sizes) if isinstance(sizes, list) else '?'} pieces, "
                f"{nbytes} bytes in chunks of {chunk} with {planes} piece(s) each need {count}"
            )
        if nbytes % planes:
            raise ValueError(f"compression nbytes {nbytes} is not a whole number of {planes}-byte elements")
        for i, size in enumerate(sizes):
            raw = min(chunk, nbytes - i // planes * chunk) // planes
            if type(size) is not int or not 1 <= size <= raw or size * MAX_RATIO < raw:
                raise ValueError(f"compression piece {i} has an impossible stored size {size!r} for {raw} bytes")
        if sum(sizes) != stored:
            raise ValueError(f"compression pieces add up to {sum(sizes)} bytes, the stored tensor has {stored}")
        return cls(level, filt, chunk, tuple(sizes), dtype, tuple(shape), nbytes, digest)


#: Little-endian unsigned words of each byte-grouped element size.
_WORDS: dict[int, np.dtype[Any]] = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


def _group(piece: np.ndarray, itemsize: int, out: np.ndarray) -> np.ndarray:
    """Byte planes of ``piece``: byte 0 of every element, then byte 1, ... (into ``out``).

    Plane ``j`` is every element's word shifted right by ``8 j`` and cast to a byte: one
    vectorised pass per plane, 1.4-1.7x faster than numpy's strided copy of the transpose.
    """
    n = piece.size // itemsize
    dst = out[: piece.size]
    planes = dst.reshape(itemsize, n)
    words = piece.view(_WORDS[itemsize])
    for j in range(itemsize):
        np.right_shift(words, 8 * j, out=planes[j], casting="unsafe")
    return dst


def _ungroup(planes: np.ndarray, itemsize: int, out: np.ndarray) -> None:
    """The inverse of :func:`_group`: interleave byte planes back into elements (into ``out``)."""
    n = planes.size // itemsize
    rows, cols = planes.reshape(itemsize, n), out.reshape(n, itemsize)
    for j in range(itemsize):  # one column at a time: ~4x faster than one transposed copy
        cols[:, j] = rows[j]


def _pack(cctx: Any, piece: np.ndarray) -> bytes | np.ndarray:
    """One stored piece: a zstd frame when it is shorter than ``piece``, else ``piece`` itself.

    A sample from the start decides first: a piece whose first :data:`SAMPLE_BYTES` barely
    compress (the low mantissa bytes of floats are noise) is stored as is without spending
    a full compression on it.
    """
    if piece.size > 2 * SAMPLE_BYTES and len(cctx.compress(piece[:SAMPLE_BYTES])) > SAMPLE_BYTES * SAMPLE_KEEP:
        return piece
    frame: bytes = cctx.compress(piece)
    return frame if len(frame) < piece.size else piece


def _compressor(zstd: ModuleType, level: int, planes: bool) -> Any:
    """A zstd compressor for ``level``; for byte planes at the fast levels, tuned for them.

    A float's exponent plane holds a few dozen distinct bytes and few long repeats: zstd's
    Huffman coding of literals does the work, so looking only for matches of 7 bytes in a
    64-entry hash table is 1.2-2.2x faster at an equal or better ratio (measured on AdamW
    moments and bf16 weights, benchmarks/bench_compression.py). At negative levels zstd stops
    Huffman-coding literals, so a byte plane then barely shrinks, but fast. The output is a
    standard zstd frame either way.
    """
    if not planes or level > 2:
        return zstd.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
    params = zstd.ZstdCompressionParameters.from_level(level, min_match=7, hash_log=6, write_content_size=1)
    return zstd.ZstdCompressor(compression_params=params)


class Packer:
    """Compresses the tensors of one file, chunk by chunk, on a pool of threads.

    One pool, one zstd context per thread and per kind (planes or whole chunks), and a fixed
    set of byte-grouping buffers serve every tensor of the file: nothing is created per chunk.
    Chunks are compressed :attr:`window` at a time and their pieces handed to ``emit`` in
    order, so the output is the same bytes whatever the number of threads (zstd compresses a
    piece the same way in any thread), and memory stays ``window`` chunks plus their frames.
    ``zstandard``, numpy's ufuncs and xxhash release the GIL, so the threads really run at once
    while the calling thread writes. A tensor of one chunk is compressed by the calling thread.

    Example:
        >>> with Packer(Compression()) as packer:  # doctest: +SKIP
        ...     packing = packer.compress(data, "F32", (1024, 1024), out.write)
    """

    def __init__(self, options: Compression) -> None:
        self.options = options
        self._zstd = zstd_module("compression='zstd'")
        workers = options.workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="runstate-zstd") if workers > 1 else None
        #: chunks in flight: one per thread, and the one the caller is writing
        self.window = workers + 1 if workers > 1 else 1
        self._local = threading.local()
        self._buffers: list[np.ndarray] = []  # byte-grouping buffers not in use
        #: byte-grouping buffers allocated so far: at most :attr:`window`
        self.buffers_made = 0

    def __enter__(self) -> Packer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the threads (after the chunks in flight; compress() has drained them already)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _cctx(self, planes: bool) -> Any:
        """This thread's compressor for whole chunks or for byte planes."""
        key = "planes" if planes else "chunks"
        cctx = getattr(self._local, key, None)
        if cctx is None:
            cctx = _compressor(self._zstd, self.options.level, planes)
            setattr(self._local, key, cctx)
        return cctx

    def _submit(
        self, pool: ThreadPoolExecutor, piece: np.ndarray, itemsize: int, buf: np.ndarray | None
    ) -> Future[list[bytes | np.ndarray]]:
        """Compress a chunk on the pool; in this thread when the pool takes no more work.

        At interpreter exit, ``concurrent.futures`` refuses new work (``RuntimeError``) before
        an async save still in flight is finished: that save must still complete.
        """
        try:
            return pool.submit(self._chunk, piece, itemsize, buf)
        except RuntimeError:
            fut: Future[list[bytes | np.ndarray]] = Future()
            try:
                fut.set_result(self._chunk(piece, itemsize, buf))
            except Exception as exc:
                fut.set_exception(exc)
            return fut

    def _buffer(self) -> np.ndarray:
        if self._buffers:
            return self._buffers.pop()
        self.buffers_made += 1
        return np.empty(self.options.chunk_bytes, np.uint8)

    def _chunk(self, piece: np.ndarray, itemsize: int, buf: np.ndarray | None) -> list[bytes | np.ndarray]:
        """The stored pieces of one chunk (runs in a pool thread)."""
        if buf is None:
            return [_pack(self._cctx(False), piece)]
        cctx = self._cctx(True)
        return [_pack(cctx, plane) for plane in _group(piece, itemsize, buf).reshape(itemsize, -1)]

    def compress(self, data: np.ndarray, dtype: str, shape: tuple[int, ...], emit: Callable[[Any], None]) -> Packing:
        """Compress one tensor's bytes, handing each stored piece to ``emit`` in order.

        Args:
            data: the tensor's raw bytes (1-D uint8, C order, little-endian).
            dtype: its dtype code; float codes are byte-grouped when the options say so.
            shape: its shape, recorded for the reader.
            emit: writes one stored piece (bytes or a uint8 array, valid only during the call).

        Returns:
            The entry's ``compression`` object.
        """
        options = self.options
        itemsize = DTYPE_SIZES[dtype]
        group = options.byte_grouping and dtype in FLOAT_CODES and itemsize > 1
        chunk = options.chunk_bytes
        raw_hash = xxhash.xxh3_64()
        sizes: list[int] = []

        def done(start: int, buf: np.ndarray | None, stored: list[bytes | np.ndarray]) -> None:
            raw_hash.update(data[start : start + chunk].data)
            for piece in stored:
                sizes.append(len(piece))
                emit(piece)
            if buf is not None:
                self._buffers.append(buf)

        starts = range(0, data.size, chunk)
        pool = self._pool if len(starts) > 1 else None
        if pool is None:
            for start in starts:
                buf = self._buffer() if group else None
                done(start, buf, self._chunk(data[start : start + chunk], itemsize, buf))
        else:
            pending: deque[tuple[int, np.ndarray | None, Future[list[bytes | np.ndarray]]]] = deque()
            try:
                for start in starts:
                    if len(pending) >= self.window:
                        done(*_result(pending.popleft()))
                    buf = self._buffer() if group else None
                    pending.append((start, buf, self._submit(pool, data[start : start + chunk], itemsize, buf)))
                while pending:
                    done(*_result(pending.popleft()))
            finally:  # an emit that raised: let the chunks in flight finish before their buffers go
                for _start, buf, fut in pending:
                    if not fut.cancel():
                        wait([fut])
                    if buf is not None:
                        self._buffers.append(buf)
        return Packing(
            options.level,
            "bytegroup" if group else "none",
            chunk,
            tuple(sizes),
            dtype,
            shape,
            int(data.size),
            raw_hash.hexdigest(),
        )


def _result(
    item: tuple[int, np.ndarray | None, Future[list[bytes | np.ndarray]]],
) -> tuple[int, np.ndarray | None, list[bytes | np.ndarray]]:
    start, buf, fut = item
    return start, buf, fut.result()


def compress_tensor(
    data: np.ndarray, dtype: str, shape: tuple[int, ...], options: Compression, emit: Callable[[Any], None]
) -> Packing:
    """Compress one tensor with a :class:`Packer` of its own (see :meth:`Packer.compress`).

    A file of several tensors should share one Packer: its threads and buffers then serve
    every tensor.
    """
    with Packer(options) as packer:
        return packer.compress(data, dtype, shape, emit)


class DecodeError(Exception):
    """A piece does not decode to the size the index gives it (damage or a crafted file)."""


def decode_chunks(packing: Packing, read: Callable[[int], memoryview], out: np.ndarray | None) -> Iterator[np.ndarray]:
    """Decode a compressed tensor chunk by chunk, yielding each chunk's decoded bytes.

    The caller hashes what it reads and what is yielded. A piece whose stored size equals its
    raw size is copied; any other is a zstd frame that must declare exactly the raw size the
    index implies before it is decoded, and decode to exactly that: a frame that lies (a
    decompression bomb) is refused having allocated at most one piece.

    Args:
        packing: the entry's checked ``compression`` object.
        read: returns the next ``n`` stored bytes (exactly ``n``).
        out: where the decoded tensor goes (``packing.nbytes`` uint8), or None to decode
            into a scratch chunk only (verification).

    Raises:
        DecodeError: a frame is malformed or decodes to the wrong size.
    """
    zstd = zstd_module("reading a zstd-compressed checkpoint")
    dctx = zstd.ZstdDecompressor()
    grouped = packing.planes > 1
    scratch = np.empty(min(packing.chunk, packing.nbytes), np.uint8)
    planes = np.empty(min(packing.chunk, packing.nbytes), np.uint8) if grouped else scratch
    pieces = packing.pieces()
    for i, start in enumerate(range(0, packing.nbytes, packing.chunk)):
        raw = min(packing.chunk, packing.nbytes - start)
        target = out[start : start + raw] if out is not None else scratch[:raw]
        dest = planes[:raw] if grouped else target
        for p in range(packing.planes):
            _start, n, stored = next(pieces)
            frame = read(stored)
            if stored == n:  # stored as is
                dest[p * n : (p + 1) * n] = np.frombuffer(frame, np.uint8)
                continue
            try:
                declared = zstd.get_frame_parameters(frame).content_size
            except zstd.ZstdError as exc:
                raise DecodeError(f"chunk {i}, piece {p}: not a zstd frame ({exc})") from None
            if declared != n:
                raise DecodeError(f"chunk {i}, piece {p}: frame declares {declared} bytes, the index says {n}")
            try:
                decoded = dctx.decompress(frame, max_output_size=n, allow_extra_data=False)  # one frame, nothing after
            except zstd.ZstdError as exc:
                raise DecodeError(f"chunk {i}, piece {p}: cannot be decompressed ({exc})") from None
            if len(decoded) != n:
                raise DecodeError(f"chunk {i}, piece {p}: decoded to {len(decoded)} bytes, the index says {n}")
            dest[p * n : (p + 1) * n] = np.frombuffer(decoded, np.uint8)
        if grouped:
            _ungroup(dest, packing.itemsize, target)
        yield target
