"""State conventions for classes that have no ``state_dict``/``load_state_dict``.

Anything with ``state_dict()``/``load_state_dict()`` is saved and restored without
registering (:class:`runstate.Stateful`). Frameworks that name these methods differently
(``get_config``/``set_config``, ``save_state``/``load_state``, a pair of free functions)
register the class once with :func:`register`; its instances are then stored like Stateful
objects (a ``stateful`` node holding ``get_state(obj)``) and restored in place with
``set_state(obj, state)``.

The registry is one explicit object, :data:`registry`, rather than hidden module state:
a value can sit anywhere in a state, so the encoder and the restore have to consult the same
table. Registrations are keyed by **exact** class (a subclass is not covered), so registering
one class never changes how any other value is stored, and they last until
:meth:`Registry.unregister`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from runstate.errors import CheckpointConfigError

__all__ = ["Registration", "Registry", "register", "registry"]

# Values the typed tree stores natively: registering them would change every checkpoint.
_NATIVE: tuple[type, ...] = (type(None), bool, int, float, str, bytes, list, tuple, dict, OrderedDict)


class Registrations(Protocol):
    """Where the save and restore paths look up how a class is saved (a :class:`Registry`, or
    one that also asks the imported frameworks' adapters: ``runstate.adapters.REGISTRATIONS``)."""

    def get(self, type_: type, /) -> Registration | None:
        """How instances of exactly ``type_`` are saved and restored, or None."""
        ...


@dataclass(frozen=True)
class Registration:
    """How to read and write the state of one class.

    Attributes:
        type: the registered class (matched exactly, not its subclasses).
        get_state: returns the object's state as plain values, arrays and tensors.
        set_state: puts a state returned by ``get_state`` back into the object, in place.
    """

    type: type
    get_state: Callable[[Any], Any]
    set_state: Callable[[Any, Any], Any]


class Registry:
    """A table of :class:`Registration` by exact class; ``runstate.registry`` is the one in use.

    Example:
        >>> import runstate
        >>> class Counter:
        ...     def __init__(self): self.n = 0
        >>> runstate.registry.register(Counter, get_state=lambda c: {"n": c.n},
        ...                            set_state=lambda c, s: setattr(c, "n", s["n"]))
        >>> Counter in runstate.registry
        True
        >>> runstate.registry.unregister(Counter)
    """

    def __init__(self) -> None:
        self._entries: dict[type, Registration] = {}

    def register(
        self,
        type_: type,
        *,
        get_state: Callable[[Any], Any],
        set_state: Callable[[Any, Any], Any],
    ) -> Registration:
        """Register how to get and set the state of instances of ``type_``.

        Args:
            type_: the class; only its exact instances are covered.
            get_state: ``get_state(obj)`` returns the state to save (plain values, arrays,
                tensors, nested dicts and lists of them).
            set_state: ``set_state(obj, state)`` restores ``obj`` in place from that state.

        Returns:
            The :class:`Registration`. Registering a class again with the same two functions
            (a script or notebook cell run twice) returns the existing one.

        Raises:
            TypeError: ``type_`` is not a class, is a type the checkpoint format stores natively
                (``int``, ``dict``, ...), or a function is not callable.
            CheckpointConfigError: ``type_`` is already registered with other functions (unregister it
                first); a ``ValueError``.
        """
        if not isinstance(type_, type):
            raise TypeError(f"register() needs a class, got {type_!r}")
        if type_ in _NATIVE:
            raise TypeError(f"{type_.__qualname__} is stored natively by runstate and cannot be registered")
        if not callable(get_state) or not callable(set_state):
            raise TypeError("register() needs callable get_state and set_state")
        existing = self._entries.get(type_)
        if existing is not None and existing.get_state == get_state and existing.set_state == set_state:
            return existing
        if existing is not None:
            raise CheckpointConfigError(
                f"{type_.__module__}.{type_.__qualname__} is already registered with other functions; call "
                "runstate.registry.unregister() first to replace it"
            )
        entry = Registration(type_, get_state, set_state)
        self._entries[type_] = entry
        return entry

    def unregister(self, type_: type) -> None:
        """Forget the registration of ``type_``.

        Raises:
            KeyError: ``type_`` is not registered.
        """
        if type_ not in self._entries:
            raise KeyError(f"{type_!r} is not registered")
        del self._entries[type_]

    def get(self, type_: type, /) -> Registration | None:
        """The registration of exactly ``type_``, or None."""
        return self._entries.get(type_)

    def __contains__(self, type_: object) -> bool:
        return type_ in self._entries

    def __iter__(self) -> Iterator[type]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        names = ", ".join(f"{t.__module__}.{t.__qualname__}" for t in self._entries)
        return f"Registry([{names}])"


#: The registry that ``runstate.save``/``load`` and ``CheckpointManager`` consult.
registry = Registry()


def register(
    type_: type,
    *,
    get_state: Callable[[Any], Any],
    set_state: Callable[[Any, Any], Any],
) -> Registration:
    """Register a class whose state is read and written by other means than ``state_dict``.

    Shorthand for ``runstate.registry.register(...)`` (see :meth:`Registry.register`).

    Example:
        >>> runstate.register(Adam, get_state=lambda o: o.save_state(),  # doctest: +SKIP
        ...                   set_state=lambda o, s: o.load_state(s))
    """
    return registry.register(type_, get_state=get_state, set_state=set_state)
