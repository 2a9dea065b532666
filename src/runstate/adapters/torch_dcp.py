"""Sharded tensors (``DTensor``, as FSDP2's ``fully_shard`` makes them) read back through
``torch.distributed.checkpoint``.

Saving needs nothing from DCP's storage layer: every process writes its own block of each
``DTensor`` (the block DCP's ``__create_chunk_list__`` names) into runstate's safetensors
files, and the manifest lists the blocks. Restoring into ``DTensor`` s of any placement and
any world size is DCP's load planning (resharding) over :class:`ChunkReader`, a DCP
``StorageReader`` that serves the manifest's blocks, checksum-verified, from runstate's
files. DCP's own file format (whose metadata is a pickle) is never used.

Imported only when a distributed restore reads sharded items (DCP is slow to import).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from runstate.adapters import REGISTRATIONS, find_codec, object_codecs
from runstate.adapters.torch import _CODE_TO_TORCH, is_dtensor
from runstate.errors import CheckpointError, CorruptCheckpointError
from runstate.format.tree import Encoder

__all__ = ["ChunkReader", "live_dtensors", "preload_sharded"]


def live_dtensors(item: str, value: Any) -> dict[str, Any]:
    """The DTensors of a live item, by the tensor names its checkpoint uses."""
    enc = Encoder(item, find_codec, object_codecs(), REGISTRATIONS)
    enc.encode(value)
    return {name: blob.source for name, blob in enc.blobs.items() if blob.source is not None}


class ChunkReader(StorageReader):
    """A DCP ``StorageReader`` over one item of a runstate checkpoint.

    Its metadata lists, for each requested tensor, the blocks the manifest holds (a tensor
    saved whole is one block at offset 0), so DCP's planner can fill any placement from
    them. Every block is read through the checkpoint reader, so its checksum is verified.
    """

    def __init__(self, reader: Any, item: str, names: list[str]) -> None:
        super().__init__()
        self.reader = reader
        self.item = item
        self.names = names
        self._storage: dict[MetadataIndex, str] = {}

    def reset(self, checkpoint_id: Any = None) -> None:
        return None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        entry = self.reader.manifest.items[self.item]
        md: dict[str, Any] = {}
        for name in self.names:
            chunked = entry.chunks.get(name)
            if chunked is not None:
                shape, code = chunked.shape, chunked.dtype
                parts = [(offsets, part, entry.tensors[part].shape) for offsets, part in chunked.parts]
            else:
                t = entry.tensors[name].decoded()
                shape, code = t.shape, t.dtype
                parts = [((0,) * len(shape), name, shape)]
            chunks = []
            for offsets, part, part_shape in parts:
                if math.prod(part_shape) == 0 and math.prod(shape) != 0:
                    continue
                chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(part_shape)))
                self._storage[MetadataIndex(name, torch.Size(offsets))] = part
            md[name] = TensorStorageMetadata(TensorProperties(dtype=_CODE_TO_TORCH[code]), torch.Size(shape), chunks)
        return Metadata(state_dict_metadata=md, storage_data=dict(self._storage))

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._storage = dict(metadata.storage_data)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read every requested region; each block is read (and its checksum verified) once,
        whole: its checksum covers the whole block, so a region cannot be verified alone."""
        blocks: dict[str, Any] = {}
        for req in sorted(plan.items, key=lambda r: self._storage[r.storage_index]):
            part = self._storage[req.storage_index]
            if part not in blocks:
                blocks.clear()  # requests are sorted by block: keep one block in memory
                blocks[part] = self.reader.load_tensor(self.item, part)
            block = blocks[part]
            for dim, (start, length) in enumerate(zip(req.storage_offsets, req.lengths, strict=True)):
                block = block.narrow(dim, start, length)
            target = planner.resolve_tensor(req).detach()
            target.copy_(block)
            planner.commit_tensor(req, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False


def preload_sharded(reader: Any, item: str, stored_item: str, value: Any, group: Any) -> dict[str, Any]:
    """Read the tensors of ``stored_item`` that are DTensors in the live ``value`` into new
    DTensors of the live placement (any world size), through DCP's load planning.

    Only tensors the checkpoint has with the same whole shape are read; the others are left
    to the ordinary restore, which reports them. Collective: every process calls it for the
    same items in the same order.

    Returns:
        New DTensors by tensor name; the live ones are not touched.
    """
    targets: dict[str, Any] = {}
    entry = reader.manifest.items[stored_item]
    try:
        live_tensors = live_dtensors(item, value)
    except CheckpointError:  # the ordinary restore of this item reports the problem
        live_tensors = {}
    for name, live in live_tensors.items():
        chunked = entry.chunks.get(name)
        stored = chunked if chunked is not None else entry.tensors[name].decoded() if name in entry.tensors else None
        if stored is None or tuple(stored.shape) != tuple(live.shape) or stored.dtype not in _CODE_TO_TORCH:
            continue
        targets[name] = torch.empty_like(live)
    targets.update(_fresh_optimizer_targets(entry, value, targets))
    if group.all_max(1 if targets else 0) == 0:
        return {}
    _load(reader, stored_item, targets, group)
    return targets


_OPTIMIZER_STATE = re.compile(r"^state\.(\d+)\.([A-Za-z0-9_]+)$")


def _fresh_optimizer_targets(entry: Any, value: Any, taken: Mapping[str, Any]) -> dict[str, Any]:
    """Targets for the state of an optimizer over DTensor parameters that has no state yet
    (a fresh optimizer in a resumed run): each state tensor shaped like its parameter is read
    into a DTensor placed like that parameter."""
    if not isinstance(value, torch.optim.Optimizer):
        return {}
    params = [p for group in value.param_groups for p in group["params"]]
    out = {}
    for name in [*entry.chunks, *(n for n in entry.tensors if "@" not in n)]:
        m = _OPTIMIZER_STATE.match(name)
        if m is None or name in taken or int(m.group(1)) >= len(params):
            continue
        param = params[int(m.group(1))]
        stored = entry.chunks.get(name) or entry.tensors[name].decoded()
        if is_dtensor(param) and tuple(stored.shape) == tuple(param.shape) and stored.dtype in _CODE_TO_TORCH:
            out[name] = torch.empty_like(param, dtype=_CODE_TO_TORCH[stored.dtype])
    return out


def _load(reader: Any, stored_item: str, targets: Mapping[str, Any], group: Any) -> None:
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import load

    storage = ChunkReader(reader, stored_item, sorted(targets))
    try:
        load(
            dict(targets),
            storage_reader=storage,
            planner=DefaultLoadPlanner(allow_partial_load=True),
            process_group=getattr(group, "process_group", None),
        )
    except CheckpointException as exc:
        corrupt = [e for failure in exc.failures.values() for e in _causes(failure)]
        if corrupt:
            raise CorruptCheckpointError(f"{reader.path}: sharded item {stored_item!r}: {corrupt[0]}") from exc
        failure: Any = next(iter(exc.failures.values()), None)
        first = failure[0] if isinstance(failure, tuple) else failure
        raise CheckpointError(
            f"{reader.path}: reading sharded item {stored_item!r} failed on rank(s) {sorted(exc.failures)}: {first!r}"
        ) from exc


def _causes(failure: Any) -> list[CorruptCheckpointError]:
    out = []
    seen = failure[0] if isinstance(failure, tuple) else failure  # DCP keeps (exception, stack)
    while seen is not None:
        if isinstance(seen, CorruptCheckpointError):
            out.append(seen)
        seen = getattr(seen, "__cause__", None) or getattr(seen, "__context__", None)
    return out
