"""The one extension point users meet: anything with ``state_dict``/``load_state_dict``.

torch modules, optimizers, LR schedulers, ``GradScaler``, torchdata's ``StatefulDataLoader``
and user objects all satisfy this protocol, so none of them needs registering.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["Stateful", "is_stateful"]


@runtime_checkable
class Stateful(Protocol):
    """An object whose state is saved with ``state_dict()`` and restored in place with
    ``load_state_dict()``."""

    def state_dict(self) -> dict[str, Any]:
        """Return the object's state as a (nested) dict of plain values and tensors."""
        ...

    def load_state_dict(self, state_dict: dict[str, Any], /) -> Any:
        """Restore the object in place from a dict produced by :meth:`state_dict`."""
        ...


def is_stateful(obj: object) -> bool:
    """True when ``obj`` is an instance exposing callable ``state_dict``/``load_state_dict``."""
    if isinstance(obj, type):
        return False
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))
