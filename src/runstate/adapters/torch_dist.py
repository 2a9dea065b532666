"""torch.distributed support: the process group as a :class:`~runstate._impl.group.Group`,
and sharded items read into the live placement (:mod:`runstate.adapters.torch_dcp`).

Active once the program imports torch (which imports ``torch.distributed``); DCP itself is
imported only when a distributed restore meets an item.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from runstate.adapters.base import Adapter
from runstate.errors import CheckpointConfigError

if TYPE_CHECKING:
    from runstate._impl.group import Group
    from runstate._impl.reader import CheckpointReader

__all__ = ["ADAPTER", "TorchDistAdapter", "TorchGroup"]


class TorchGroup:
    """A :class:`~runstate._impl.group.Group` over a ``torch.distributed`` process group.

    Args:
        process_group: the group (None: the default one).
    """

    distributed = True

    def __init__(self, process_group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise CheckpointConfigError(
                "torch.distributed is not initialized; call torch.distributed.init_process_group first"
            )
        self.process_group = process_group
        self._cuda = "nccl" in str(dist.get_backend(process_group))

    @property
    def _device(self) -> torch.device:
        # Looked up at each call: the manager may exist before torch.cuda.set_device(local_rank).
        return torch.device("cuda", torch.cuda.current_device()) if self._cuda else torch.device("cpu")

    @property
    def rank(self) -> int:
        return int(dist.get_rank(self.process_group))

    @property
    def size(self) -> int:
        return int(dist.get_world_size(self.process_group))

    def _reduce(self, value: int, op: Any) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self._device)
        dist.all_reduce(t, op=op, group=self.process_group)
        return int(t.item())

    def all_min(self, value: int) -> int:
        return self._reduce(value, dist.ReduceOp.MIN)

    def all_max(self, value: int) -> int:
        return self._reduce(value, dist.ReduceOp.MAX)

    def broadcast_text(self, text: str, root: int = 0) -> str:
        src = dist.get_global_rank(self.process_group, root) if self.process_group is not None else root
        raw = text.encode("utf-8")
        n = torch.tensor([len(raw)], dtype=torch.int64, device=self._device)
        dist.broadcast(n, src=src, group=self.process_group)
        buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=self._device)
        if self.rank == root and raw:
            buf.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        dist.broadcast(buf, src=src, group=self.process_group)
        return bytes(buf.cpu().numpy()).decode("utf-8")

    def __repr__(self) -> str:
        return f"TorchGroup(rank={self.rank}, size={self.size})"


class TorchDistAdapter(Adapter):
    """torch.distributed: the default process group, and DTensors read in any placement."""

    name = "torch.distributed"

    def default_group(self, group: Any) -> Group | None:
        """``group`` (a torch process group) or the default one when initialized, as a Group."""
        if group is not None or (dist.is_available() and dist.is_initialized()):
            return TorchGroup(group)
        return None

    def preload_sharded(
        self, reader: CheckpointReader, item: str, stored_item: str, value: Any, group: Group
    ) -> dict[str, Any]:
        if not isinstance(group, TorchGroup):
            return {}  # sharded tensors live in a torch process group
        from runstate.adapters import torch_dcp

        return torch_dcp.preload_sharded(reader, item, stored_item, value, group)


ADAPTER = TorchDistAdapter()
