"""Data loaders in a saved state: make them resume exactly, or say at once why they cannot.

A user who adds runstate to an existing script expects the resumed run to be the same run.
Before a save or a restore, :func:`prepare` looks at the state's items (and the dicts, lists
and tuples inside them):

* a torchdata ``StatefulDataLoader`` is made exactly resumable (``runstate.adapters.torch_data``);
* a ``torch.utils.data.DataLoader``, an iterator over data (``iter(loader)``) or a generator
  has no position that can be saved: it is saved as a marker, and the first save logs one
  WARNING naming the item and the one-line fix (``require_exact=True`` raises instead). On
  restore it keeps its live value, with a WARNING that it starts a new pass.

This module imports no framework; the torch part is imported only when torch is.
"""

from __future__ import annotations

import logging
import sys
import types
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

from runstate import adapters
from runstate.distributed import unwrap
from runstate.errors import UnsupportedTypeError

__all__ = ["GeneratorObjects", "prepare"]

logger = logging.getLogger("runstate")

HOOK = "_runstate_exact"  # attribute of a loader or iterator holding runstate's handler
FIX = (
    "put the loader itself in the state (not an iterator over it) and make it a "
    "torchdata.stateful_dataloader.StatefulDataLoader(...), which takes the same arguments as "
    "torch.utils.data.DataLoader"
)
_MAX_WALK = 64  # containers longer than this are data, not a place where loaders sit
_warned_generators: weakref.WeakSet[Any] = weakref.WeakSet()


class Unresumable:
    """``state_dict``/``load_state_dict`` for a loader or iterator without a position to save."""

    def __init__(self, kind: str, name: str) -> None:
        self.kind = kind
        self.name = name
        self.warned = False

    def state_dict(self) -> dict[str, Any]:
        return {"unresumable": self.kind}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _warn_restored(self.name, self.kind)


def _warn_restored(name: str, kind: str) -> None:
    logger.warning(
        "%s: a %s has no saved position; it starts a new pass over the data, so this run is not the "
        "same as an uninterrupted one. Fix: %s",
        name,
        kind,
        FIX,
    )


def is_unresumable_iterator(value: Any) -> bool:
    """True for a generator or an iterator (``iter(loader)``) that has no saveable state."""
    return (
        isinstance(value, Iterator)
        and not callable(getattr(value, "state_dict", None))
        and adapters.REGISTRATIONS.get(type(value)) is None
    )


def flag(value: Any, name: str, kind: str, *, saving: bool, require_exact: bool) -> None:
    """Save ``value`` as a marker: one WARNING at its first save, or an error with ``require_exact``.

    Raises:
        UnsupportedTypeError: ``saving`` and ``require_exact``.
    """
    if saving and require_exact:
        raise UnsupportedTypeError(
            f"{name}: a {kind} cannot resume where it stopped (it has no position to save), and "
            f"require_exact=True refuses it. Fix: {FIX}"
        )
    hook = getattr(value, "__dict__", {}).get(HOOK)
    if isinstance(value, types.GeneratorType):
        first = value not in _warned_generators
        if saving:
            _warned_generators.add(value)
    else:
        if hook is None:
            hook = Unresumable(kind, name)
            value.__dict__[HOOK] = hook
            value.state_dict = hook.state_dict
            value.load_state_dict = hook.load_state_dict
        first = not hook.warned
        if saving:
            hook.warned = True
    if saving and first:
        logger.warning(
            "%s: a %s cannot resume where it stopped (it has no position to save): it is saved as a "
            "marker, and a resumed run starts a new pass over the data, so it is not the same run. Fix: %s",
            name,
            kind,
            FIX,
        )


def _walk(value: Any, name: str, depth: int = 0) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict) and depth < 3 and len(value) <= _MAX_WALK:
        for k, v in value.items():
            yield from _walk(v, f"{name}[{k!r}]", depth + 1)
    elif type(value) in (list, tuple) and depth < 3 and len(value) <= _MAX_WALK:
        for i, v in enumerate(value):
            yield from _walk(v, f"{name}[{i}]", depth + 1)
    else:
        yield name, value


def prepare(state: Mapping[str, Any], *, saving: bool, require_exact: bool = False) -> None:
    """Make the state's data loaders resume exactly; flag those that cannot (see the module doc).

    Args:
        state: the state passed to a save or restore.
        saving: True before a save (warnings and ``require_exact`` apply), False before a restore.
        require_exact: raise instead of warning for a loader that cannot resume exactly.

    Raises:
        UnsupportedTypeError: ``saving`` and ``require_exact``, and a loader cannot resume exactly.
    """
    torch_data: Any = None
    if sys.modules.get("torch") is not None:  # None: marked not installed
        from runstate.adapters import torch_data
    leaves: list[Any] = []
    for key, item in state.items():
        for name, leaf in _walk(unwrap(item), f"state[{key!r}]"):
            leaves.append(leaf)
            if torch_data is not None and torch_data.handle(leaf, name, saving=saving, require_exact=require_exact):
                continue
            if is_unresumable_iterator(leaf):
                kind = "generator" if isinstance(leaf, types.GeneratorType) else f"{type(leaf).__qualname__} iterator"
                flag(leaf, name, kind, saving=saving, require_exact=require_exact)
    for adapter in adapters.active_adapters():  # e.g. tf.data iterators and the generators they draw from
        adapter.prepare_leaves(leaves, saving=saving)


def _exhausted() -> Iterator[Any]:
    yield from ()


class GeneratorObjects:
    """Object codec for generators: stored as a marker; a restore keeps the live generator."""

    def get(self, value: Any) -> tuple[str, Any, dict[str, Any]] | None:
        if isinstance(value, types.GeneratorType):
            return "python.generator", {"unresumable": "generator"}, {}
        return None

    def make(self, kind: str, state: Any, attrs: dict[str, Any]) -> Any:
        if kind != "python.generator":
            raise KeyError(kind)
        return _exhausted()  # nothing to resume from: ``runstate.load(path)`` shows an empty generator

    def copy_into(self, target: Any, source: Any) -> bool:
        if isinstance(target, types.GeneratorType) and isinstance(source, types.GeneratorType):
            _warn_restored("a generator in the state", "generator")
            return True
        return False
