"""Writing and reading one checkpoint directory.

A save encodes the whole state first (so a value that cannot be stored fails before any
file is created), then streams every item's tensors into safetensors files inside a
temporary directory, writes ``manifest.json`` last and commits the directory with one
rename. A load reads the manifest, checks every safetensors header against it and every
tensor's checksum, and only then hands values back.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from runstate._version import __version__
from runstate.adapters import codec_for_lib, find_codec, object_codecs
from runstate.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsupportedTypeError,
)
from runstate.format.manifest import MANIFEST_NAME, ItemEntry, Manifest, TensorEntry
from runstate.format.safetensors_io import checksum, read_header, read_tensor_bytes, write_safetensors
from runstate.format.tensors import NumpyCodec, TensorBlob
from runstate.format.tree import Decoder, Encoder

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "CheckpointInfo",
    "CheckpointReader",
    "PreparedState",
    "prepare",
    "write_checkpoint",
]

#: Tensor files of one item are split past this size (``model-00001-of-00003.safetensors``).
DEFAULT_SHARD_BYTES = 4 * 1024**3

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a committed checkpoint is, without loading it.

    Attributes:
        step: the training step it was saved at (None for a standalone save without one).
        path: the checkpoint directory.
        created: creation time, ISO-8601 with timezone.
        metrics: the metrics passed to ``save``.
        nbytes: total size of its files in bytes.
    """

    step: int | None
    path: str
    created: str
    metrics: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0


def validate_state(state: Any, action: str) -> None:
    """Check that ``state`` is a dict with string keys."""
    if not isinstance(state, Mapping):
        raise UnsupportedTypeError(
            f"{action}: state must be a dict of named items such as "
            f"{{'model': model, 'optimizer': opt}}, got {type(state).__qualname__}"
        )
    for key in state:
        if type(key) is not str or not key:
            raise UnsupportedTypeError(f"{action}: state keys must be non-empty strings (item names), got {key!r}")


def validate_step(step: Any) -> int:
    """Return ``step`` if it is a non-negative int, else raise ``UnsupportedTypeError``."""
    if type(step) is not int and not (isinstance(step, np.integer)):
        raise UnsupportedTypeError(f"step must be a non-negative int, got {step!r} ({type(step).__qualname__})")
    if step < 0:
        raise UnsupportedTypeError(f"step must be a non-negative int, got {step}")
    return int(step)


def _metric_value(name: str, value: Any) -> Any:
    if value is not None and type(value) not in (int, float, bool, str) and callable(getattr(value, "item", None)):
        with contextlib.suppress(TypeError, ValueError, RuntimeError):  # not a single number: rejected below
            value = value.item()  # a 0-dim tensor or NumPy scalar, e.g. loss.detach()
    if value is None or type(value) in (int, float, bool, str):
        return value
    raise UnsupportedTypeError(
        f"metrics[{name!r}]: must be a number, bool, str or None, got {type(value).__qualname__}"
    )


def _file_names(item: str, n_shards: int, taken: set[str]) -> list[str]:
    """File names for an item's shards, unique (case-insensitively) within the checkpoint."""
    base = _SAFE_NAME.sub("_", item).lstrip(".") or "item"
    candidate, n = base, 1
    while True:
        if n_shards == 1:
            names = [f"{candidate}.safetensors"]
        else:
            names = [f"{candidate}-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
        if not any(name.lower() in taken for name in names):
            taken.update(name.lower() for name in names)
            return names
        n += 1
        candidate = f"{base}_{n}"


def _shards(blobs: list[tuple[str, TensorBlob]], limit: int) -> list[list[tuple[str, TensorBlob]]]:
    shards: list[list[tuple[str, TensorBlob]]] = [[]]
    size = 0
    for name, blob in blobs:
        if shards[-1] and size + blob.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, blob))
        size += blob.nbytes
    return shards


def _versions() -> dict[str, str]:
    versions = {"runstate": __version__, "python": platform.python_version(), "numpy": np.__version__}
    torch = sys.modules.get("torch")
    if torch is not None:
        versions["torch"] = str(torch.__version__)
    return versions


