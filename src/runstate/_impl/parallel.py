"""Saving one checkpoint from several processes (see :mod:`runstate.distributed`).

The protocol, with every step agreed through the :class:`~runstate._impl.group.Group`:

1. Every process encodes its items; if any process cannot, all raise and nothing is written.
2. Rank 0 starts the checkpoint (``Store.begin``: a hidden temporary directory, or the step
   prefix of an object store) and tells the others where (``Store.attach``).
3. Every process writes its files there: rank 0 the replicated items, every rank its
   per-rank items and its blocks of sharded items, plus ``rank-<r>.part.json`` (what it
   wrote, with checksums; kept in the checkpoint, readers ignore it). Each file is durable
   (fsynced or uploaded) before the process reports success.
4. Only when every process succeeded does rank 0 merge the parts into ``manifest.json`` and
   commit; otherwise it removes everything. A process that dies at any moment therefore
   never leaves a committed partial checkpoint: its peers block or fail, and rank 0 never
   commits.
5. Rank 0 tells everyone whether the commit succeeded, then applies retention.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Callable, Mapping
from typing import Any

from runstate._impl.checkpoint import (
    DEFAULT_SHARD_BYTES,
    FilePlan,
    _file_names,
    _metric_value,
    _shards,
    _versions,
    encode_state,
    write_files,
)
from runstate._impl.group import Group, same_everywhere
from runstate.distributed import is_per_rank
from runstate.errors import (
    CheckpointError,
    CheckpointWriteError,
    LockError,
    StateMismatchError,
    StepExistsError,
    UnsupportedTypeError,
)
from runstate.format.manifest import (
    RANK_SUFFIX,
    Manifest,
    RankInfo,
    item_from_json,
    per_rank_name,
)
from runstate.format.safetensors_io import file_metadata
from runstate.format.tensors import TensorBlob
from runstate.format.tree import Encoder
from runstate.storage.base import Staging, Store

__all__ = ["save_together"]

_PART_SUFFIX = ".part.json"


def _part_name(rank: int) -> str:
    return f"rank-{rank:05d}{_PART_SUFFIX}"


def _encode(
    state: Mapping[str, Any], group: Group
) -> tuple[dict[str, tuple[dict[str, Any], Encoder]], set[str], str]:
    """This process's items by stored name, which of them are sharded, and the state's layout
    (item names and kinds) that every process must share."""
    for name in state:
        if RANK_SUFFIX.search(name):
            raise UnsupportedTypeError(
                f"item name {name!r}: names ending in @rank<N> are reserved for per-rank copies; rename the item"
            )
    encoded = encode_state(state)
    mine: dict[str, tuple[dict[str, Any], Encoder]] = {}
    sharded: set[str] = set()
    layout = []
    for name, value in state.items():
        tree, enc = encoded[name]
        if is_per_rank(value):
            mine[per_rank_name(name, group.rank)] = (tree, enc)
            layout.append((name, "per-rank"))
        elif any("dtensor" in blob.meta for blob in enc.blobs.values()):
            mine[name] = (tree, enc)
            sharded.add(name)
            layout.append((name, "sharded"))
        else:
            if group.rank == 0:
                mine[name] = (tree, enc)
            layout.append((name, "replicated"))
    return mine, sharded, repr(sorted(layout))


def _write_part(
    staging: Staging, items: dict[str, tuple[dict[str, Any], Encoder]], sharded: set[str], rank: int
) -> dict[str, Any]:
    """Write this process's tensor files; return the part (its index entries and files)."""
    taken: set[str] = set()
    plans: list[FilePlan] = []
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
        if blobs:
            shards = _shards(blobs, DEFAULT_SHARD_BYTES)
            base = f"{name}.rank{rank:05d}" if name in sharded else name
            fnames = _file_names(base, len(shards), taken)
            # from every tensor of the item, not only this process's: readers expect one metadata
            metadata = file_metadata(name, (b.lib for b in enc.blobs.values()))
            plans.extend(FilePlan(f, name, shard, metadata) for f, shard in zip(fnames, shards, strict=True))
        part_items[name] = {"tree": tree if (name not in sharded or rank == 0) else None, "chunks": chunks}
    files, entries = write_files(staging, plans)
    for name, item in part_items.items():
        item["tensors"] = {t: e.to_json() for t, e in entries.get(name, {}).items()}
    part = {"rank": rank, "items": part_items, "files": files}
    raw = json.dumps(part, ensure_ascii=True, allow_nan=False).encode("ascii")
    with staging.open_write(_part_name(rank)) as f:
        f.write(raw)
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


