"""Reading a committed checkpoint, treating every byte as untrusted.

Checkpoints may come from strangers, so nothing read is believed before it is checked: the
manifest's own checksum and schema (with size limits), every file name (a plain name inside
the checkpoint directory, never a symlink), every safetensors header against the manifest
(dtype, shape, offsets inside the file, contiguous, not overlapping), and every tensor's
XXH3 checksum. Whatever goes wrong surfaces as ``CorruptCheckpointError``, never as an
exception from deep inside a parser. Nothing here can run code from the checkpoint: class
names in the manifest are informational and never imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import IO, Any

import numpy as np

from runstate.adapters import codec_for_lib, object_codecs
from runstate.checkpoint import CheckpointInfo
from runstate.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedTypeError
from runstate.format.manifest import MANIFEST_NAME, ChunkedTensor, Manifest, TensorEntry
from runstate.format.safetensors_io import checksum, file_metadata, header_bytes, read_header, read_tensor_bytes
from runstate.format.tensors import DTYPE_SIZES, NumpyCodec
from runstate.format.tree import Decoder
from runstate.storage import Store, open_store

__all__ = ["MAX_MANIFEST_BYTES", "CheckpointReader", "read_manifest_bytes"]

#: A manifest larger than this is refused (a real one is a few MB for a large model).
MAX_MANIFEST_BYTES = 1024**3


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
    if os.path.isfile(path):
        return CheckpointNotFoundError(
            f"{path} is a file, not a checkpoint directory; pass the directory runstate.save wrote"
        )
    if os.path.isdir(path):
        steps_found = sorted(n for n in os.listdir(path) if n.startswith("step-"))
        if steps_found:
            return CheckpointNotFoundError(
                f"{path} is a run directory, not a checkpoint; use CheckpointManager({path!r}).restore(state) "
                f"or pass one of its checkpoints, e.g. {os.path.join(path, steps_found[-1])}"
            )
        return CheckpointNotFoundError(f"{path} has no {MANIFEST_NAME}; it is not a (committed) runstate checkpoint")
    return CheckpointNotFoundError(f"no checkpoint at {path}")


def read_manifest_bytes(store: Store) -> bytes:
    """The raw ``manifest.json`` of the checkpoint at ``store``, refused when implausibly large.

    Raises:
        CheckpointNotFoundError: there is no manifest.
        CorruptCheckpointError: it is not a regular file, or too large.
    """
    try:
        f, size = store.open_read(MANIFEST_NAME)
    except FileNotFoundError:
        raise _missing(store) from None
    with f:
        if size > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(
                f"{store.join(MANIFEST_NAME)}: {size} bytes is implausibly large", file=MANIFEST_NAME
            )
        return f.read(size)  # never read(LIMIT): a buffered read allocates its whole argument up front


class CheckpointReader:
    """Reads a committed checkpoint; every tensor is checked against its checksum.

    Use as a context manager so that open files are closed.

    Args:
        path: the checkpoint: a local directory, a URL (``s3://bucket/run/step-...``) or a Store.
        storage_options: fsspec options for a URL.
        manifest: the manifest's bytes, when they are not (yet) stored with the files: used to
            read a checkpoint back before it is committed.

    Raises:
        CheckpointNotFoundError: ``path`` has no manifest.
        CorruptCheckpointError: the manifest is damaged or malformed.
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
        self._files: dict[str, tuple[IO[bytes], int]] = {}
        self._objects = object_codecs(for_loading=True)
        #: Values already loaded by other means, by ``(item, tensor name)``: sharded tensors
        #: read into their live placement through torch.distributed.checkpoint.
        self.preloaded: dict[tuple[str, str], Any] = {}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every open tensor file."""
        for f, _ in self._files.values():
            f.close()
        self._files.clear()

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
        """Open a tensor file, checking its size and header; return it and its data offset."""
        if fname in self._files:
            return self._files[fname]
        fpath = self.store.join(fname)
        expected = self.manifest.files[fname]
        try:
            f, size = self.store.open_read(fname)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{fpath}: file is missing; the checkpoint is incomplete", file=fname) from None
        except CorruptCheckpointError:
            raise
        except OSError as exc:
            raise CorruptCheckpointError(f"{fpath}: cannot be read ({exc})", file=fname) from exc
        try:
            if size != expected:
                raise CorruptCheckpointError(f"{fpath}: size is {size} bytes, the manifest says {expected}", file=fname)
            try:
                header, data_start, raw = read_header(f, fpath, size)
            except CorruptCheckpointError as exc:
                exc.file = fname
                raise
            self._check_header(fpath, fname, header, raw, size - data_start)
        except BaseException:
            f.close()
            raise
        self._files[fname] = (f, data_start)
        return f, data_start

    def _check_header(self, fpath: str, fname: str, header: dict[str, Any], raw: bytes, data_size: int) -> None:
        owners = {
            item: [(tname, e) for tname, e in entry.tensors.items() if e.file == fname]
            for item, entry in self.manifest.items.items()
        }
        owners = {item: tensors for item, tensors in owners.items() if tensors}
        if len(owners) != 1:
            raise CorruptCheckpointError(
                f"{fpath}: the manifest puts tensors of {len(owners)} items in this file, a tensor file holds "
                "the tensors of exactly one item",
                file=fname,
            )
        ((item, tensors),) = owners.items()
        listed = dict(tensors)
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
        if raw != expected:
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
        entry = self.entry(item, name)
        f, data_start = self.open_file(entry.file)
        fpath = self.store.join(entry.file)
        try:
            data = read_tensor_bytes(f, fpath, data_start, entry.begin, entry.end)
        except CorruptCheckpointError as exc:
            exc.file, exc.tensor = entry.file, name
            raise
        if checksum(data) != entry.xxh3:
            raise CorruptCheckpointError(
                f"{fpath}: checksum mismatch in tensor {name!r} of item {item!r}; the file is "
                "damaged, restore from another checkpoint",
                file=entry.file,
                tensor=name,
            )
        return data

    def load_tensor(self, item: str, name: str) -> Any:
        """Read, verify and rebuild one tensor of ``item`` (a chunked one is assembled whole)."""
        if (item, name) in self.preloaded:
            return self.preloaded[item, name]
        chunked = self.manifest.items[item].chunks.get(name)
        if chunked is not None:
            return self._load_chunked(item, name, chunked)
        data = self.read_verified(item, name)
        entry = self.entry(item, name)
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
        whole = np.zeros((*chunked.shape, size), dtype=np.uint8)
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
        """Decode one item; stateful objects come back as ``StatefulState``."""
        entry = self.manifest.items[item]
        decoder = Decoder(item, lambda name: self.load_tensor(item, name), self._objects)
        return decoder.decode(entry.tree)
