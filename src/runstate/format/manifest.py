"""``manifest.json``: the one file that says what a checkpoint holds.

It carries the format version, step, creation time, metrics, library versions, the typed
tree of every item and the tensor index (file, dtype, shape, offsets, XXH3 checksum per
tensor). Its own ``checksum`` field is the XXH3-64 of the canonical JSON of everything
else, so an edit or a flipped byte is detected before anything is trusted.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from runstate.errors import CorruptCheckpointError, FormatVersionError
from runstate.format.compress import Packing
from runstate.format.depth import stack_room
from runstate.format.gcpause import gc_paused
from runstate.format.tensors import DTYPE_SIZES
from runstate.format.tree import RESERVED_TENSOR_NAMES

__all__ = [
    "BLOBS_FEATURE",
    "FEATURES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "ZSTD_FEATURE",
    "ChunkedTensor",
    "ItemEntry",
    "Manifest",
    "RankInfo",
    "TensorEntry",
    "item_from_json",
    "manifest_version",
    "per_rank_name",
]

FORMAT_NAME = "runstate"
#: The highest format version this runstate reads (and writes, when a feature needs it).
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"

#: Feature name of references to tensor files in the run's ``blobs/`` area (incremental checkpoints).
BLOBS_FEATURE = "blobs"
#: Feature name of zstd-compressed tensors (an index entry with a ``compression`` object).
ZSTD_FEATURE = "zstd"
#: Every ``requires`` entry this runstate reads (docs/format.md section 11).
FEATURES = frozenset({BLOBS_FEATURE, ZSTD_FEATURE})


def manifest_version(requires: set[str] | frozenset[str] | tuple[str, ...]) -> int:
    """The ``format_version`` a manifest gets: 1 when it uses no feature of version 2, else 2.

    A checkpoint that needs nothing new is written exactly as before (version 1), so every
    runstate reads it; one that does says so (version 2 and its ``requires`` list), so that
    an older runstate refuses it before misreading it.
    """
    return 2 if requires else 1

_ENTRY_FIELDS = ("file", "dtype", "shape", "data_offsets", "xxh3", "lib")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the index: where its bytes are and how to check and rebuild them."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    xxh3: str
    lib: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "data_offsets": [self.begin, self.end],
            "xxh3": self.xxh3,
            "lib": self.lib,
            **self.meta,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TensorEntry:
        """Parse one index entry, checking that it is self-consistent.

        Raises:
            ValueError: a field has the wrong type, or the sizes do not add up.
        """
        meta = {k: v for k, v in obj.items() if k not in _ENTRY_FIELDS}
        begin, end = obj["data_offsets"]
        entry = cls(
            file=_str(obj["file"]),
            dtype=_str(obj["dtype"]),
            shape=tuple(_count(s) for s in obj["shape"]),
            begin=_count(begin),
            end=_count(end),
            xxh3=_str(obj["xxh3"]),
            lib=_str(obj["lib"]),
            meta=meta,
        )
        size = DTYPE_SIZES.get(entry.dtype)
        if size is None:
            raise ValueError(f"unknown dtype {entry.dtype!r}")
        if entry.end - entry.begin != math.prod(entry.shape) * size:
            raise ValueError(f"data_offsets {[begin, end]} do not fit shape {list(entry.shape)} of {entry.dtype}")
        if not _is_plain_file_name(entry.file):
            raise ValueError(f"file name {entry.file!r} is not a plain .safetensors name inside the checkpoint")
        view = entry
        if "compression" in meta:  # stored as U8 [stored nbytes]; the object describes the decoded tensor
            if entry.dtype != "U8" or entry.shape != (entry.end - entry.begin,):
                raise ValueError(f"a compressed tensor is stored as U8 [nbytes], not {entry.dtype} {list(entry.shape)}")
            Packing.from_json(meta["compression"], entry.end - entry.begin)
            view = entry.decoded()
        if "lib_dtype" in meta or "lib_shape" in meta:
            _check_raw_bytes(view)
        return entry

    def decoded(self) -> TensorEntry:
        """This entry as its decoded bytes: itself, unless compressed (docs/format.md, "Compression").

        For a compressed tensor: the decoded ``dtype``, ``shape`` and ``xxh3``, with offsets
        ``[0, nbytes)`` of the decoded bytes, and ``meta`` without ``compression``.
        """
        packed = self.meta.get("compression")
        if packed is None:
            return self
        meta = {k: v for k, v in self.meta.items() if k != "compression"}
        shape = tuple(packed["shape"])
        return TensorEntry(self.file, packed["dtype"], shape, 0, packed["nbytes"], packed["xxh3"], self.lib, meta)


@dataclass(frozen=True)
class ChunkedTensor:
    """A tensor saved in pieces by several processes (a sharded ``DTensor``).

    Each part is an ordinary entry of the item's ``tensors`` index holding the block that
    starts at ``offsets`` of the whole tensor; together the parts cover it exactly once.

    Attributes:
        dtype: safetensors dtype code of every part.
        shape: the shape of the whole tensor.
        lib: the codec that rebuilds it.
        parts: ``(offsets, tensor name)`` per part.
        meta: extra fields copied from the parts (``device``...).
    """

    dtype: str
    shape: tuple[int, ...]
    lib: str
    parts: tuple[tuple[tuple[int, ...], str], ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "lib": self.lib,
            "parts": [{"offsets": list(o), "tensor": t} for o, t in self.parts],
            **self.meta,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], tensors: dict[str, TensorEntry]) -> ChunkedTensor:
        """Parse one chunked entry; every part must be an index entry of the right place and size.

        Raises:
            ValueError: a part is unknown, outside the tensor, of another dtype, or the
                parts do not cover the tensor exactly once.
        """
        meta = {k: v for k, v in obj.items() if k not in ("dtype", "shape", "lib", "parts")}
        shape = tuple(_count(s) for s in obj["shape"])
        parts = []
        for part in obj["parts"]:
            offsets = tuple(_count(o) for o in part["offsets"])
            parts.append((offsets, _str(part["tensor"])))
        chunked = cls(_str(obj["dtype"]), shape, _str(obj["lib"]), tuple(parts), meta)
        if chunked.dtype not in DTYPE_SIZES:
            raise ValueError(f"unknown dtype {chunked.dtype!r}")
        total = 0
        for offsets, name in chunked.parts:
            entry = tensors.get(name)
            if entry is None:
                raise ValueError(f"part {name!r} is not in the tensor index")
            if "compression" in entry.meta:
                raise ValueError(f"part {name!r} is compressed; blocks of sharded tensors are stored as they are")
            if entry.dtype != chunked.dtype or len(entry.shape) != len(shape) or len(offsets) != len(shape):
                raise ValueError(f"part {name!r} does not have the dtype and rank of its tensor")
            if any(o + s > d for o, s, d in zip(offsets, entry.shape, shape, strict=True)):
                raise ValueError(f"part {name!r} at {list(offsets)} lies outside shape {list(shape)}")
            total += math.prod(entry.shape)
        if total != math.prod(shape) or not _disjoint(chunked.parts, tensors):
            raise ValueError(f"the parts of a {list(shape)} tensor do not cover it exactly once")
        return chunked


def _disjoint(parts: tuple[tuple[tuple[int, ...], str], ...], tensors: dict[str, TensorEntry]) -> bool:
    """True when no two non-empty parts overlap (with the volume check: they tile the tensor).

    A sweep along the first dimension: each part is compared only with the parts still
    open there, so the usual one-dimensional shardings cost O(n log n).
    """
    boxes = sorted((o, tensors[name].shape) for o, name in parts if math.prod(tensors[name].shape))
    if not boxes or not boxes[0][0]:
        return len(boxes) <= 1  # scalars: at most one part
    open_boxes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for off, shape in boxes:
        open_boxes = [(o, s) for o, s in open_boxes if o[0] + s[0] > off[0]]
        for o, s in open_boxes:
            if all(a < b + bs and b < a + as_ for a, as_, b, bs in zip(off, shape, o, s, strict=True)):
                return False
        open_boxes.append((off, shape))
    return True


@dataclass(frozen=True)
class ItemEntry:
    """One top-level item of the state: its typed tree and its tensors.

    ``chunks`` holds the tensors saved in parts by several processes; a tree's tensor node
    names either an entry of ``tensors`` or one of ``chunks``.
    """

    tree: dict[str, Any]
    tensors: dict[str, TensorEntry]
    chunks: dict[str, ChunkedTensor] = field(default_factory=dict)


@dataclass(frozen=True)
class RankInfo:
    """How a checkpoint written by several processes is laid out.

    Attributes:
        world_size: the number of processes that wrote it.
        per_rank: items saved once per process; rank ``r``'s copy of item ``x`` is stored
            as item ``x@rank<r>``.
    """

    world_size: int
    per_rank: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "per_rank": list(self.per_rank)}


def per_rank_name(item: str, rank: int) -> str:
    """The stored name of rank ``rank``'s copy of a per-rank item."""
    return f"{item}@rank{rank}"


