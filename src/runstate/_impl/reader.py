"""Reading a committed checkpoint, treating every byte as untrusted.

Checkpoints may come from strangers, so nothing read is believed before it is checked: the
manifest's own checksum and schema (with size limits), every file name (a plain name inside
the checkpoint directory, never a symlink), every safetensors header against the manifest
(dtype, shape, offsets inside the file, contiguous, not overlapping), and every tensor's
XXH3 checksum. Whatever goes wrong with the bytes surfaces as ``CorruptCheckpointError``,
never as an exception from deep inside a parser. Nothing here can run code from the
checkpoint: class names in the manifest are informational and never imported.

What goes wrong around the bytes is not damage: running out of file descriptors or memory,
an I/O, network or permission error is a ``CheckpointReadError``, so that no caller skips or
moves aside an intact checkpoint because of it. Tensor files are opened when needed and at
most :data:`MAX_OPEN_FILES` stay open, so a checkpoint of any number of files reads under
any open-file limit.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import IO, Any, TypeVar

import numpy as np
import xxhash

from runstate._impl.parallel_reads import MIN_BYTES, Range, read_file_and_hash, read_ranges
from runstate._impl.pipeline import CheckpointInfo
from runstate.adapters import codec_for_lib, empty_bytes, object_codecs
from runstate.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CorruptCheckpointError,
    UnsupportedTypeError,
)
from runstate.format.compress import DecodeError, Packing, decode_chunks
from runstate.format.depth import stack_room
from runstate.format.manifest import MANIFEST_NAME, ChunkedTensor, Manifest, TensorEntry
from runstate.format.safetensors_io import (
    checksum_range,
    file_metadata,
    header_bytes,
    read_header,
)
from runstate.format.tensors import DTYPE_SIZES, NumpyCodec
from runstate.format.tree import Decoder
from runstate.storage import Store, open_store

__all__ = ["MAX_MANIFEST_BYTES", "MAX_OPEN_FILES", "CheckpointReader", "read_manifest_bytes"]

#: A manifest larger than this is refused (a real one is a few MB for a large model).
MAX_MANIFEST_BYTES = 1024**3

#: Tensor files a reader keeps open at once; the least recently used is closed past this.
MAX_OPEN_FILES = 16

# OS errors that say something about the checkpoint's entries (missing, not a regular file,
# a symlink refused by O_NOFOLLOW): damage. Any other OS error (EMFILE, ENFILE, ENOMEM, EIO,
# EACCES, ETIMEDOUT...) is about the machine, not the checkpoint.
_ENTRY_ERRNOS = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENXIO, errno.ENODEV, errno.ENAMETOOLONG}
)

_T = TypeVar("_T")

# Files whose descriptor can be read directly (with preadv, by several threads).
_PLAIN_FILES = (io.BufferedReader, io.FileIO)

#: Tensors of at least this many bytes are read into their framework's own memory (which a live
#: tensor may then take over instead of copying it); smaller ones into a NumPy array (cheaper to make).
FRAMEWORK_MEMORY_FROM = 16 << 10


def _buffer(lib: str, nbytes: int) -> np.ndarray:
    """A new uint8 array of ``nbytes`` to read a tensor tagged ``lib`` into."""
    return empty_bytes(lib, nbytes) if nbytes >= FRAMEWORK_MEMORY_FROM else np.empty(nbytes, dtype=np.uint8)


def _read_error(where: str, exc: BaseException) -> CheckpointReadError:
    if isinstance(exc, MemoryError):
        code, what = errno.ENOMEM, "not enough memory"
    else:
        code, what = getattr(exc, "errno", None) or 0, getattr(exc, "strerror", None) or repr(exc)
    return CheckpointReadError(
        code,
        f"{where}: cannot be read ({what}); this is not damage to the checkpoint: "
        "fix the cause (open-file limit, memory, disk, network, permissions) and read it again",
    )


def _prefixed(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


def _environment_error(exc: BaseException) -> BaseException | None:
    """The OS or memory error behind ``exc`` when it is not about the checkpoint's content."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, MemoryError):
            return exc
        if isinstance(exc, OSError) and not isinstance(exc, (CorruptCheckpointError, CheckpointNotFoundError)):
            return exc if exc.errno not in _ENTRY_ERRNOS and not isinstance(exc, FileNotFoundError) else None
        exc = exc.__cause__  # type: ignore[assignment]
        seen += 1
    return None