def encode_state(state: Mapping[str, Any]) -> dict[str, tuple[dict[str, Any], Encoder]]:
    """Encode every item to ``(tree, encoder)``; raises before any I/O if a value cannot be stored."""
    objects = object_codecs()
    encoded: dict[str, tuple[dict[str, Any], Encoder]] = {}
    for name, value in state.items():
        enc = Encoder(name, find_codec, objects)
        encoded[name] = (enc.encode(value), enc)
    return encoded


@dataclass
class PreparedState:
    """A state encoded and ready to write: every unsupported value has already raised."""

    items: dict[str, tuple[dict[str, Any], Encoder]]
    metrics: dict[str, Any]
    metrics_node: dict[str, Any]


def prepare(state: Mapping[str, Any], metrics: Mapping[str, Any] | None) -> PreparedState:
    """Validate and encode ``state`` and ``metrics`` without touching the disk."""
    if metrics is not None and not isinstance(metrics, Mapping):
        raise UnsupportedTypeError(f"metrics must be a dict of names to numbers, got {type(metrics).__qualname__}")
    metric_values = {str(k): _metric_value(str(k), v) for k, v in (metrics or {}).items()}
    metrics_node = Encoder("metrics", lambda _v: None, []).encode(metric_values)
    return PreparedState(encode_state(state), metric_values, metrics_node)


