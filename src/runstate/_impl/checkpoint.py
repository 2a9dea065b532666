"""Writing one checkpoint.

A save encodes the whole state first (so a value that cannot be stored fails before any
file is created), then streams every item's tensors into safetensors files of a
:class:`~runstate.storage.Staging` (a hidden temporary directory locally, the final prefix
on an object store) and commits it by writing ``manifest.json`` last. Nothing here knows
where the bytes go.

For distributed saves the steps are separate: :func:`plan_files` names every file from the
whole state (the same on every process), :func:`write_items` writes some items into a
staging (possibly attached from another process), :func:`build_manifest` combines what
every process wrote, and the process that began the staging commits the manifest.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import platform
import re
import sys
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
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
from runstate.format.safetensors_io import WrittenTensor, file_metadata, write_safetensors
from runstate.format.tensors import TensorBlob
from runstate.format.tree import Encoder
from runstate.storage.base import Staging
from runstate.storage.local import FillDirectory

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "CheckpointInfo",
    "FilePlan",
    "PreparedState",
    "WrittenItems",
    "build_manifest",
    "plan_files",
    "prepare",
    "write_checkpoint",
    "write_items",
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


@dataclass(frozen=True)
class FilePlan:
    """One tensor file to write: its name, the item it belongs to and its tensors."""

    name: str
    item: str
    tensors: list[tuple[str, TensorBlob]]
    metadata: dict[str, str]


@dataclass
class WrittenItems:
    """What :func:`write_items` wrote: index entries per item and the size of each file."""

    items: dict[str, ItemEntry] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)

    def update(self, other: WrittenItems) -> None:
        """Add what another process wrote (distributed saves)."""
        self.items.update(other.items)
        self.files.update(other.files)


def plan_files(prepared: PreparedState, *, shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[FilePlan]:
    """Every tensor file of the checkpoint, named deterministically from the items in order."""
    taken: set[str] = {MANIFEST_NAME, "manifest.safetensors"}
    plans: list[FilePlan] = []
    for name, (_tree, enc) in prepared.items.items():
        blobs = list(enc.blobs.items())
        if not blobs:
            continue
        shards = _shards(blobs, shard_bytes)
        fnames = _file_names(name, len(shards), taken)
        metadata = file_metadata(name, (b.lib for _, b in blobs))
        plans.extend(FilePlan(fname, name, shard, metadata) for fname, shard in zip(fnames, shards, strict=True))
    return plans


def _write_file(staging: Staging, plan: FilePlan) -> tuple[int, dict[str, WrittenTensor]]:
    with staging.open_write(plan.name) as f:
        return write_safetensors(f, plan.tensors, plan.metadata)


def write_items(
    staging: Staging,
    prepared: PreparedState,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    items: Collection[str] | None = None,
) -> WrittenItems:
    """Write the tensor files of ``items`` (default: all) into ``staging``; no manifest.

    Files are written ``staging.parallel_writes`` at a time (one at a time on a local disk).
    """
    wanted = set(prepared.items) if items is None else set(items)
    plans = [p for p in plan_files(prepared, shard_bytes=shard_bytes) if p.item in wanted]
    out = WrittenItems()
    out.files, entries = write_files(staging, plans)
    for name, (tree, _enc) in prepared.items.items():
        if name in wanted:
            out.items[name] = ItemEntry(tree=tree, tensors=entries.get(name, {}))
    return out


def write_files(staging: Staging, plans: list[FilePlan]) -> tuple[dict[str, int], dict[str, dict[str, TensorEntry]]]:
    """Write planned tensor files into ``staging``, ``staging.parallel_writes`` at a time.

    Returns:
        The size of each file, and the index entries of each item's tensors.
    """
    workers = min(staging.parallel_writes, len(plans))
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="runstate-write") as pool:
            results = list(pool.map(lambda p: _write_file(staging, p), plans))
    else:
        results = [_write_file(staging, p) for p in plans]
    files: dict[str, int] = {}
    entries: dict[str, dict[str, TensorEntry]] = {}
    for plan, (size, written) in zip(plans, results, strict=True):
        files[plan.name] = size
        for tname, blob in plan.tensors:
            w = written[tname]
            entries.setdefault(plan.item, {})[tname] = TensorEntry(
                plan.name, blob.dtype, blob.shape, w.begin, w.end, w.xxh3, blob.lib, blob.meta
            )
    return files, entries


def build_manifest(prepared: PreparedState, written: WrittenItems, *, step: int | None) -> Manifest:
    """The manifest of a checkpoint whose files are ``written``; items keep the state's order."""
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")
    items = {name: written.items[name] for name in prepared.items if name in written.items}
    return Manifest(
        step=step,
        created=created,
        metrics=prepared.metrics_node,
        versions=_versions(),
        items=items,
        files=dict(written.files),
    )


def write_checkpoint(
    target: Staging | str,
    prepared: PreparedState,
    *,
    step: int | None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    before_commit: Callable[[bytes], None] | None = None,
) -> CheckpointInfo:
    """Write a prepared state into ``target`` and commit it with ``manifest.json``.

    Args:
        target: a :class:`Staging` from ``Store.begin`` (committed here), or a plain existing
            directory to fill, manifest included (the caller commits that directory).
        prepared: from :func:`prepare`.
        step: recorded in the manifest.
        shard_bytes: split an item's files past this many tensor bytes.
        before_commit: called with the manifest bytes after every tensor file is durable and
            before the commit (e.g. to read everything back); raising aborts the commit.

    Returns:
        The :class:`CheckpointInfo` of the committed checkpoint.
    """
    staging = FillDirectory(target) if isinstance(target, str) else target
    written = write_items(staging, prepared, shard_bytes=shard_bytes)
    manifest = build_manifest(prepared, written, step=step)
    raw = manifest.to_json_bytes()
    if before_commit is not None:
        before_commit(raw)
    final = staging.commit(raw)
    return CheckpointInfo(step, final, manifest.created, prepared.metrics, manifest.nbytes + len(raw))