RANK_SUFFIX = re.compile(r"@rank\d+$")


def item_name(stored: str) -> str:
    """The item a stored name belongs to: ``x`` for ``x@rank<r>`` (the inverse of :func:`per_rank_name`)."""
    return RANK_SUFFIX.sub("", stored)


@dataclass(frozen=True)
class Manifest:
    """The parsed contents of ``manifest.json``."""

    step: int | None
    created: str
    metrics: dict[str, Any]
    versions: dict[str, str]
    items: dict[str, ItemEntry]
    files: dict[str, int]
    format_version: int = 1
    ranks: RankInfo | None = None
    #: Tensor files in the run's ``blobs/`` area that this checkpoint refers to, with their sizes.
    blobs: dict[str, int] = field(default_factory=dict)
    #: The blobs this checkpoint wrote itself (the others were written by an earlier checkpoint).
    own_blobs: frozenset[str] = frozenset()
    #: Features needed to read it, besides :data:`BLOBS_FEATURE` (implied by ``blobs``).
    requires: tuple[str, ...] = ()

    @property
    def nbytes(self) -> int:
        """Total size of the tensor files in bytes (the checkpoint's own and the referenced blobs)."""
        return sum(self.files.values()) + sum(self.blobs.values())

    @property
    def features(self) -> tuple[str, ...]:
        """The sorted ``requires`` list written into the manifest (empty for a version-1 checkpoint)."""
        compressed = any("compression" in e.meta for it in self.items.values() for e in it.tensors.values())
        implied = ({BLOBS_FEATURE} if self.blobs else set()) | ({ZSTD_FEATURE} if compressed else set())
        return tuple(sorted(set(self.requires) | implied))

    def to_json_bytes(self) -> bytes:
        """Serialize, adding the checksum of the canonical form."""
        with gc_paused():  # a few objects per tensor, all alive until the end
            return self._to_json_bytes()

    def _to_json_bytes(self) -> bytes:
        requires = self.features
        body: dict[str, Any] = {"format": FORMAT_NAME, "format_version": manifest_version(requires)}
        if requires:
            body["requires"] = list(requires)
        body |= {
            "step": self.step,
            "created": self.created,
            "metrics": self.metrics,
            "versions": self.versions,
            "items": {
                name: {
                    "tree": item.tree,
                    "tensors": {k: e.to_json() for k, e in item.tensors.items()},
                    **({"chunks": {k: c.to_json() for k, c in item.chunks.items()}} if item.chunks else {}),
                }
                for name, item in self.items.items()
            },
            "files": {name: {"nbytes": n} for name, n in self.files.items()},
        }
        if self.blobs:
            body["blobs"] = {
                name: {"nbytes": n, **({"own": True} if name in self.own_blobs else {})}
                for name, n in self.blobs.items()
            }
        if self.ranks is not None:
            body["ranks"] = self.ranks.to_json()
        with stack_room():  # the typed trees nest up to MAX_TREE_DEPTH levels, json recurses
            body["checksum"] = _canonical_checksum(body)
            return json.dumps(body, ensure_ascii=True, allow_nan=False).encode("ascii") + b"\n"

    @classmethod
    def from_json_bytes(cls, raw: bytes, path: str) -> Manifest:
        """Parse and validate a manifest read from ``path``.

        Raises:
            CorruptCheckpointError: unreadable JSON, a wrong checksum or a malformed field.
            FormatVersionError: the checkpoint needs a newer runstate.
        """
        with stack_room(), gc_paused():  # json recurses once per nesting level of the typed trees
            return cls._parse(raw, path)

    @classmethod
    def _parse(cls, raw: bytes, path: str) -> Manifest:
        body = _checked_body(raw, path)
        try:
            step = body["step"]
            if step is not None and type(step) is not int:
                raise TypeError("step is not an integer")
            items = {}
            for name, item in body["items"].items():
                try:
                    items[str(name)] = item_from_json(item)
                except (KeyError, TypeError, ValueError) as exc:
                    raise ValueError(f"item {str(name)[:200]!r}: {exc}") from exc
            ranks = _ranks_from_json(body["ranks"], items) if "ranks" in body else None
            blobs, own = _blobs_from_json(body.get("blobs", {}), body.get("requires", []))
            if ZSTD_FEATURE not in body.get("requires", []) and any(
                "compression" in e.meta for it in items.values() for e in it.tensors.values()
            ):
                raise ValueError(f'a tensor is compressed but "requires" does not name {ZSTD_FEATURE!r}')
            files = _files_from_json(body["files"], items, blobs)
            metrics = body["metrics"]
            if not isinstance(metrics, dict):
                raise TypeError("metrics is not an object")
            return cls(
                step=step,
                created=_str(body["created"]),
                metrics=metrics,
                versions={_str(k): _str(v) for k, v in body["versions"].items()},
                items=items,
                files=files,
                format_version=body["format_version"],
                ranks=ranks,
                blobs=blobs,
                own_blobs=own,
                requires=tuple(r for r in body.get("requires", []) if r != BLOBS_FEATURE),
            )
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
            raise CorruptCheckpointError(f"{path}: malformed manifest field ({exc!r})", file=MANIFEST_NAME) from exc


