"""Which items each process of a multi-process job saves.

Under ``torch.distributed`` (DDP, FSDP2) every process calls ``mgr.save(step, state)`` with
the same item names. runstate sorts the items into three kinds:

- **replicated** (the default): the same on every process, e.g. a DDP model and its
  optimizer; written once, by rank 0.
- **per-rank**: different on every process: :class:`runstate.RNG`, data loaders, and
  anything wrapped in :class:`PerRank`; every rank writes its own copy, stored as item
  ``<name>@rank<r>``, and restores its own copy.
- **sharded**: items holding ``DTensor`` s (FSDP2's ``fully_shard``): every rank writes
  its block of each DTensor; a restore reads the blocks into any placement and world size.

Nothing here imports a framework: the adapters name the per-rank values of theirs.
"""

from __future__ import annotations

from typing import Any

from runstate.errors import CheckpointConfigError
from runstate.rng import RNG

__all__ = ["ON_RESIZE", "PerRank", "is_per_rank", "unwrap"]

#: What a per-rank item does when restored by a different number of processes.
ON_RESIZE = ("error", "skip")


class PerRank:
    """Marks a state item as different on every process: each rank saves and restores its own.

    ``runstate.RNG`` and data loaders are per-rank without it.

    Args:
        value: the item (a Stateful, a registered object or plain values).
        on_resize: when the checkpoint was written by a different number of processes,
            ``"error"`` (the default) makes a strict restore fail with a
            ``StateMismatchError`` that names the item; ``"skip"`` keeps the item's live
            value (e.g. RNGs freshly seeded per rank) and logs it.

    Example:
        >>> state = {"model": ddp_model, "rng": runstate.RNG(),  # doctest: +SKIP
        ...          "sampler_seed": runstate.PerRank({"seed": seed + rank})}
    """

    def __init__(self, value: Any, *, on_resize: str = "error") -> None:
        if on_resize not in ON_RESIZE:
            raise CheckpointConfigError(f"PerRank(on_resize={on_resize!r}): use one of {ON_RESIZE}")
        if isinstance(value, PerRank):
            value = value.value
        self.value: Any = value
        self.on_resize = on_resize

    def __repr__(self) -> str:
        return f"PerRank({self.value!r}, on_resize={self.on_resize!r})"


def is_per_rank(value: Any) -> bool:
    """True for values each process saves for itself: PerRank, RNG, and those a framework
    adapter says differ on every process (data loaders)."""
    from runstate.adapters import is_per_rank_value

    return isinstance(value, (PerRank, RNG)) or is_per_rank_value(value)


def unwrap(value: Any) -> Any:
    """The value inside a :class:`PerRank`, or ``value`` itself."""
    return value.value if isinstance(value, PerRank) else value


def on_resize(value: Any) -> str:
    """The resize rule of a live item."""
    return value.on_resize if isinstance(value, PerRank) else "error"