def _guarded(where: str, read: Callable[[], _T]) -> _T:
    """Run ``read``, turning an OS or memory error that is not damage into ``CheckpointReadError``."""
    try:
        return read()
    except CheckpointReadError:
        raise
    except CorruptCheckpointError as exc:  # a store may wrap any OS error as damage: look at the cause
        cause = _environment_error(exc.__cause__) if exc.__cause__ is not None else None
        if cause is not None:
            raise _read_error(where, cause) from cause
        raise
    except CheckpointNotFoundError:
        raise
    except (OSError, MemoryError) as exc:
        if _environment_error(exc) is None:
            raise
        raise _read_error(where, exc) from exc


def _missing(store: Store) -> CheckpointNotFoundError:
    path = store.location
    if not store.is_local:
        steps = store.list_committed()
        if steps:
            return CheckpointNotFoundError(
                f"{path} is a run directory, not a checkpoint; use CheckpointManager({path!r}).restore(state) "
                f"or pass one of its checkpoints, e.g. {steps[max(steps)]}"
            )
        return CheckpointNotFoundError(f"no checkpoint at {path} (no committed {MANIFEST_NAME} there)")
    kind = store.kind()
    if kind == "file":
        return CheckpointNotFoundError(
            f"{path} is a file, not a checkpoint directory; pass the directory runstate.save wrote"
        )
    if kind == "directory":
        steps_found = [n for n in store.list_names() if n.startswith("step-")]
        if steps_found:
            return CheckpointNotFoundError(
                f"{path} is a run directory, not a checkpoint; use CheckpointManager({path!r}).restore(state) "
                f"or pass one of its checkpoints, e.g. {store.join(steps_found[-1])}"
            )
        return CheckpointNotFoundError(f"{path} has no {MANIFEST_NAME}; it is not a (committed) runstate checkpoint")
    return CheckpointNotFoundError(f"no checkpoint at {path}")


def _padded_header(raw: bytes, expected: bytes, entries: Any) -> bool:
    """True for the header of a file holding compressed tensors: the canonical header followed
    by spaces (room the writer reserved before it knew the compressed sizes)."""
    return (
        any("compression" in e.meta for e in entries)
        and len(raw) % 8 == 0
        and raw.startswith(expected)
        and raw[len(expected) :].strip(b" ") == b""
    )


def _decode(
    f: IO[bytes], fpath: str, start: int, packing: Packing, whole: bool
) -> tuple[str, str, DecodeError | None, np.ndarray | None]:
    """Stream a compressed tensor's frames from ``start`` through the decoder.

    Returns:
        The XXH3 of the stored bytes read and of the decoded bytes, the decode failure (the
        stored hash is then partial), and the decoded tensor (None unless ``whole``).
    """
    out = np.empty(packing.nbytes, np.uint8) if whole else None
    buf = np.empty(max(packing.chunks, default=0), np.uint8)
    stored, decoded = xxhash.xxh3_64(), xxhash.xxh3_64()
    f.seek(start)

    def read(n: int) -> memoryview:
        view = buf.data[:n]
        got = 0
        while got < n:
            k = f.readinto(view[got:])  # type: ignore[attr-defined]
            if not k:
                raise CorruptCheckpointError(f"{fpath}: file is truncated inside a compressed tensor")
            got += k
        stored.update(view)
        return view

    try:
        for piece in decode_chunks(packing, read, out):
            decoded.update(piece.data)
    except DecodeError as exc:
        return stored.hexdigest(), decoded.hexdigest(), exc, None
    return stored.hexdigest(), decoded.hexdigest(), None, out