def _checked_body(raw: bytes, path: str) -> dict[str, Any]:
    """The manifest's JSON object, once it is a runstate manifest this version reads and its
    checksum matches (removed from the returned object); the fields are checked by the caller.

    Raises:
        CorruptCheckpointError: unreadable JSON, not a runstate manifest, a wrong checksum.
        FormatVersionError: the checkpoint needs a newer runstate.
    """
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, absurd nesting, 4300+ digit numbers
        raise CorruptCheckpointError(
            f"{path}: not valid JSON ({exc}); the manifest is damaged, use another checkpoint",
            file=MANIFEST_NAME,
        ) from exc
    if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError(f'{path}: not a runstate manifest (no "format": "runstate")', file=MANIFEST_NAME)
    version = body.get("format_version")
    if type(version) is not int:
        raise CorruptCheckpointError(f"{path}: format_version is missing or not an integer", file=MANIFEST_NAME)
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{path}: written with format version {version}, but this runstate reads up to "
            f"version {FORMAT_VERSION}; upgrade runstate (pip install -U runstate)"
        )
    requires = body.get("requires", [])
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise CorruptCheckpointError(f"{path}: requires is not a list of feature names", file=MANIFEST_NAME)
    unknown = sorted(set(requires) - FEATURES)
    if unknown:
        raise FormatVersionError(
            f"{path}: needs the format feature(s) {unknown}, which this runstate does not know; "
            "upgrade runstate (pip install -U runstate)"
        )
    stored = body.pop("checksum", None)
    try:
        computed = _canonical_checksum(body)
    except (ValueError, RecursionError):  # NaN/Infinity literals or absurd nesting
        computed = None
    if computed is None or stored != computed:
        raise CorruptCheckpointError(
            f"{path}: manifest checksum mismatch (stored {stored!r}); the manifest was "
            "edited or damaged, use another checkpoint",
            file=MANIFEST_NAME,
        )
    return body


