"""What one process writes into a checkpoint (its *part*), and how the parts become one index.

A process turns the items it saves into safetensors files, named deterministically from the
item names and split past a size, and describes them in its part: each item's tree, the
index entry (file, offsets, checksum) of each tensor, and the blocks of sharded tensors it
owns. :func:`merge` combines every process's part into the manifest's items and files, and
refuses anything that would make a wrong manifest (a file or tensor written twice, blocks
that do not tile their tensor). A single process has one part, kept in memory; in a group,
each process also writes its part as ``rank-<r>.part.json`` (kept in the checkpoint, ignored
by readers) for the process that commits. Every file is durable before it is listed.

Nothing here starts, commits or aborts a checkpoint, or knows about other processes: that
is :mod:`runstate._impl.pipeline`.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import IO, Any, Protocol

from runstate.adapters import block_placement, without_placement
from runstate.errors import CheckpointWriteError
from runstate.format.compress import Compression
from runstate.format.manifest import MANIFEST_NAME, ItemEntry, TensorEntry, item_from_json
from runstate.format.safetensors_io import WrittenTensor, file_metadata, write_safetensors
from runstate.format.tensors import TensorBlob
from runstate.format.tree import Encoder
from runstate.storage.base import Staging

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "FilePlan",
    "FileSink",
    "file_names",
    "merge",
    "part_name",
    "read_parts",
    "shards",
    "write_files",
    "write_part",
]

#: Tensor files of one item are split past this size (``model-00001-of-00003.safetensors``).
DEFAULT_SHARD_BYTES = 4 * 1024**3

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")
_RESERVED_FILES = frozenset({MANIFEST_NAME, "manifest.safetensors"})

#: A part as written to ``rank-<r>.part.json``: ``{"rank", "items", "files"}``.
Part = dict[str, Any]


def part_name(rank: int) -> str:
    """The file in which process ``rank`` lists what it wrote."""
    return f"rank-{rank:05d}.part.json"


@dataclass(frozen=True)
class FilePlan:
    """One tensor file to write: its name, the item it belongs to and its tensors."""

    name: str
    item: str
    tensors: list[tuple[str, TensorBlob]]
    metadata: dict[str, str]
    plain: frozenset[str] = frozenset()  # never compressed: blocks of sharded tensors


def _file_names(item: str, n_shards: int, taken: set[str]) -> list[str]:
    """File names for an item's shards, unique (case-insensitively) within what ``taken`` holds."""
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


def _item_blobs(
    name: str, enc: Encoder, sharded: bool, rank: int
) -> tuple[list[tuple[str, TensorBlob]], dict[str, dict[str, Any]]]:
    """The tensors of one item this process writes, and the blocks of its sharded tensors.

    A sharded item's whole tensors are written by rank 0 only; each block of a sharded tensor
    by the one process that owns it.
    """
    blobs: list[tuple[str, TensorBlob]] = []
    chunks: dict[str, dict[str, Any]] = {}
    for tname, blob in enc.blobs.items():
        placement = block_placement(blob)
        if placement is None:
            if not sharded or rank == 0:
                blobs.append((tname, blob))
            continue
        meta = without_placement(blob.meta)
        chunk = chunks.setdefault(
            tname, {"dtype": blob.dtype, "shape": placement.shape, "lib": blob.lib, "parts": [], **meta}
        )
        if placement.owner:
            block = f"{tname}@" + ",".join(map(str, placement.offsets))
            chunk["parts"].append({"offsets": placement.offsets, "tensor": block})
            blobs.append((block, TensorBlob(blob.dtype, blob.shape, blob.nbytes, blob.lib, blob.read, meta)))
    return blobs, chunks


def _plan(
    items: dict[str, tuple[dict[str, Any], Encoder]], sharded: frozenset[str], rank: int, shard_bytes: int
) -> tuple[list[FilePlan], dict[str, Any]]:
    """This process's tensor files, and its part's items (tree and chunks; tensors come once written)."""
    taken = set(_RESERVED_FILES)
    plans: list[FilePlan] = []
    part_items: dict[str, Any] = {}
    for name, (tree, enc) in items.items():
        blobs, chunks = _item_blobs(name, enc, name in sharded, rank)
        if blobs:
            shards = _shards(blobs, shard_bytes)
            base = f"{name}.rank{rank:05d}" if name in sharded else name
            fnames = _file_names(base, len(shards), taken)
            # from every tensor of the item, not only this process's: readers expect one metadata
            metadata = file_metadata(name, (b.lib for b in enc.blobs.values()))
            blocks = frozenset(p["tensor"] for c in chunks.values() for p in c["parts"])
            plans.extend(FilePlan(f, name, shard, metadata, blocks) for f, shard in zip(fnames, shards, strict=True))
        part_items[name] = {"tree": tree if (name not in sharded or rank == 0) else None, "chunks": chunks}
    return plans, part_items


class FileSink(Protocol):
    """Where tensor files are written: a checkpoint's staging, or a run's blob area (:mod:`runstate._impl.incremental`)."""

    parallel_writes: int

    def open_write(self, name: str) -> AbstractContextManager[IO[bytes]]:
        """A new file ``name``, durable when the block exits."""
        ...


def _write_file(
    staging: FileSink, plan: FilePlan, compression: Compression | None
) -> tuple[int, dict[str, WrittenTensor]]:
    with staging.open_write(plan.name) as f:
        return write_safetensors(f, plan.tensors, plan.metadata, compression=compression, plain=plan.plain)