def save_together(
    group: Group,
    store: Store,
    name: str,
    state: Mapping[str, Any],
    *,
    step: int | None,
    metrics: Mapping[str, Any] | None,
    before_start: Callable[[], None] | None = None,
    before_commit: Callable[[Staging, bytes], None] | None = None,
) -> None:
    """Save ``state`` as the checkpoint ``name`` of ``store`` from every process of ``group``.

    Every process must call it with the same store, name, step and item names.

    Args:
        before_start: called on rank 0 before the checkpoint is started (lock, leftovers).
        before_commit: called on rank 0 with the staging and the manifest once every file is
            durable, before the commit (e.g. to read everything back); raising aborts.

    Raises:
        CheckpointError: this or another process failed; nothing was committed.
    """
    final = store.join(name)
    error: Exception | None = None
    metric_values: dict[str, Any] = {}
    items: dict[str, tuple[dict[str, Any], Encoder]] = {}
    sharded: set[str] = set()
    layout = ""
    try:
        if metrics is not None and not isinstance(metrics, Mapping):
            raise UnsupportedTypeError(f"metrics must be a dict of names to numbers, got {type(metrics).__qualname__}")
        metric_values = {str(k): _metric_value(str(k), v) for k, v in (metrics or {}).items()}
        items, sharded, layout = _encode(state, group)
    except Exception as exc:  # every process must reach the agreement below, whatever failed
        error = exc
    if group.all_min(0 if error else 1) == 0:
        raise _as_checkpoint_error(error, final, "another process could not encode its state (see its error)")
    if not same_everywhere(group, layout):
        raise StateMismatchError(
            f"{final}: the processes save different items or kinds of items; every process must save the same "
            f"item names, with the same ones per-rank and sharded (this one: {layout}); nothing was written"
        )
    staging: Staging | None = None
    if group.rank == 0:
        try:
            if before_start is not None:
                before_start()
            staging = store.begin(name)
        except Exception as exc:
            error = exc
    # rank 0 sends where to write, or the kind of error that stopped it (raised alike everywhere)
    message = staging.location if staging is not None else f"\0{type(error).__name__}\0{error}"
    message = group.broadcast_text(message)
    if message.startswith("\0"):
        if error is not None:
            raise _as_checkpoint_error(error, final, "")
        kind, _, text = message[1:].partition("\0")
        raise _rank0_error(kind, f"{final}: rank 0 could not start the checkpoint: {text}")
    part: dict[str, Any] = {}
    mine = staging
    try:
        if mine is None:
            mine = store.attach(message)
        part = _write_part(mine, items, sharded, group.rank)
    except Exception as exc:
        error = exc
    if group.all_min(0 if error else 1) == 0:
        if mine is not None:
            mine.abort()
        raise _as_checkpoint_error(
            error, final, "another process failed to write its files (see its error); nothing was committed"
        )
    committed = 1
    if staging is not None:
        try:
            per_rank = [n for n, v in state.items() if is_per_rank(v)]
            _commit(staging, part, group.size, step, metric_values, per_rank, before_commit)
        except Exception as exc:
            error, committed = exc, 0
    if group.all_min(committed) == 0:
        raise _as_checkpoint_error(error, final, "rank 0 could not commit the checkpoint (see its error)")


def _as_checkpoint_error(error: Exception | None, where: str, otherwise: str) -> CheckpointError:
    """This process's error as a CheckpointError, or ``otherwise`` when another process failed."""
    if error is None:
        return CheckpointWriteError(0, f"{where}: {otherwise}")
    if isinstance(error, CheckpointError):
        return error
    wrapped = CheckpointWriteError(0, f"{where}: {error!r}; nothing was committed")
    wrapped.__cause__ = error
    return wrapped


def _rank0_error(kind: str, message: str) -> CheckpointError:
    """The error rank 0 raised, rebuilt by name on the other processes (same type everywhere)."""
    if kind == "StepExistsError":
        return StepExistsError(message)
    if kind == "LockError":
        return LockError(0, message)
    if kind in ("CorruptCheckpointError", "StateMismatchError", "UnsupportedTypeError"):
        return CheckpointError(message)
    return CheckpointWriteError(0, message)


def _commit(
    staging: Staging,
    own: dict[str, Any],
    world_size: int,
    step: int | None,
    metrics: dict[str, Any],
    per_rank: list[str],
    before_commit: Callable[[Staging, bytes], None] | None = None,
) -> None:
    """Merge every process's part into the manifest and commit (rank 0)."""
    parts = [own]
    files = staging.reader()
    try:
        for rank in range(1, world_size):
            f, size = files.open_read(_part_name(rank))
            with f:
                parts.append(json.loads(f.read(size)))
        items, written = _merge(parts, staging.final)
        manifest = Manifest(
            step=step,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
            metrics=Encoder("metrics", lambda _v: None, []).encode(metrics),
            versions=_versions(),
            items={name: item_from_json(it) for name, it in items.items()},
            files=written,
            ranks=RankInfo(world_size, tuple(per_rank)),
        )
        raw = manifest.to_json_bytes()
        if before_commit is not None:
            before_commit(staging, raw)
        staging.commit(raw)
    except CheckpointError:
        staging.abort()
        raise
    except Exception as exc:
        staging.abort()
        raise CheckpointWriteError(0, f"{staging.final}: cannot merge the processes' parts: {exc!r}") from exc