def _ranks_from_json(field_value: Any, items: dict[str, ItemEntry]) -> RankInfo:
    """The ``ranks`` field; every per-rank item must have a copy of every rank."""
    ranks = RankInfo(_count(field_value["world_size"]), tuple(_str(x) for x in field_value["per_rank"]))
    if ranks.world_size < 1:
        raise ValueError("ranks.world_size must be at least 1")
    for name in ranks.per_rank:
        missing = [r for r in range(ranks.world_size) if per_rank_name(name, r) not in items]
        if missing:
            raise ValueError(f"per-rank item {name!r} has no copy of rank(s) {missing[:5]}")
    return ranks


def _blobs_from_json(field_value: Any, requires: list[str]) -> tuple[dict[str, int], frozenset[str]]:
    """The ``blobs`` field (files in the run's ``blobs/`` area) and the names marked ``own``."""
    if not isinstance(field_value, dict):
        raise TypeError("blobs is not an object")
    blobs = {_str(k): _count(v["nbytes"]) for k, v in field_value.items()}
    own = frozenset(_str(k) for k, v in field_value.items() if v.get("own", False) is True)
    if blobs and BLOBS_FEATURE not in requires:
        raise ValueError(f'blobs are listed but "requires" does not name {BLOBS_FEATURE!r}')
    for name in blobs:
        if not _is_plain_file_name(name):
            raise ValueError(f"blob name {name!r} is not a plain .safetensors name inside the blobs area")
    return blobs, own


def _files_from_json(field_value: Any, items: dict[str, ItemEntry], blobs: dict[str, int]) -> dict[str, int]:
    """The ``files`` field: plain file names inside the checkpoint, naming every tensor's file
    (or the ``blobs`` table does: a name is in one of them, never both)."""
    files = {_str(k): _count(v["nbytes"]) for k, v in field_value.items()}
    for name in files:
        if not _is_plain_file_name(name):
            raise ValueError(f"file name {name!r} is not a plain .safetensors name inside the checkpoint")
        if name in blobs:
            raise ValueError(f"{name!r} is listed both in files and in blobs")
    for item_name, item_entry in items.items():
        if not isinstance(item_entry.tree, dict):
            raise TypeError(f"item {item_name!r}: tree is not an object")
        for tname, entry in item_entry.tensors.items():
            if entry.file not in files and entry.file not in blobs:
                raise ValueError(f"tensor {tname!r} of item {item_name!r} is in unlisted file {entry.file!r}")
    return files


