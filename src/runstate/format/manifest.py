"""``manifest.json``: the one file that says what a checkpoint holds.

It carries the format version, step, creation time, metrics, library versions, the typed
tree of every item and the tensor index (file, dtype, shape, offsets, XXH3 checksum per
tensor). Its own ``checksum`` field is the XXH3-64 of the canonical JSON of everything
else, so an edit or a flipped byte is detected before anything is trusted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import xxhash

from runstate.errors import CorruptCheckpointError, FormatVersionError

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
        meta = {k: v for k, v in obj.items() if k not in _ENTRY_FIELDS}
        begin, end = obj["data_offsets"]
        return cls(
            file=str(obj["file"]),
            dtype=str(obj["dtype"]),
            shape=tuple(int(s) for s in obj["shape"]),
            begin=int(begin),
            end=int(end),
            xxh3=str(obj["xxh3"]),
            lib=str(obj["lib"]),
            meta=meta,
        )


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
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptCheckpointError(
                f"{path}: not valid JSON ({exc}); the manifest is damaged, use another checkpoint"
            ) from exc
        if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
            raise CorruptCheckpointError(f'{path}: not a runstate manifest (no "format": "runstate")')
        version = body.get("format_version")
        if type(version) is not int:
            raise CorruptCheckpointError(f"{path}: format_version is missing or not an integer")
        if version > FORMAT_VERSION:
            raise FormatVersionError(
                f"{path}: written with format version {version}, but this runstate reads up to "
                f"version {FORMAT_VERSION}; upgrade runstate (pip install -U runstate)"
            )
        stored = body.pop("checksum", None)
        if stored != _canonical_checksum(body):
            raise CorruptCheckpointError(
                f"{path}: manifest checksum mismatch (stored {stored!r}); the manifest was "
                "edited or damaged, use another checkpoint"
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
            return cls(
                step=step,
                created=str(body["created"]),
                metrics=dict(body["metrics"]),
                versions={str(k): str(v) for k, v in body["versions"].items()},
                items=items,
                files={str(k): int(v["nbytes"]) for k, v in body["files"].items()},
                format_version=version,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptCheckpointError(f"{path}: malformed manifest field ({exc!r})") from exc


def _canonical_checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return xxhash.xxh3_64_hexdigest(canonical.encode("ascii"))
