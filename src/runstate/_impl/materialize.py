"""A standalone copy of a checkpoint: every byte it reads, in files of its own.

An incremental checkpoint refers to tensor files in its run's blob area (docs/format.md
section 15): it cannot be moved on its own, and a damaged blob damages every checkpoint
that refers to it. :func:`copy_checkpoint` writes a self-contained checkpoint (format
version 1, like ``runstate.save``) with the same items, trees, step, metrics and checksums,
through the ordinary commit protocol: the copy appears complete or not at all. Every tensor
is read verified (its checksum checked) before it is written again, one at a time, so
memory stays at the largest tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from runstate._impl import parts
from runstate._impl.pipeline import CheckpointInfo
from runstate._impl.reader import CheckpointReader
from runstate.errors import CheckpointError, CorruptCheckpointError
from runstate.format.manifest import ItemEntry, Manifest, TensorEntry
from runstate.format.safetensors_io import file_metadata
from runstate.format.tensors import TensorBlob
from runstate.storage import parent_store

__all__ = ["copy_checkpoint"]


def _reading(reader: CheckpointReader, item: str, name: str) -> Callable[[], memoryview]:
    def read() -> memoryview:
        data: memoryview = reader.read_verified(item, name).data
        return data

    return read


def copy_checkpoint(
    source: str, destination: str, *, storage_options: Mapping[str, Any] | None = None
) -> CheckpointInfo:
    """Write a self-contained copy of the checkpoint ``source`` at ``destination``.

    Args:
        source: a checkpoint directory or URL (incremental or not).
        destination: where the copy goes; it must not exist yet.
        storage_options: fsspec options for URLs (both sides).

    Returns:
        The :class:`CheckpointInfo` of the copy.

    Raises:
        CorruptCheckpointError: a byte of ``source`` fails its checksum (nothing is committed).
        StepExistsError: ``destination`` exists.
        CheckpointError: ``source`` holds compressed tensors (not supported yet).
    """
    with CheckpointReader(source, storage_options=storage_options) as reader:
        manifest = reader.manifest
        metrics = reader.info().metrics
        store, name = parent_store(destination, storage_options)
        with store.begin(name) as staging:
            plans: list[parts.FilePlan] = []
            taken: set[str] = set()
            for item, entry in manifest.items.items():
                blobs: list[tuple[str, TensorBlob]] = []
                for tname, e in sorted(entry.tensors.items(), key=lambda kv: (kv[1].file, kv[1].begin)):
                    if "compression" in e.meta:
                        raise CheckpointError(
                            f"{reader.path}: tensor {tname!r} of {item!r} is compressed; runstate copy does not "
                            "copy compressed checkpoints yet"
                        )
                    read = _reading(reader, item, tname)
                    blobs.append((tname, TensorBlob(e.dtype, e.shape, e.end - e.begin, e.lib, read, e.meta)))
                if blobs:
                    shards = parts.shards(blobs, parts.DEFAULT_SHARD_BYTES)
                    names = parts.file_names(item, len(shards), taken)
                    metadata = file_metadata(item, (e.lib for e in entry.tensors.values()))
                    plans += [parts.FilePlan(f, item, s, metadata) for f, s in zip(names, shards, strict=True)]
            files, written = parts.write_files(staging, plans)
            items: dict[str, ItemEntry] = {}
            for item, entry in manifest.items.items():
                tensors: dict[str, TensorEntry] = {}
                for tname, e in entry.tensors.items():
                    new = written[item][tname]
                    if new.xxh3 != e.xxh3:  # read verified: only a change under us gets here
                        raise CorruptCheckpointError(
                            f"{reader.path}: tensor {tname!r} of {item!r} changed while copied"
                        )
                    tensors[tname] = new
                items[item] = ItemEntry(entry.tree, tensors, entry.chunks)
            copy = Manifest(
                step=manifest.step,
                created=manifest.created,
                metrics=manifest.metrics,
                versions=manifest.versions,
                items=items,
                files=files,
                ranks=manifest.ranks,
            )
            raw = copy.to_json_bytes()
            final = staging.commit(raw)
    return CheckpointInfo(manifest.step, final, manifest.created, metrics, copy.nbytes + len(raw))