def item_from_json(item: dict[str, Any]) -> ItemEntry:
    # a TensorEntry already built (a part merged in the process that wrote it) is taken as is
    tensors = {str(k): e if isinstance(e, TensorEntry) else TensorEntry.from_json(e) for k, e in item["tensors"].items()}
    reserved = RESERVED_TENSOR_NAMES & set(tensors)
    if reserved:
        raise ValueError(f"tensor name {sorted(reserved)[0]!r} is reserved by safetensors")
    chunks = {}
    for k, c in item.get("chunks", {}).items():
        try:
            chunks[str(k)] = ChunkedTensor.from_json(c, tensors)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"chunked tensor {str(k)[:200]!r}: {exc}") from exc
    if set(chunks) & set(tensors):
        raise ValueError(f"names {sorted(set(chunks) & set(tensors))[:3]} are both tensors and chunked tensors")
    return ItemEntry(tree=item["tree"], tensors=tensors, chunks=chunks)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _count(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def _check_raw_bytes(entry: TensorEntry) -> None:
    """Check a tensor stored as raw bytes: its real dtype and shape must fit them exactly.

    The bytes are ``U8`` of shape ``[nbytes]``, and the real shape times the real element
    size is ``nbytes``, so no codec is ever asked to build a tensor from fewer bytes than it
    holds (a zero-byte tensor claiming a shape of a million elements would hand out
    uninitialized memory). For a dtype NumPy does not know (``float8_e8m0fnu``, ``int4``),
    whose size only the codec knows, the bytes must at least be a whole number of elements,
    and none exactly when there are no elements; the codec's own view then checks the rest.
    """
    meta = entry.meta
    if "lib_dtype" not in meta or "lib_shape" not in meta:
        raise ValueError("lib_dtype and lib_shape come together")
    lib_dtype, lib_shape = meta["lib_dtype"], meta["lib_shape"]
    itemsize = _check_lib_dtype(lib_dtype)
    if not (isinstance(lib_shape, list) and all(type(d) is int and 0 <= d < 2**63 for d in lib_shape)):
        raise ValueError(f"lib_shape {str(lib_shape)[:200]!r} is not a list of sizes")
    nbytes = entry.end - entry.begin
    if entry.dtype != "U8" or entry.shape != (nbytes,):
        raise ValueError(f"a tensor with lib_dtype is stored as U8 [nbytes], not {entry.dtype} {list(entry.shape)}")
    count = math.prod(lib_shape)
    if itemsize is not None:
        fits = count * itemsize == nbytes
    else:
        fits = nbytes == 0 if count == 0 else nbytes % count == 0 and nbytes > 0
    if not fits:
        raise ValueError(f"lib_shape {str(lib_shape)[:200]} of {lib_dtype} does not fit its {nbytes} bytes")


def _check_lib_dtype(value: Any) -> int | None:
    """A ``lib_dtype`` must name a numeric dtype: raw bytes are never rebuilt as strings,
    dates, records or objects (the writer stores only numeric dtypes this way).

    Names NumPy does not parse (``float8_e8m0fnu``, ml_dtypes' ``int4``) are left to the codec,
    which looks them up among real dtypes only.

    Returns:
        The element size in bytes, or None for a name NumPy does not parse.
    """
    if not isinstance(value, str) or len(value) > 64:
        raise ValueError(f"lib_dtype {str(value)[:64]!r} is not a dtype name")
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError, SyntaxError, RecursionError, OverflowError):  # NumPy parses "(2,3)f8" with ast
        if value.isidentifier():
            return None
        raise ValueError(f"lib_dtype {value!r} is not a dtype name") from None
    numeric = dtype.kind in "biufc" or dtype.type.__module__ == "ml_dtypes"
    if not numeric or dtype.fields is not None or dtype.subdtype is not None or dtype.itemsize < 1:
        raise ValueError(f"lib_dtype {value!r} is not a numeric dtype")
    return int(dtype.itemsize)


def _is_plain_file_name(name: str) -> bool:
    """True for a file name that stays inside the checkpoint directory."""
    return (
        name.endswith(".safetensors")
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and os.path.basename(name) == name
    )


def _canonical_checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return xxhash.xxh3_64_hexdigest(canonical.encode("ascii"))
