"""The processes that save one checkpoint together, seen by the framework-free core.

A :class:`Group` offers the few collective operations the checkpoint protocol needs: agree
on a number (``all_min`` / ``all_max``), hand a short text from one process to all of them
(``broadcast_text``) and wait for every process (``barrier``). Under ``torch.distributed``
the torch adapter provides one over the default process group; a single process is a
group of one. Nothing here imports a framework.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

__all__ = ["Group", "SingleProcess", "current_group", "raise_together", "same_everywhere"]


@runtime_checkable
class Group(Protocol):
    """Collective operations over the processes of one training job.

    Every process must call the same operations in the same order.
    """

    @property
    def rank(self) -> int:
        """This process's index, 0 to ``size - 1``."""
        ...

    @property
    def size(self) -> int:
        """The number of processes."""
        ...

    @property
    def distributed(self) -> bool:
        """True for a real process group (even of one process)."""
        ...

    def barrier(self) -> None:
        """Return once every process has called it."""

    def all_min(self, value: int) -> int:
        """The smallest of the values every process passed."""
        ...

    def all_max(self, value: int) -> int:
        """The largest of the values every process passed."""
        ...

    def broadcast_text(self, text: str, root: int = 0) -> str:
        """``root``'s ``text``, on every process."""
        ...


class SingleProcess:
    """The group of one process: every operation is immediate."""

    rank = 0
    size = 1
    distributed = False

    def barrier(self) -> None:
        return None

    def all_min(self, value: int) -> int:
        return value

    def all_max(self, value: int) -> int:
        return value

    def broadcast_text(self, text: str, root: int = 0) -> str:
        return text

    def __repr__(self) -> str:
        return "SingleProcess()"


def current_group(group: Any = None) -> Group:
    """The group to save with: ``group`` if given, else the default torch process group when
    ``torch.distributed`` is initialized, else a single process.

    Args:
        group: a :class:`Group`, a ``torch.distributed`` process group, or None.
    """
    if isinstance(group, Group):
        return group
    torch = sys.modules.get("torch")
    if group is not None or (
        torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized()
    ):
        from runstate.adapters.torch_dist import TorchGroup

        return TorchGroup(group)
    return SingleProcess()


def same_everywhere(group: Group, text: str) -> bool:
    """True when every process passed the same ``text`` (compared by a 63-bit hash).

    Collective: every process must call it. Two collectives, whatever the text's length.
    """
    if group.size == 1:
        return True
    digest = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") >> 1
    return group.all_min(digest) == group.all_max(digest)


def raise_together(group: Group, error: BaseException | None, otherwise: Callable[[], BaseException]) -> None:
    """Collective: when any process failed, every process raises.

    A process that failed raises its own ``error``; one that succeeded while another failed
    raises ``otherwise()``. Nothing happens when every process succeeded. One collective.
    """
    failed = group.all_min(0 if error is not None else 1) == 0
    if error is not None:
        raise error
    if failed:
        raise otherwise()
