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
from typing import Any

import numpy as np

from runstate._version import __version__
from runstate.adapters import find_codec, object_codecs
from runstate.distributed import unwrap
from runstate.errors import (
    UnsupportedTypeError,
)
from runstate.format.manifest import MANIFEST_NAME, ItemEntry, Manifest, TensorEntry
from runstate.format.safetensors_io import file_metadata, write_safetensors
from runstate.format.tensors import TensorBlob
from runstate.format.tree import Encoder

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "CheckpointInfo",
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
    state = {name: unwrap(value) for name, value in state.items()}
    encoded: dict[str, tuple[dict[str, Any], Encoder]] = {}
    for name, value in state.items():
        enc = Encoder(name, find_codec, objects)
        encoded[name] = (enc.encode(value), enc)
    if "torch" in sys.modules:
        from runstate.adapters import torch as torch_adapter

        for name, value in state.items():
            names = torch_adapter.optimizer_param_names(value, state)
            if names is not None:
                encoded[name][0]["param_names"] = names  # lets a changed model keep matching moments
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
            metadata = file_metadata(name, (b.lib for _, b in blobs))
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
