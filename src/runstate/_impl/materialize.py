"""A standalone copy of a checkpoint: every byte it reads, in files of its own.

An incremental checkpoint refers to tensor files in its run's blob area (docs/format.md
section 15): it cannot be moved on its own, and a damaged blob damages every checkpoint
that refers to it. :func:`copy_checkpoint` writes a self-contained checkpoint (format
version 1, like ``runstate.save``, unless it holds compressed tensors) with the same items,
trees, step, metrics and checksums, through the ordinary commit protocol: the copy appears
complete or not at all. Every tensor is read verified (its checksum checked) before it is
written again, one at a time, so memory stays at the largest tensor.

A compressed tensor (docs/format.md section 16) is copied as stored: its compressed bytes
and its index entry (``compression`` object included) unchanged, so the copy is as
compressed as the source and nothing is compressed again. It is verified first (decoded,
both checksums checked, streaming), and the bytes copied are checked against the stored
checksum as they are read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from runstate._impl import parts
from runstate._impl.pipeline import CheckpointInfo
from runstate._impl.reader import CheckpointReader
from runstate.errors import CheckpointConfigError, CorruptCheckpointError
from runstate.format.manifest import ItemEntry, Manifest, TensorEntry
from runstate.format.safetensors_io import checksum, file_metadata, read_tensor_bytes
from runstate.format.tensors import TensorBlob
from runstate.storage import parent_store, step_dirname

__all__ = ["copy_checkpoint"]


def _reading(reader: CheckpointReader, item: str, name: str) -> Callable[[], memoryview]:
    def read() -> memoryview:
        data: memoryview = reader.read_verified(item, name).data
        return data

    return read


def _reading_stored(reader: CheckpointReader, item: str, name: str, e: TensorEntry) -> Callable[[], memoryview]:
    """The stored (compressed) bytes of a tensor, once it decodes to its checksum and they match theirs."""

    def read() -> memoryview:
        reader.verify_tensor(item, name)  # decodes as a stream: both checksums
        f, data_start = reader.open_file(e.file)
        data = read_tensor_bytes(f, reader.location_of(e.file), data_start, e.begin, e.end)
        if checksum(data) != e.xxh3:
            raise CorruptCheckpointError(
                f"{reader.location_of(e.file)}: checksum mismatch in the compressed bytes of tensor {name!r} of "
                f"item {item!r} (they changed while copied)",
                file=e.file,
                tensor=name,
            )
        stored: memoryview = data.data
        return stored

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
        CheckpointConfigError: ``destination`` is named ``step-N`` for another step than the source's.
    """
    with CheckpointReader(source, storage_options=storage_options) as reader:
        manifest = reader.manifest
        metrics = reader.info().metrics
        store, name = parent_store(destination, storage_options)
        named = re.match(r"^step-([0-9]+)\Z", name)
        if named is not None and int(named.group(1)) != manifest.step:
            fix = "" if manifest.step is None else f"{step_dirname(manifest.step)} or "
            raise CheckpointConfigError(
                f"{destination}: a checkpoint of step {manifest.step} copied under the name of step "
                f"{int(named.group(1))} would pass for that step in a run directory (and be restored as it); "
                f"name the copy {fix}a name that is not a step's"
            )
        with store.begin(name) as staging:
            plans: list[parts.FilePlan] = []
            taken: set[str] = set()
            for item, entry in manifest.items.items():
                blobs: list[tuple[str, TensorBlob]] = []
                for tname, e in sorted(entry.tensors.items(), key=lambda kv: (kv[1].file, kv[1].begin)):
                    # a compressed tensor: its stored bytes, U8, with its entry's compression object
                    packed = "compression" in e.meta
                    read = _reading_stored(reader, item, tname, e) if packed else _reading(reader, item, tname)
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
