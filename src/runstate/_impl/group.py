"""The processes that save one checkpoint together, seen by the framework-free core.

A :class:`Group` offers the few collective operations the checkpoint protocol needs: agree
on a number (``all_min`` / ``all_max``) and hand a short text from one process to all of them
(``broadcast_text``). A framework adapter provides one over its process group (the torch
adapter under ``torch.distributed``); a single process is a group of one, so one save
pipeline serves both. :func:`agree` is the one way the processes decide to fail together.
Nothing here imports a framework.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from runstate import adapters

__all__ = ["Group", "SingleProcess", "agree", "current_group", "same_everywhere"]


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

    def all_min(self, value: int) -> int:
        return value

    def all_max(self, value: int) -> int:
        return value

    def broadcast_text(self, text: str, root: int = 0) -> str:
        return text

    def __repr__(self) -> str:
        return "SingleProcess()"


def current_group(group: Any = None) -> Group:
    """The group to save with: ``group`` if it is a :class:`Group`, else the group a framework
    adapter offers (a ``torch.distributed`` process group given, or the default one when
    initialized), else a single process.

    Args:
        group: a :class:`Group`, a framework's process group, or None.

    Raises:
        CheckpointConfigError: ``group`` is given but no imported framework knows it.
    """
    if isinstance(group, Group):
        return group
    return adapters.default_group(group) or SingleProcess()


def same_everywhere(group: Group, text: str) -> bool:
    """True when every process passed the same ``text`` (compared by a 63-bit hash).

    Collective: every process must call it. Two collectives, whatever the text's length.
    """
    if group.size == 1:
        return True
    digest = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") >> 1
    return group.all_min(digest) == group.all_max(digest)


def agree(
    group: Group,
    error: BaseException | None,
    otherwise: Callable[[], BaseException],
    *,
    kinds: Sequence[tuple[type[BaseException], Callable[[], BaseException]]] = (),
) -> None:
    """Collective: the one "agree with every rank, then raise" step; when any process failed, every process raises.

    A process that failed raises its own ``error``; one that succeeded while another failed
    raises ``otherwise()``. Nothing happens when every process succeeded. One collective
    (none in a group of one).

    With ``kinds``, the *kind* of failure is agreed too, so that a caller catching one kind
    sees it on every process: ``kinds`` lists error classes from the one that wins to the one
    that loses, each with the error a process raises when another process failed with that
    kind. An error of no listed kind wins over all of them: the processes that failed with one
    raise their own, every other process ``otherwise()`` (chained to its own error, if any).

    Args:
        group: the processes that decide together; every one of them must call it.
        error: what this process failed with, or None.
        otherwise: builds the error raised by a process that succeeded while another failed.
        kinds: ``(error class, builds the error to raise instead)`` pairs, winner first.
    """
    mine = len(kinds) + 1 if error is None else 0
    for i, (kind, _) in enumerate(kinds):
        if error is not None and isinstance(error, kind):
            mine = i + 1
            break
    agreed = group.all_min(mine)
    if agreed == len(kinds) + 1:
        return
    if error is not None and agreed == mine:  # this process failed with the agreed kind
        raise error
    if agreed == 0:
        raise otherwise() from error
    raise kinds[agreed - 1][1]() from error