def write_checkpoint(
    directory: str,
    prepared: PreparedState,
    *,
    step: int | None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> CheckpointInfo:
    """Write a prepared state into ``directory`` (a hidden temporary directory being built).

    The caller commits the directory; this function only fills it.
    """
    encoded = prepared.items
    taken: set[str] = {MANIFEST_NAME, "manifest.safetensors"}
    files: dict[str, int] = {}
    items: dict[str, ItemEntry] = {}
    for name, (tree, enc) in encoded.items():
        blobs = list(enc.blobs.items())
        entries: dict[str, TensorEntry] = {}
        if blobs:
            shards = _shards(blobs, shard_bytes)
            fnames = _file_names(name, len(shards), taken)
            libs = {b.lib for _, b in blobs}
            metadata = {"format": "pt" if libs == {"torch"} else "np", "runstate_item": name}
            for i, shard in enumerate(shards):
                fname = fnames[i]
                size, written = write_safetensors(os.path.join(directory, fname), shard, metadata)
                files[fname] = size
                for tname, blob in shard:
                    w = written[tname]
                    entries[tname] = TensorEntry(
                        fname, blob.dtype, blob.shape, w.begin, w.end, w.xxh3, blob.lib, blob.meta
                    )
        items[name] = ItemEntry(tree=tree, tensors=entries)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")
    manifest = Manifest(
        step=step,
        created=created,
        metrics=prepared.metrics_node,
        versions=_versions(),
        items=items,
        files=files,
    )
    raw = manifest.to_json_bytes()
    with open(os.path.join(directory, MANIFEST_NAME), "xb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    return CheckpointInfo(step, directory, created, prepared.metrics, manifest.nbytes + len(raw))


def _missing(path: str) -> CheckpointNotFoundError:
    if os.path.isfile(path):
        return CheckpointNotFoundError(
            f"{path} is a file, not a checkpoint directory; pass the directory runstate.save wrote"
        )
    if os.path.isdir(path):
        steps = sorted(n for n in os.listdir(path) if n.startswith("step-"))
        if steps:
            return CheckpointNotFoundError(
                f"{path} is a run directory, not a checkpoint; use CheckpointManager({path!r}).restore(state) "
                f"or pass one of its checkpoints, e.g. {os.path.join(path, steps[-1])}"
            )
        return CheckpointNotFoundError(f"{path} has no {MANIFEST_NAME}; it is not a (committed) runstate checkpoint")
    return CheckpointNotFoundError(f"no checkpoint at {path}")


class CheckpointReader:
    """Reads a committed checkpoint; every tensor is checked against its checksum.

    Use as a context manager so that open files are closed.
    """

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        manifest_path = os.path.join(self.path, MANIFEST_NAME)
        try:
            with open(manifest_path, "rb") as f:
                raw = f.read()
        except (FileNotFoundError, NotADirectoryError):
            raise _missing(self.path) from None
        self.manifest = Manifest.from_json_bytes(raw, manifest_path)
        self.manifest_nbytes = len(raw)
        self._files: dict[str, tuple[IO[bytes], int]] = {}
        self._objects = object_codecs(for_loading=True)

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
        return CheckpointInfo(m.step, self.path, m.created, metrics, m.nbytes + self.manifest_nbytes)

    @staticmethod
    def _no_tensor(name: str) -> Any:
        raise CorruptCheckpointError(f"manifest.json: metrics refer to tensor {name!r}")

    def _open(self, fname: str) -> tuple[IO[bytes], int]:
        if fname in self._files:
            return self._files[fname]
        fpath = os.path.join(self.path, fname)
        expected = self.manifest.files.get(fname)
        if expected is None or os.path.basename(fname) != fname:
            raise CorruptCheckpointError(
                f"{self.path}/{MANIFEST_NAME}: tensor file {fname!r} is not listed in the manifest"
            )
        try:
            f = open(fpath, "rb")  # noqa: SIM115 - kept open across tensors, closed in close()
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{fpath}: file is missing; the checkpoint is incomplete") from None
        size = os.fstat(f.fileno()).st_size
        if size != expected:
            f.close()
            raise CorruptCheckpointError(f"{fpath}: size is {size} bytes, the manifest says {expected}")
        header, data_start = read_header(f, fpath)
        self._check_header(fpath, fname, header, size - data_start)
        self._files[fname] = (f, data_start)
        return f, data_start

    def _check_header(self, fpath: str, fname: str, header: dict[str, Any], data_size: int) -> None:
        listed = {
            (item, tname): e
            for item, entry in self.manifest.items.items()
            for tname, e in entry.tensors.items()
            if e.file == fname
        }
        names = {t for (_, t) in listed}
        in_header = {k for k in header if k != "__metadata__"}
        if in_header != names:
            raise CorruptCheckpointError(
                f"{fpath}: header lists tensors {sorted(in_header ^ names)[:5]} that differ from the manifest"
            )
        end = 0
        for (_, tname), e in listed.items():
            h = header[tname]
            if (
                not isinstance(h, dict)
                or h.get("dtype") != e.dtype
                or h.get("shape") != list(e.shape)
                or h.get("data_offsets") != [e.begin, e.end]
            ):
                raise CorruptCheckpointError(
                    f"{fpath}: header entry of tensor {tname!r} differs from the manifest ({h!r})"
                )
            end = max(end, e.end)
        if end != data_size:
            raise CorruptCheckpointError(f"{fpath}: data section is {data_size} bytes, the tensors need {end}")

    def load_tensor(self, item: str, name: str) -> Any:
        """Read, verify and rebuild one tensor of ``item``."""
        entry = self.manifest.items[item].tensors.get(name)
        if entry is None:
            raise CorruptCheckpointError(
                f"{self.path}/{MANIFEST_NAME}: item {item!r} refers to unknown tensor {name!r}"
            )
        f, data_start = self._open(entry.file)
        fpath = os.path.join(self.path, entry.file)
        data = read_tensor_bytes(f, fpath, data_start, entry.begin, entry.end)
        if checksum(data) != entry.xxh3:
            raise CorruptCheckpointError(
                f"{fpath}: checksum mismatch in tensor {name!r} of item {item!r}; the file is "
                "damaged, restore from another checkpoint"
            )
        codec = codec_for_lib(entry.lib) or NumpyCodec()
        return codec.from_bytes(data, entry.dtype, entry.shape, entry.meta)

    def load_item(self, item: str) -> Any:
        """Decode one item; stateful objects come back as ``StatefulState``."""
        entry = self.manifest.items[item]
        decoder = Decoder(item, lambda name: self.load_tensor(item, name), self._objects)
        return decoder.decode(entry.tree)
