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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from runstate.errors import CorruptCheckpointError, FormatVersionError
from runstate.format.tensors import DTYPE_SIZES

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "ItemEntry", "Manifest", "TensorEntry"]

FORMAT_NAME = "runstate"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

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
        if "lib_dtype" in meta:
            _check_lib_dtype(meta["lib_dtype"])
        if "lib_shape" in meta and not (
            isinstance(meta["lib_shape"], list) and all(type(d) is int and d >= 0 for d in meta["lib_shape"])
        ):
            raise ValueError(f"lib_shape {meta['lib_shape']!r} is not a list of sizes")
        return entry


@dataclass(frozen=True)
class ItemEntry:
    """One top-level item of the state: its typed tree and its tensors."""

    tree: dict[str, Any]
    tensors: dict[str, TensorEntry]

    @property
    def files(self) -> list[str]:
        """The files holding this item's tensors, in order of first use."""
        return list(dict.fromkeys(e.file for e in self.tensors.values()))


@dataclass(frozen=True)
class Manifest:
    """The parsed contents of ``manifest.json``."""

    step: int | None
    created: str
    metrics: dict[str, Any]
    versions: dict[str, str]
    items: dict[str, ItemEntry]
    files: dict[str, int]
    format_version: int = FORMAT_VERSION

    @property
    def nbytes(self) -> int:
        """Total size of the tensor files in bytes."""
        return sum(self.files.values())

    def to_json_bytes(self) -> bytes:
        """Serialize, adding the checksum of the canonical form."""
        body: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "step": self.step,
            "created": self.created,
            "metrics": self.metrics,
            "versions": self.versions,
            "items": {
                name: {
                    "tree": item.tree,
                    "tensors": {k: e.to_json() for k, e in item.tensors.items()},
                }
                for name, item in self.items.items()
            },
            "files": {name: {"nbytes": n} for name, n in self.files.items()},
        }
        body["checksum"] = _canonical_checksum(body)
        return json.dumps(body, ensure_ascii=True, allow_nan=False).encode("ascii") + b"\n"

    @classmethod
    def from_json_bytes(cls, raw: bytes, path: str) -> Manifest:
        """Parse and validate a manifest read from ``path``.

        Raises:
            CorruptCheckpointError: unreadable JSON, a wrong checksum or a malformed field.
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
            raise CorruptCheckpointError(
                f'{path}: not a runstate manifest (no "format": "runstate")', file=MANIFEST_NAME
            )
        version = body.get("format_version")
        if type(version) is not int:
            raise CorruptCheckpointError(f"{path}: format_version is missing or not an integer", file=MANIFEST_NAME)
        if version > FORMAT_VERSION:
            raise FormatVersionError(
                f"{path}: written with format version {version}, but this runstate reads up to "
                f"version {FORMAT_VERSION}; upgrade runstate (pip install -U runstate)"
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
        try:
            step = body["step"]
            if step is not None and type(step) is not int:
                raise TypeError("step is not an integer")
            items = {
                str(name): ItemEntry(
                    tree=item["tree"],
                    tensors={str(k): TensorEntry.from_json(e) for k, e in item["tensors"].items()},
                )
                for name, item in body["items"].items()
            }
            files = {_str(k): _count(v["nbytes"]) for k, v in body["files"].items()}
            for name in files:
                if not _is_plain_file_name(name):
                    raise ValueError(f"file name {name!r} is not a plain .safetensors name inside the checkpoint")
            for item_name, item_entry in items.items():
                if not isinstance(item_entry.tree, dict):
                    raise TypeError(f"item {item_name!r}: tree is not an object")
                for tname, entry in item_entry.tensors.items():
                    if entry.file not in files:
                        raise ValueError(f"tensor {tname!r} of item {item_name!r} is in unlisted file {entry.file!r}")
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
                format_version=version,
            )
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
            raise CorruptCheckpointError(f"{path}: malformed manifest field ({exc!r})", file=MANIFEST_NAME) from exc


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _count(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def _check_lib_dtype(value: Any) -> None:
    """A ``lib_dtype`` must name a numeric dtype: raw bytes are never rebuilt as strings,
    dates, records or objects (the writer stores only numeric dtypes this way).

    Names NumPy does not parse (``float8_e8m0fnu``, ml_dtypes' ``int4``) are left to the codec,
    which looks them up among real dtypes only.
    """
    if not isinstance(value, str) or len(value) > 64:
        raise ValueError(f"lib_dtype {str(value)[:64]!r} is not a dtype name")
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError, SyntaxError, RecursionError, OverflowError):  # NumPy parses "(2,3)f8" with ast
        if value.isidentifier():
            return
        raise ValueError(f"lib_dtype {value!r} is not a dtype name") from None
    numeric = dtype.kind in "biufc" or dtype.type.__module__ == "ml_dtypes"
    if not numeric or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"lib_dtype {value!r} is not a numeric dtype")


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
