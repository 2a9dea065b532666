"""Decoded values as a restore sees them: their kind in words, plain trees, namedtuples.

Two values of the same *kind* may replace each other; a stored namedtuple is rebuilt only as
the class of the live value it replaces (the class the manifest names is never imported).
Framework values are recognised through the adapters (:mod:`runstate.adapters`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runstate import adapters
from runstate.errors import UnsupportedTypeError
from runstate.format.tree import NamedTupleState, StatefulState

__all__ = ["aligned", "has_namedtuples", "is_namedtuple", "is_tensor", "kind", "namedtuples_like", "plain", "qualname"]


def qualname(cls: type) -> str:
    """``<module>.<qualname>`` of a class, as a manifest names it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def plain(value: Any) -> Any:
    """Replace every ``StatefulState`` in a decoded tree by its plain state.

    Raises:
        UnsupportedTypeError: the tree holds a value this machine cannot create (a CUDA
            ``torch.Generator`` without CUDA).
    """
    if isinstance(value, StatefulState):
        return plain(value.state)
    if isinstance(value, NamedTupleState):
        return tuple(plain(v) for v in value.values)  # the class is rebuilt only from a live value
    if isinstance(value, dict):
        return type(value)((k, plain(v)) for k, v in value.items())
    if type(value) is list:
        return [plain(v) for v in value]
    if type(value) is tuple:
        return tuple(plain(v) for v in value)
    missing = adapters.unavailable(value)
    if missing is not None:
        raise UnsupportedTypeError(
            f"{missing.reason}; load it on a machine that has that device, or restore into a live state "
            "with strict=False to keep the live value instead"
        )
    return value


def is_tensor(x: Any) -> bool:
    """True for an array-like value with a shape and a dtype (or a lazy one, shape unknown)."""
    if adapters.is_lazy(x):
        return True
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (int, float))


def kind(value: Any) -> str:
    """What kind of value this is, in words; two values of the same kind can replace each other.

    Plain values (numbers, strings, None, NumPy scalars) are one kind: a count stored as an
    int replaces a live float. Containers, tensors of each library, generators of each kind
    (and device) and the objects of each class are kinds of their own.
    """
    if isinstance(value, StatefulState):
        return f"the state of a {value.type}"
    if isinstance(value, NamedTupleState):
        return "a list or tuple"
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, np.generic)):
        return "a plain value"
    if isinstance(value, dict):
        return "a dict"
    if isinstance(value, (list, tuple)):
        return "a list or tuple"
    missing = adapters.unavailable(value)
    if missing is not None:
        return missing.what
    codec = adapters.find_codec(value)
    if codec is not None:
        return "a NumPy array" if codec.lib == "numpy" else f"a {codec.lib} tensor"
    for objects in adapters.object_codecs():
        got = objects.get(value)
        if got is not None:
            attrs = ", ".join(f"{k} {v}" for k, v in sorted(got[2].items()))
            return f"a {got[0]}" + (f" ({attrs})" if attrs else "")
    return f"a {qualname(type(value))}"


def is_namedtuple(value: Any) -> bool:
    """True for an instance of a ``collections.namedtuple`` / ``typing.NamedTuple`` class."""
    return isinstance(value, tuple) and isinstance(getattr(type(value), "_fields", None), tuple)


def has_namedtuples(value: Any) -> bool:
    """True when a decoded tree holds a stored namedtuple."""
    if isinstance(value, NamedTupleState):
        return True
    if isinstance(value, dict):
        return any(has_namedtuples(v) for v in value.values())
    if type(value) in (list, tuple):
        return any(has_namedtuples(v) for v in value)
    return False


def aligned(template: Any, n: int) -> Any:
    """The live sequence matching a stored one of length ``n`` item by item, else ``n`` Nones."""
    return template if isinstance(template, (list, tuple)) and len(template) == n else [None] * n


def namedtuples_like(stored: Any, template: Any) -> Any:
    """Turn ``NamedTupleState`` in a stored state_dict into the live state_dict's classes."""
    if isinstance(stored, NamedTupleState):
        cls = type(template)
        same = is_namedtuple(template) and len(template) == len(stored.values)
        items = template if same else (None,) * len(stored.values)
        values = [namedtuples_like(v, t) for v, t in zip(stored.values, items, strict=True)]
        if is_namedtuple(template) and qualname(cls) == stored.type and cls._fields == stored.fields:
            return cls._make(values)
        return tuple(values)
    if isinstance(stored, dict):
        t = template if isinstance(template, dict) else {}
        return type(stored)((k, namedtuples_like(v, t.get(k))) for k, v in stored.items())
    if type(stored) in (list, tuple):
        seq = aligned(template, len(stored))
        out = [namedtuples_like(v, t) for v, t in zip(stored, seq, strict=True)]
        return out if type(stored) is list else tuple(out)
    return stored