def read_manifest_bytes(store: Store) -> bytes:
    """The raw ``manifest.json`` of the checkpoint at ``store``, refused when implausibly large.

    Raises:
        CheckpointNotFoundError: there is no manifest.
        CorruptCheckpointError: it is not a regular file, or too large.
    """
    where = store.join(MANIFEST_NAME)
    try:
        f, size = _guarded(where, lambda: store.open_read(MANIFEST_NAME))
    except FileNotFoundError:
        raise _missing(store) from None
    with f:
        if size > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(f"{where}: {size} bytes is implausibly large", file=MANIFEST_NAME)
        # never read(LIMIT): a buffered read allocates its whole argument up front
        return _guarded(where, lambda: f.read(size))


class CheckpointReader:
    """Reads a committed checkpoint; every tensor is checked against its checksum.

    Use as a context manager so that open files are closed (and so that walking a tree of
    the deepest kind has enough Python stack, whatever the caller's depth). Files are opened
    when a tensor in them is read; at most :data:`MAX_OPEN_FILES` stay open.

    Args:
        path: the checkpoint: a local directory, a URL (``s3://bucket/run/step-...``) or a Store.
        storage_options: fsspec options for a URL.
        manifest: the manifest's bytes, when they are not (yet) stored with the files: used to
            read a checkpoint back before it is committed.

    Raises:
        CheckpointNotFoundError: ``path`` has no manifest.
        CorruptCheckpointError: the manifest is damaged or malformed.
        CheckpointReadError: the manifest cannot be read for a reason that is not damage.
        FormatVersionError: the checkpoint needs a newer runstate.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | Store,
        *,
        storage_options: Mapping[str, Any] | None = None,
        manifest: bytes | None = None,
    ) -> None:
        self.store = open_store(path, storage_options=storage_options)
        self.path = self.store.location
        raw = read_manifest_bytes(self.store) if manifest is None else manifest
        self.manifest = Manifest.from_json_bytes(raw, self.store.join(MANIFEST_NAME))
        self.manifest_nbytes = len(raw)
        self._files: OrderedDict[str, tuple[IO[bytes], int]] = OrderedDict()  # least recently used first
        self._by_file: dict[str, dict[str, dict[str, TensorEntry]]] | None = None
        self._headers: dict[str, bytes] = {}  # header bytes already checked, by file
        self._blob_area: Store | None = None
        self._rooms: list[AbstractContextManager[None]] = []
        self._objects = object_codecs(for_loading=True)
        #: Tensors read ahead by :meth:`load_item`, by ``(item, tensor name)``: bytes and XXH3, not yet checked.
        self._staged: dict[tuple[str, str], Future[tuple[np.ndarray, str]]] = {}
        #: Values already loaded by other means, by ``(item, tensor name)``: sharded tensors
        #: read into their live placement through torch.distributed.checkpoint.
        self.preloaded: dict[tuple[str, str], Any] = {}

    def __enter__(self) -> CheckpointReader:
        room = stack_room()  # what reads a tree (restore, plain) recurses once per level
        room.__enter__()
        self._rooms.append(room)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        finally:
            if self._rooms:
                self._rooms.pop().__exit__(None, None, None)

    def close(self) -> None:
        """Close every open tensor file."""
        while self._files:
            _, (f, _start) = self._files.popitem(last=False)
            f.close()

    def info(self) -> CheckpointInfo:
        """The checkpoint's :class:`CheckpointInfo`."""
        m = self.manifest
        metrics = Decoder("metrics", self._no_tensor, []).decode(m.metrics)
        if not isinstance(metrics, dict):
            raise CorruptCheckpointError(f"{self.path}/{MANIFEST_NAME}: metrics is not a dict", file=MANIFEST_NAME)
        return CheckpointInfo(m.step, self.path, m.created, metrics, m.nbytes + self.manifest_nbytes)

    @staticmethod
    def _no_tensor(name: str) -> Any:
        raise CorruptCheckpointError(f"manifest.json: metrics refer to tensor {name!r}", file=MANIFEST_NAME)

    def open_file(self, fname: str) -> tuple[IO[bytes], int]:
        """Open a tensor file, checking its size and header; return it and its data offset.

        On a local disk the file stays open until :data:`MAX_OPEN_FILES` others have been
        opened after it (or :meth:`close`): use it before the next call. A file opened again
        is checked again, cheaply: its header must be the bytes already checked.

        Raises:
            CorruptCheckpointError: the file is missing, not a regular file, of the wrong
                size, or its header differs from the manifest.
            CheckpointReadError: it cannot be opened or read for a reason that is not damage.
        """
        if fname in self._files:
            self._files.move_to_end(fname)
            return self._files[fname]
        in_blobs = fname in self.manifest.blobs  # in the run's blob area, not in the checkpoint
        store = self.blob_area() if in_blobs else self.store
        fpath = store.join(fname)
        expected = self.manifest.blobs[fname] if in_blobs else self.manifest.files[fname]
        while self.store.is_local and len(self._files) >= MAX_OPEN_FILES:  # object stores hold no descriptors
            _, (old, _start) = self._files.popitem(last=False)
            old.close()
        try:
            f, size = _guarded(fpath, lambda: store.open_read(fname))
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{fpath}: file is missing; the checkpoint is incomplete", file=fname) from None
        except (CorruptCheckpointError, CheckpointReadError):
            raise
        except OSError as exc:
            raise CorruptCheckpointError(f"{fpath}: cannot be read ({exc})", file=fname) from exc
        try:
            if size != expected:
                raise CorruptCheckpointError(f"{fpath}: size is {size} bytes, the manifest says {expected}", file=fname)
            known = self._headers.get(fname)
            if known is not None and _guarded(fpath, lambda: f.read(8 + len(known))) == _prefixed(known):
                data_start = 8 + len(known)
            else:
                f.seek(0)
                try:
                    header, data_start, raw = _guarded(fpath, lambda: read_header(f, fpath, size))
                except CorruptCheckpointError as exc:
                    exc.file = fname
                    raise
                if in_blobs:
                    self._check_blob_header(fpath, fname, header, size - data_start)
                else:
                    self._check_header(fpath, fname, header, raw, size - data_start)
                self._headers[fname] = raw
        except BaseException:
            f.close()
            raise
        self._files[fname] = (f, data_start)
        return f, data_start

    def blob_area(self) -> Store:
        """The store of the run's blob area, where the files listed in ``blobs`` are."""
        if self._blob_area is None:
            self._blob_area = self.store.blob_area()
        return self._blob_area

    def location_of(self, fname: str) -> str:
        """Where the tensor file ``fname`` of the manifest is (the checkpoint, or the run's blob area)."""
        return self.blob_area().join(fname) if fname in self.manifest.blobs else self.store.join(fname)

    def _check_blob_header(self, fpath: str, fname: str, header: dict[str, Any], data_size: int) -> None:
        """Check the header of a blob: it may hold tensors this checkpoint does not use (they
        changed since it was written), so only the tensors it uses are compared with the manifest;
        every tensor it lists must lie inside its data section, which they fill exactly."""
        owners = self._owners(fname)
        if len(owners) != 1:
            raise CorruptCheckpointError(
                f"{fpath}: the manifest puts tensors of {len(owners)} items in this blob, a tensor file holds "
                "the tensors of exactly one item",
                file=fname,
            )
        ((_item, listed),) = owners.items()
        end = 0
        for tname, h in header.items():
            if tname == "__metadata__":
                continue
            offsets = h.get("data_offsets") if isinstance(h, dict) else None
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
                raise CorruptCheckpointError(f"{fpath}: header entry of {tname!r} has no offsets", file=fname)
            if not 0 <= offsets[0] <= offsets[1] <= data_size:
                raise CorruptCheckpointError(f"{fpath}: tensor {tname!r} lies outside the data section", file=fname)
            end = max(end, offsets[1])
        if end != data_size:
            raise CorruptCheckpointError(f"{fpath}: data section is {data_size} bytes, the tensors need {end}", file=fname)
        for tname, e in listed.items():
            h = header.get(tname)
            if (
                not isinstance(h, dict)
                or h.get("dtype") != e.dtype
                or h.get("shape") != list(e.shape)
                or h.get("data_offsets") != [e.begin, e.end]
            ):
                raise CorruptCheckpointError(
                    f"{fpath}: header entry of tensor {tname!r} differs from the manifest", file=fname, tensor=tname
                )

    def _owners(self, fname: str) -> dict[str, dict[str, TensorEntry]]:
        """The tensors the manifest puts in ``fname``, by item (computed once for all files)."""
        if self._by_file is None:
            by_file: dict[str, dict[str, dict[str, TensorEntry]]] = {}
            for item, entry in self.manifest.items.items():
                for tname, e in entry.tensors.items():
                    by_file.setdefault(e.file, {}).setdefault(item, {})[tname] = e
            self._by_file = by_file
        return self._by_file.get(fname, {})

    def _check_header(self, fpath: str, fname: str, header: dict[str, Any], raw: bytes, data_size: int) -> None:
        owners = self._owners(fname)
        if len(owners) != 1:
            raise CorruptCheckpointError(
                f"{fpath}: the manifest puts tensors of {len(owners)} items in this file, a tensor file holds "
                "the tensors of exactly one item",
                file=fname,
            )
        ((item, listed),) = owners.items()
        in_header = {k for k in header if k != "__metadata__"}
        if in_header != set(listed):
            raise CorruptCheckpointError(
                f"{fpath}: header lists tensors {sorted(in_header ^ set(listed))[:5]} that differ from the manifest",
                file=fname,
            )
        end = 0
        for tname, e in sorted(listed.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
            h = header[tname]
            if (
                not isinstance(h, dict)
                or h.get("dtype") != e.dtype
                or h.get("shape") != list(e.shape)
                or h.get("data_offsets") != [e.begin, e.end]
            ):
                raise CorruptCheckpointError(
                    f"{fpath}: header entry of tensor {tname!r} differs from the manifest", file=fname, tensor=tname
                )
            if e.begin != end:
                raise CorruptCheckpointError(
                    f"{fpath}: tensor {tname!r} starts at {e.begin}, expected {end} (gap or overlap)",
                    file=fname,
                    tensor=tname,
                )
            end = e.end
        if end != data_size:
            raise CorruptCheckpointError(
                f"{fpath}: data section is {data_size} bytes, the tensors need {end}", file=fname
            )
        # No checksum covers the header itself, so it must be byte for byte the one the
        # (checksummed) manifest implies: this catches damage to __metadata__ and padding too.
        # Tensors are taken in the header's own order: the manifest's key order may change.
        libs = (e.lib for e in self.manifest.items[item].tensors.values())
        in_file = ((t, listed[t].dtype, listed[t].shape, listed[t].begin, listed[t].end) for t in header if t in listed)
        expected = header_bytes(in_file, file_metadata(item, libs))
        if raw != expected and not _padded_header(raw, expected, listed.values()):
            raise CorruptCheckpointError(
                f"{fpath}: header bytes differ from the ones the manifest implies (damaged metadata, "
                "formatting or padding)",
                file=fname,
            )

    def entry(self, item: str, name: str) -> TensorEntry:
        """The index entry of one tensor of ``item``."""
        entry = self.manifest.items[item].tensors.get(name)
        if entry is None:
            raise CorruptCheckpointError(
                f"{self.path}/{MANIFEST_NAME}: item {item!r} refers to unknown tensor {name!r}",
                file=MANIFEST_NAME,
                tensor=name,
            )
        return entry

    def read_verified(self, item: str, name: str) -> Any:
        """Read one tensor's bytes and check them against the checksum; return a uint8 array."""
        return self._read(item, name, whole=True)

    def verify_tensor(self, item: str, name: str) -> int:
        """Check one tensor's bytes against its checksum, hashing them as a stream.

        Memory stays small whatever the tensor's size: nothing is built from the bytes.

        Returns:
            The number of bytes checked.

        Raises:
            CorruptCheckpointError: the bytes are missing or their checksum differs.
            CheckpointReadError: they cannot be read for a reason that is not damage.
        """
        self._read(item, name, whole=False)
        entry = self.entry(item, name)
        return entry.end - entry.begin

    def _read(self, item: str, name: str, *, whole: bool) -> Any:
        entry = self.entry(item, name)
        staged = self._staged.pop((item, name), None) if whole else None
        fpath = self.location_of(entry.file)
        data: Any = None
        try:
            if staged is not None:  # read ahead by load_item, its file opened and checked then
                data, digest = staged.result()
            else:
                f, data_start = self.open_file(entry.file)
                if "compression" in entry.meta:
                    return self._read_compressed(item, name, entry, f, fpath, data_start, whole=whole)
                if whole:
                    data = _guarded(fpath, lambda: _buffer(entry.lib, entry.end - entry.begin))
                    digest = _guarded(fpath, lambda: read_file_and_hash(f, data_start + entry.begin, data, fpath))
                else:
                    digest = _guarded(fpath, lambda: checksum_range(f, fpath, data_start, entry.begin, entry.end))
        except CorruptCheckpointError as exc:
            if exc.file is None:
                exc.file, exc.tensor = entry.file, name
            raise
        if digest != entry.xxh3:
            raise CorruptCheckpointError(
                f"{fpath}: checksum mismatch in tensor {name!r} of item {item!r}; the file is "
                "damaged, restore from another checkpoint",
                file=entry.file,
                tensor=name,
            )
        return data

    def _read_compressed(
        self, item: str, name: str, entry: TensorEntry, f: IO[bytes], fpath: str, data_start: int, *, whole: bool
    ) -> Any:
        """Read and decode a compressed tensor chunk by chunk (docs/format.md, "Compression").

        Both checksums are checked: the stored bytes' (``xxh3``) and the decoded bytes'
        (``compression.xxh3``). Nothing decoded is returned unless both match. Memory: the
        decoded tensor (when ``whole``) plus one stored and one decoded chunk.
        """
        packing = Packing.from_json(entry.meta["compression"], entry.end - entry.begin)  # checked at parse
        try:
            stored, decoded, failure, out = _guarded(
                fpath, lambda: _decode(f, fpath, data_start + entry.begin, packing, whole)
            )
            if failure is not None:  # a frame that does not decode: are the stored bytes damaged?
                stored = _guarded(fpath, lambda: checksum_range(f, fpath, data_start, entry.begin, entry.end))
        except CorruptCheckpointError as exc:
            exc.file, exc.tensor = entry.file, name
            raise
        if stored != entry.xxh3:
            raise CorruptCheckpointError(
                f"{fpath}: checksum mismatch in the compressed bytes of tensor {name!r} of item {item!r}; the "
                "file is damaged, restore from another checkpoint",
                file=entry.file,
                tensor=name,
            )
        if failure is not None or decoded != packing.xxh3:
            why = f"do not decode ({failure})" if failure is not None else "decode to bytes whose checksum differs"
            raise CorruptCheckpointError(
                f"{fpath}: the compressed bytes of tensor {name!r} of item {item!r} match their checksum but {why}; "
                "the checkpoint was written wrong or crafted, restore from another checkpoint",
                file=entry.file,
                tensor=name,
            )
        return out

    def load_tensor(self, item: str, name: str) -> Any:
        """Read, verify and rebuild one tensor of ``item`` (a chunked one is assembled whole)."""
        if (item, name) in self.preloaded:
            return self.preloaded[item, name]
        chunked = self.manifest.items[item].chunks.get(name)
        if chunked is not None:
            return self._load_chunked(item, name, chunked)
        data = self.read_verified(item, name)
        entry = self.entry(item, name).decoded()
        codec = codec_for_lib(entry.lib) or NumpyCodec()
        try:
            return codec.from_bytes(data, entry.dtype, entry.shape, entry.meta)
        except UnsupportedTypeError:
            raise
        except (ValueError, TypeError, RuntimeError, AttributeError) as exc:
            raise CorruptCheckpointError(
                f"{self.path}/{entry.file}: tensor {name!r} cannot be rebuilt from its index entry ({exc})",
                file=entry.file,
                tensor=name,
            ) from exc

    def _load_chunked(self, item: str, name: str, chunked: ChunkedTensor) -> Any:
        """Assemble a tensor saved in parts by several processes into one whole tensor."""
        size = DTYPE_SIZES[chunked.dtype]
        whole = _guarded(f"{self.path}: chunked tensor {name!r}", lambda: np.zeros((*chunked.shape, size), np.uint8))
        for offsets, part in chunked.parts:
            entry = self.entry(item, part)
            block = self.read_verified(item, part).reshape((*entry.shape, size))
            whole[tuple(slice(o, o + n) for o, n in zip(offsets, entry.shape, strict=True))] = block
        codec = codec_for_lib(chunked.lib) or NumpyCodec()
        try:
            return codec.from_bytes(whole.reshape(-1), chunked.dtype, chunked.shape, chunked.meta)
        except UnsupportedTypeError:
            raise
        except (ValueError, TypeError, RuntimeError, AttributeError) as exc:
            raise CorruptCheckpointError(
                f"{self.path}: chunked tensor {name!r} of item {item!r} cannot be rebuilt ({exc})", tensor=name
            ) from exc

    def load_item(self, item: str) -> Any:
        """Decode one item; stateful objects come back as ``StatefulState``.

        The item's tensors of a local checkpoint are read first, several at a time (see
        :mod:`runstate._impl.parallel_reads`); each is still checked when the tree takes it.
        """
        entry = self.manifest.items[item]
        self._read_ahead(item)
        try:
            decoder = Decoder(item, lambda name: self.load_tensor(item, name), self._objects)
            return decoder.decode(entry.tree)
        finally:
            for key in [k for k in self._staged if k[0] == item]:
                del self._staged[key]  # the tree did not use them (or failed first): drop the bytes

    def _read_ahead(self, item: str) -> None:
        """Read the uncompressed tensors of ``item`` at once into :attr:`_staged` (local files only).

        A file that cannot be opened or whose header is wrong is not read ahead: its tensors
        are read one by one later, which raises the same error at the same point of the tree.
        """
        if not self.store.is_local or not hasattr(os, "preadv"):
            return
        tensors = self.manifest.items[item].tensors
        wanted = [
            (name, e)
            for name, e in tensors.items()
            if "compression" not in e.meta and (item, name) not in self.preloaded and e.end > e.begin
        ]
        if sum(e.end - e.begin for _, e in wanted) < MIN_BYTES:
            return
        fds: dict[str, tuple[int, int] | None] = {}
        ranges: list[Range] = []
        try:
            for name, e in sorted(wanted, key=lambda ne: (ne[1].file, ne[1].begin)):
                if e.file not in fds:
                    fds[e.file] = self._duplicate(e.file) if len(fds) < MAX_OPEN_FILES else None
                opened = fds[e.file]
                if opened is not None:
                    fd, data_start = opened
                    empty = functools.partial(_buffer, e.lib)
                    where = self.location_of(e.file)
                    ranges.append(Range(name, fd, data_start + e.begin, e.end - e.begin, where, empty))
            for name, future in read_ranges(ranges, _guarded).items():
                self._staged[item, name] = future
        finally:
            for opened in fds.values():
                if opened is not None:
                    os.close(opened[0])

    def _duplicate(self, fname: str) -> tuple[int, int] | None:
        """A descriptor of its own for tensor file ``fname`` (opened and checked), and its data offset;
        None when it cannot be opened or checked (the tensor-by-tensor read reports why)."""
        try:
            f, data_start = self.open_file(fname)
            if type(f) not in _PLAIN_FILES:  # a store's own file object: read through it, one by one
                return None
            return os.dup(f.fileno()), data_start
        except (CheckpointError, OSError, ValueError):
            return None
