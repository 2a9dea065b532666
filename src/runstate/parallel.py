"""Saving one checkpoint from several processes (see :mod:`runstate.distributed`).

The protocol, with every step agreed through the :class:`~runstate.group.Group`:

1. Every process encodes its items; if any process cannot, all raise and nothing is written.
2. Rank 0 starts the checkpoint (a hidden temporary directory) and tells the others where.
3. Every process writes its files there: rank 0 the replicated items, every rank its
   per-rank items and its blocks of sharded items, plus ``rank-<r>.part.json`` (what it
   wrote, with checksums). Each file is durable before the process reports success.
4. Only when every process succeeded does rank 0 merge the parts into ``manifest.json`` and
   commit; otherwise it removes everything. A process that dies at any moment therefore
   never leaves a committed partial checkpoint: its peers block or fail, and rank 0 never
   commits.
5. Rank 0 tells everyone whether the commit succeeded, then applies retention.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from typing import Any

from runstate.checkpoint import DEFAULT_SHARD_BYTES, _file_names, _metric_value, _shards, _versions, encode_state
from runstate.distributed import is_per_rank
from runstate.errors import CheckpointError, CheckpointWriteError, StepExistsError
from runstate.format.manifest import (
    MANIFEST_NAME,
    Manifest,
    RankInfo,
    TensorEntry,
    item_from_json,
    per_rank_name,
)
from runstate.format.safetensors_io import file_metadata, write_safetensors
from runstate.format.tensors import TensorBlob
from runstate.format.tree import Encoder
from runstate.group import Group
from runstate.storage.local import fsync_dir

__all__ = ["save_together"]

_PART_SUFFIX = ".part.json"


def _part_name(rank: int) -> str:
    return f"rank-{rank:05d}{_PART_SUFFIX}"


def _encode(state: Mapping[str, Any], group: Group) -> tuple[dict[str, tuple[dict[str, Any], Encoder]], set[str]]:
    """This process's items by stored name, and which of them are sharded."""
    encoded = encode_state(state)
    mine: dict[str, tuple[dict[str, Any], Encoder]] = {}
    sharded: set[str] = set()
    for name, value in state.items():
        tree, enc = encoded[name]
        if is_per_rank(value):
            mine[per_rank_name(name, group.rank)] = (tree, enc)
        elif any("dtensor" in blob.meta for blob in enc.blobs.values()):
            mine[name] = (tree, enc)
            sharded.add(name)
        elif group.rank == 0:
            mine[name] = (tree, enc)
    return mine, sharded