def _entry(fname: str, blob: TensorBlob, w: WrittenTensor) -> TensorEntry:
    """The index entry of a written tensor (a compressed one is stored as U8 bytes, docs/format.md)."""
    if w.packing is None:
        return TensorEntry(fname, blob.dtype, blob.shape, w.begin, w.end, w.xxh3, blob.lib, blob.meta)
    meta = {**blob.meta, "compression": w.packing.to_json()}
    return TensorEntry(fname, "U8", (w.end - w.begin,), w.begin, w.end, w.xxh3, blob.lib, meta)


def _write_files(
    staging: FileSink, plans: list[FilePlan], compression: Compression | None = None
) -> tuple[dict[str, int], dict[str, dict[str, TensorEntry]]]:
    """Write planned tensor files, ``staging.parallel_writes`` at a time (one at a time on a local disk).

    Returns:
        The size of each file, and the index entries of each item's tensors.
    """
    workers = min(staging.parallel_writes, len(plans))
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="runstate-write") as pool:
            results = list(pool.map(lambda p: _write_file(staging, p, compression), plans))
    else:
        results = [_write_file(staging, p, compression) for p in plans]
    files: dict[str, int] = {}
    entries: dict[str, dict[str, TensorEntry]] = {}
    for plan, (size, written) in zip(plans, results, strict=True):
        files[plan.name] = size
        for tname, blob in plan.tensors:
            entries.setdefault(plan.item, {})[tname] = _entry(plan.name, blob, written[tname])
    return files, entries


#: Public names of the helpers :mod:`runstate._impl.incremental` shares (same files, same names).
write_files = _write_files
shards = _shards
file_names = _file_names


def write_part(
    staging: Staging,
    items: dict[str, tuple[dict[str, Any], Encoder]],
    sharded: frozenset[str],
    *,
    rank: int,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    publish: bool,
    compression: Compression | None = None,
) -> Part:
    """Write this process's tensor files into ``staging``; return its part.

    Args:
        staging: the checkpoint being written (begun here or attached).
        items: this process's encoded items, by stored name.
        sharded: the items saved in blocks by every process.
        rank: this process's rank (0 for a single process).
        shard_bytes: split an item's files past this many tensor bytes.
        publish: also write the part as ``rank-<r>.part.json`` (for the process that commits).
        compression: compress the tensor files (None: written as they are).
    """
    plans, part_items = _plan(items, sharded, rank, shard_bytes)
    files, entries = _write_files(staging, plans, compression)
    for name, item in part_items.items():
        written = entries.get(name, {})
        # a part that stays in this process keeps its TensorEntry objects (no JSON round trip)
        item["tensors"] = {t: e.to_json() for t, e in written.items()} if publish else written
    part: Part = {"rank": rank, "items": part_items, "files": files}
    if publish:
        raw = json.dumps(part, ensure_ascii=True, allow_nan=False).encode("ascii")
        with staging.open_write(part_name(rank)) as f:
            f.write(raw)
    return part


def read_parts(staging: Staging, ranks: range) -> list[Part]:
    """The parts the processes ``ranks`` wrote into ``staging``."""
    files = staging.reader()
    parts = []
    for rank in ranks:
        f, size = files.open_read(part_name(rank))
        with f:
            parts.append(json.loads(f.read(size)))
    return parts


def merge(parts: list[Part], where: str) -> tuple[dict[str, ItemEntry], dict[str, int]]:
    """Merge every process's part into the manifest's items and files (items in the parts' order).

    Raises:
        CheckpointWriteError: two processes wrote the same file or tensor, or the blocks of a
            sharded tensor do not cover it exactly once.
    """
    items: dict[str, dict[str, Any]] = {}
    files: dict[str, int] = {}
    for part in parts:
        for fname, size in part["files"].items():
            if fname in files:
                raise CheckpointWriteError(f"{where}: two processes wrote {fname}; rename the item")
            files[fname] = size
        for name, it in part["items"].items():
            _merge_item(items.setdefault(name, {"tree": None, "tensors": {}, "chunks": {}}), it, where, name)
    entries: dict[str, ItemEntry] = {}
    for name, merged in items.items():
        if merged["tree"] is None:
            raise CheckpointWriteError(f"{where}: rank 0 did not save item {name!r}; every process must save it")
        if not merged["chunks"]:
            del merged["chunks"]
        try:
            entries[name] = item_from_json(merged)  # the blocks must tile every sharded tensor exactly once
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointWriteError(f"{where}: item {name!r}: {exc}") from exc
    return entries, files


def _merge_item(merged: dict[str, Any], it: dict[str, Any], where: str, name: str) -> None:
    if it["tree"] is not None:
        merged["tree"] = it["tree"]
    for tname, entry in it["tensors"].items():
        if tname in merged["tensors"]:
            raise CheckpointWriteError(f"{where}: tensor {tname!r} of {name!r} was written twice")
        merged["tensors"][tname] = entry
    for tname, chunk in it["chunks"].items():
        known = merged["chunks"].get(tname)
        if known is None:
            merged["chunks"][tname] = {**chunk, "parts": list(chunk["parts"])}
        elif (known["dtype"], known["shape"]) != (chunk["dtype"], chunk["shape"]):
            raise CheckpointWriteError(f"{where}: processes disagree on the shape of {name}.{tname}")
        else:
            known["parts"].extend(chunk["parts"])