def _write_part(
    directory: str, items: dict[str, tuple[dict[str, Any], Encoder]], sharded: set[str], rank: int
) -> dict[str, Any]:
    """Write this process's tensor files; return the part (its index entries and files)."""
    taken: set[str] = set()
    files: dict[str, int] = {}
    part_items: dict[str, Any] = {}
    for name, (tree, enc) in items.items():
        chunks: dict[str, dict[str, Any]] = {}
        blobs: list[tuple[str, TensorBlob]] = []
        for tname, blob in enc.blobs.items():
            placement = blob.meta.get("dtensor")
            if placement is None:
                if name not in sharded or rank == 0:
                    blobs.append((tname, blob))
                continue
            meta = {k: v for k, v in blob.meta.items() if k != "dtensor"}
            chunk = chunks.setdefault(
                tname, {"dtype": blob.dtype, "shape": placement["shape"], "lib": blob.lib, "parts": [], **meta}
            )
            if placement["owner"]:
                block = f"{tname}@" + ",".join(map(str, placement["offsets"]))
                chunk["parts"].append({"offsets": placement["offsets"], "tensor": block})
                blobs.append((block, TensorBlob(blob.dtype, blob.shape, blob.nbytes, blob.lib, blob.read, meta)))
        tensors: dict[str, Any] = {}
        if blobs:
            shards = _shards(blobs, DEFAULT_SHARD_BYTES)
            base = f"{name}.rank{rank:05d}" if name in sharded else name
            fnames = _file_names(base, len(shards), taken)
            metadata = file_metadata(name, (b.lib for _, b in blobs))
            for fname, shard in zip(fnames, shards, strict=True):
                size, written = write_safetensors(os.path.join(directory, fname), shard, metadata)
                files[fname] = size
                for tname, blob in shard:
                    w = written[tname]
                    entry = TensorEntry(fname, blob.dtype, blob.shape, w.begin, w.end, w.xxh3, blob.lib, blob.meta)
                    tensors[tname] = entry.to_json()
        part_items[name] = {
            "tree": tree if (name not in sharded or rank == 0) else None,
            "tensors": tensors,
            "chunks": chunks,
        }
    part = {"rank": rank, "items": part_items, "files": files}
    raw = json.dumps(part, ensure_ascii=True, allow_nan=False).encode("ascii")
    with open(os.path.join(directory, _part_name(rank)), "xb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    return part


def _merge(parts: list[dict[str, Any]], where: str) -> tuple[dict[str, Any], dict[str, int]]:
    """Merge every process's part into the manifest's items and files.

    Raises:
        CheckpointWriteError: two processes wrote the same file or tensor, or the blocks of a
            sharded tensor do not cover it exactly once.
    """
    items: dict[str, dict[str, Any]] = {}
    files: dict[str, int] = {}
    for part in parts:
        for fname, size in part["files"].items():
            if fname in files:
                raise CheckpointWriteError(0, f"{where}: two processes wrote {fname}; rename the item")
            files[fname] = size
        for name, it in part["items"].items():
            merged = items.setdefault(name, {"tree": None, "tensors": {}, "chunks": {}})
            if it["tree"] is not None:
                merged["tree"] = it["tree"]
            for tname, entry in it["tensors"].items():
                if tname in merged["tensors"]:
                    raise CheckpointWriteError(0, f"{where}: tensor {tname!r} of {name!r} was written twice")
                merged["tensors"][tname] = entry
            for tname, chunk in it["chunks"].items():
                known = merged["chunks"].get(tname)
                if known is None:
                    merged["chunks"][tname] = {**chunk, "parts": list(chunk["parts"])}
                elif (known["dtype"], known["shape"]) != (chunk["dtype"], chunk["shape"]):
                    raise CheckpointWriteError(0, f"{where}: processes disagree on the shape of {name}.{tname}")
                else:
                    known["parts"].extend(chunk["parts"])
    for name, merged in items.items():
        if merged["tree"] is None:
            raise CheckpointWriteError(0, f"{where}: rank 0 did not save item {name!r}; every process must save it")
        if not merged["chunks"]:
            del merged["chunks"]
        try:
            item_from_json(merged)  # the blocks must tile every sharded tensor exactly once
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointWriteError(0, f"{where}: item {name!r}: {exc}") from exc
    return items, files


class _Staging:
    """Rank 0's uncommitted checkpoint directory: a hidden temporary next to its final name."""

    def __init__(self, final: str) -> None:
        self.final = final
        self.parent, name = os.path.split(os.path.abspath(final))
        if os.path.lexists(final):
            raise StepExistsError(f"{final} already exists; choose another step or delete it first")
        self.location = os.path.join(self.parent, f".tmp-{name}-{uuid.uuid4().hex[:12]}")
        try:
            os.makedirs(self.parent, exist_ok=True)
            os.mkdir(self.location)
        except OSError as exc:
            raise CheckpointWriteError(exc.errno or 0, f"cannot create {self.location}: {exc.strerror}") from exc

    def commit(self, manifest: bytes) -> None:
        try:
            with open(os.path.join(self.location, MANIFEST_NAME), "xb") as f:
                f.write(manifest)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(self.location)
            if os.path.lexists(self.final):
                raise StepExistsError(f"{self.final} appeared while saving; another writer uses this path")
            os.rename(self.location, self.final)
        except OSError as exc:
            self.abort()
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointWriteError(exc.errno or 0, f"cannot commit {self.final}: {exc.strerror}") from exc
        try:
            fsync_dir(self.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.rename(self.final, self.location)
            self.abort()
            raise CheckpointWriteError(exc.errno or 0, f"cannot commit {self.final}: {exc.strerror}") from exc

    def abort(self) -> None:
        shutil.rmtree(self.location, ignore_errors=True)


def save_together(
    group: Group,
    final: str,
    state: Mapping[str, Any],
    *,
    step: int | None,
    metrics: Mapping[str, Any] | None,
    before_start: Any = None,
) -> None:
    """Save ``state`` as the checkpoint ``final`` from every process of ``group``.

    Every process must call it with the same step and item names.

    Args:
        before_start: called on rank 0 before the checkpoint is started (lock, leftovers).

    Raises:
        CheckpointError: this or another process failed; nothing was committed.
    """
    error: BaseException | None = None
    try:
        metric_values = {str(k): _metric_value(str(k), v) for k, v in (metrics or {}).items()}
        items, sharded = _encode(state, group)
    except CheckpointError as exc:
        error = exc
    if group.all_min(0 if error else 1) == 0:
        raise error or CheckpointError(f"{final}: another process could not encode its state (see its error)")
    staging: _Staging | None = None
    if group.rank == 0:
        try:
            if before_start is not None:
                before_start()
            staging = _Staging(final)
        except CheckpointError as exc:
            error = exc
    location = group.broadcast_text(staging.location if staging is not None else "")
    if not location:
        raise error or CheckpointWriteError(0, f"{final}: rank 0 could not start the checkpoint (see its error)")
    part: dict[str, Any] = {}
    try:
        part = _write_part(location, items, sharded, group.rank)
    except (CheckpointError, OSError, RuntimeError) as exc:
        error = exc
    if group.all_min(0 if error else 1) == 0:
        if staging is not None:
            staging.abort()
        if isinstance(error, CheckpointError):
            raise error
        if error is not None:
            raise CheckpointWriteError(0, f"{final}: writing this process's files failed: {error}") from error
        raise CheckpointWriteError(0, f"{final}: another process failed to write its files; nothing was committed")
    committed = 1
    if staging is not None:
        try:
            _commit(staging, part, group.size, step, metric_values, [n for n, v in state.items() if is_per_rank(v)])
        except CheckpointError as exc:
            error, committed = exc, 0
    if group.all_min(committed) == 0:
        raise error or CheckpointWriteError(0, f"{final}: rank 0 could not commit the checkpoint (see its error)")


def _commit(
    staging: _Staging,
    own: dict[str, Any],
    world_size: int,
    step: int | None,
    metrics: dict[str, Any],
    per_rank: list[str],
) -> None:
    parts = [own]
    for rank in range(1, world_size):
        path = os.path.join(staging.location, _part_name(rank))
        try:
            with open(path, "rb") as f:
                parts.append(json.loads(f.read()))
            os.remove(path)
        except (OSError, ValueError) as exc:
            staging.abort()
            raise CheckpointWriteError(0, f"{staging.final}: cannot read rank {rank}'s part: {exc}") from exc
    os.remove(os.path.join(staging.location, _part_name(0)))
    try:
        items, files = _merge(parts, staging.final)
    except CheckpointError:
        staging.abort()
        raise
    metrics_node = Encoder("metrics", lambda _v: None, []).encode(metrics)
    manifest = Manifest(
        step=step,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
        metrics=metrics_node,
        versions=_versions(),
        items={name: item_from_json(it) for name, it in items.items()},
        files=files,
        ranks=RankInfo(world_size, tuple(per_rank)),
    )
    staging.commit(manifest.to_json_bytes())
