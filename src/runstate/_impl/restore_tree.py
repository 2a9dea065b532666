"""Phase one of a restore, item by item: compare the stored tree with the live values.

The walk decides, for every stored value, whether it may replace the live one (same kind;
tensors of the same shape and dtype), and schedules the in-place loads of stateful objects
(``load_state_dict``, a registered ``set_state``, copying a generator) as actions of a
:class:`RestorePlan`, run only in phase two. Everything a framework knows (a torch module is
checked by its keys, an optimizer matched by parameter names, devices, JAX pytree checks)
comes from the adapters (:mod:`runstate.adapters`); nothing here names a framework.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runstate import adapters
from runstate._impl.restore_rename import Renamer
from runstate._impl.restore_report import Mismatch
from runstate._impl.restore_values import (
    aligned,
    has_namedtuples,
    is_namedtuple,
    is_tensor,
    kind,
    namedtuples_like,
    plain,
    qualname,
)
from runstate.errors import CheckpointError, StateMismatchError
from runstate.format.tree import NamedTupleState, StatefulState, format_path
from runstate.registry import Registration
from runstate.stateful import is_stateful

__all__ = ["RestorePlan", "restore_item"]

# Problems with which an object is still loaded (what matches is restored): the report says
# which parameters start fresh and which param groups keep their live hyper-parameters.
_LOADABLE = ("new_parameter", "dropped_parameter", "param_groups")


@dataclass
class RestorePlan:
    """What phase two will do, and what phase one found wrong (an adapter's ``RestoreContext``)."""

    state: Mapping[str, Any]
    renamer: Renamer
    actions: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)
    problems: list[Mismatch] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: data pointers of restored buffers live tensors took over in phase two (each is taken once)
    adopted: set[int] = field(default_factory=set)

    def add(self, path: tuple[Any, ...], kind: str, text: str) -> None:
        """Record a mismatch at ``path`` (starting with the item name)."""
        where = format_path(path)
        self.problems.append(Mismatch(str(path[0]), where, kind, f"{where}: {text}"))

    def rename_param(self, name: str | None) -> str | None:
        """A stored ``"item.key"`` parameter name after the ``rename`` rules."""
        return self.renamer.param(name)


def _tensor_differs(template: Any, stored: Any, path: tuple[Any, ...], plan: RestorePlan) -> bool:
    """Record a shape or dtype difference between two tensors; True when there is one."""
    if adapters.is_lazy(template):  # an uninitialized lazy parameter takes the stored shape (like torch)
        return False
    if tuple(template.shape) != tuple(stored.shape):
        plan.add(path, "shape", f"shape {tuple(stored.shape)} in checkpoint, {tuple(template.shape)} live")
        return True
    if str(template.dtype) != str(stored.dtype):
        plan.add(path, "dtype", f"dtype {stored.dtype} in checkpoint, {template.dtype} live")
        return True
    return False


def _replaceable(template: Any, stored: Any, path: tuple[Any, ...], plan: RestorePlan) -> bool:
    """Check that a stored value may replace the live one: same kind; tensors of the same shape
    and dtype. A live ``None`` is a placeholder that takes anything."""
    if template is None:
        return True
    live, got = kind(template), kind(stored)
    if live != got:
        plan.add(path, "kind", f"{got} in the checkpoint, {live} live")
        return False
    if is_tensor(template) and is_tensor(stored) and not isinstance(template, np.generic):
        return not _tensor_differs(template, stored, path, plan)
    return True


def _compare(template: Any, stored: Any, path: tuple[Any, ...], plan: RestorePlan, *, keys: bool, kinds: bool) -> None:
    """Record key, shape, dtype (and with ``kinds``, tensor vs non-tensor) differences between
    a live state_dict and a stored one."""
    if isinstance(template, dict) and isinstance(stored, dict):
        if keys and template:
            for k in template:
                if k not in stored:
                    plan.add((*path, k), "missing", "missing from the checkpoint")
            for k in stored:
                if k not in template:
                    plan.add((*path, k), "unexpected", "in the checkpoint but not in the live object")
        for k, v in stored.items():
            if k in template:
                _compare(template[k], v, (*path, k), plan, keys=False, kinds=kinds)
        return
    live_tensor, stored_tensor = is_tensor(template), is_tensor(stored)
    if live_tensor and stored_tensor:
        _tensor_differs(template, stored, path, plan)
    elif kinds and live_tensor != stored_tensor and template is not None:
        plan.add(path, "kind", f"{kind(stored)} in the checkpoint, {kind(template)} live")


def _place(stored: Any, template: Any) -> Any:
    """Send restored values to the devices of the live values at the same paths."""
    if isinstance(stored, dict) and isinstance(template, dict):
        return {k: _place(v, template.get(k)) for k, v in stored.items()}
    return adapters.place_like(stored, template)


def _same_class(stored: str, cls: type) -> bool:
    """True when ``stored`` (``<module>.<qualname>``) names ``cls``.

    A class defined in the script that saved is ``__main__.X`` there and ``train.X`` when the
    script is imported (or the other way round): those match.
    """
    if stored == qualname(cls):
        return True
    if stored.startswith("__main__."):
        return stored.removeprefix("__main__.") == cls.__qualname__
    return cls.__module__ == "__main__" and stored.endswith(f".{cls.__qualname__}")


def _check_class(obj: Any, stored: StatefulState, path: tuple[Any, ...], plan: RestorePlan) -> bool:
    """Record a stateful object of another class than the stored one; True when they match.

    The state_dict of one class does not fit another (Adam's moments in SGD, a StepLR's
    state in a CosineAnnealingLR): loading it would be accepted and go wrong later.
    """
    if _same_class(stored.type, type(obj)):
        return True
    plan.add(
        path,
        "class",
        f"the checkpoint holds the state of a {stored.type}, the live object is a {qualname(type(obj))}; "
        f"restore into an object of the stored class, or pass exclude=[{path[0]!r}] to leave this item alone",
    )
    plan.skipped.append(format_path(path))
    return False


def _live_state(get: Callable[[], Any], path: tuple[Any, ...], what: str) -> Any:
    """Call a live object's ``state_dict()`` (user code): its failure is a clear error."""
    try:
        return get()
    except CheckpointError:
        raise
    except Exception as exc:
        raise StateMismatchError(f"{format_path(path)}: {what} raised {exc!r}; nothing was changed") from exc


def _check_devices(stored: Any, path: tuple[Any, ...], plan: RestorePlan) -> bool:
    """Record every stored value in a tree that this machine cannot create; True if any."""
    missing = adapters.unavailable(stored)
    if missing is not None:
        plan.add(path, "device", f"{missing.reason}; pass strict=False to keep the live value")
        return True
    if isinstance(stored, dict):
        return any([_check_devices(v, (*path, k), plan) for k, v in stored.items()])
    if type(stored) in (list, tuple):
        return any([_check_devices(v, (*path, i), plan) for i, v in enumerate(stored)])
    return False


def _restore_stateful(obj: Any, stored: StatefulState, path: tuple[Any, ...], plan: RestorePlan) -> None:
    """Check a live object's state against the stored one; schedule its ``load_state_dict``."""
    where = format_path(path)
    rule = adapters.stateful_rule(obj)
    if rule.check_class and not _check_class(obj, stored, path, plan):
        return
    template = _live_state(obj.state_dict, path, f"{type(obj).__qualname__}.state_dict()")
    before = len(plan.problems)
    source = adapters.stateful_source(obj, stored, path, plan)
    _compare(template, source, path, plan, keys=True, kinds=rule.compare_kinds)
    _check_devices(source, path, plan)
    problems = plan.problems[before:]
    state = _place(source, template)
    if rule.partial_load:
        if problems and isinstance(state, dict):
            bad = {p.key for p in problems}
            state = {k: v for k, v in state.items() if k in template and format_path((*path, k)) not in bad}
        plan.actions.append((where, functools.partial(_load, obj, state, plan.adopted, strict=not problems)))
    elif problems and not all(p.kind in _LOADABLE for p in problems):
        plan.skipped.append(where)
    else:
        plan.actions.append((where, functools.partial(_load, obj, state, plan.adopted, strict=None)))


def _load(obj: Any, state: Any, adopted: set[int], *, strict: bool | None) -> Any:
    """Phase two: ``obj.load_state_dict(state)``, its live tensors first taking over the restored
    buffers where the framework says that equals copying into them."""
    adapters.adopt_restored(obj, state, adopted)
    return obj.load_state_dict(state) if strict is None else obj.load_state_dict(state, strict=strict)


def _restore_registered(
    obj: Any, registered: Registration, stored: StatefulState, path: tuple[Any, ...], plan: RestorePlan
) -> None:
    """An object of a class registered with ``runstate.register``: ``set_state`` in place."""
    where = format_path(path)
    if not _check_class(obj, stored, path, plan):
        return
    template = _live_state(
        lambda: registered.get_state(obj), path, f"the get_state registered for {type(obj).__qualname__}"
    )
    before = len(plan.problems)
    _compare(template, stored.state, path, plan, keys=True, kinds=False)
    _check_devices(stored.state, path, plan)
    state = namedtuples_like(stored.state, template)
    if len(plan.problems) > before:
        plan.skipped.append(where)
    else:
        plan.actions.append((where, lambda: registered.set_state(obj, state)))


def _with_namedtuples(stored: StatefulState, obj: Any, path: tuple[Any, ...]) -> StatefulState:
    if not has_namedtuples(stored.state):
        return stored
    template = _live_state(obj.state_dict, path, f"{type(obj).__qualname__}.state_dict()")
    return StatefulState(stored.type, namedtuples_like(stored.state, template), stored.param_names)


def _restore_object(template: Any, stored: StatefulState, path: tuple[Any, ...], plan: RestorePlan) -> Any:
    """A stored object's state: loaded into the live object, or its plain state replacing it."""
    registered = adapters.REGISTRATIONS.get(type(template))
    if registered is not None:
        _restore_registered(template, registered, stored, path, plan)
        return template
    if is_stateful(template):
        _restore_stateful(template, _with_namedtuples(stored, template, path), path, plan)
        return template
    if not _replaceable(template, stored, path, plan) or _check_devices(stored.state, path, plan):
        return template
    return plain(stored)


def _restore_namedtuple(template: Any, stored: NamedTupleState, path: tuple[Any, ...], plan: RestorePlan) -> Any:
    """Rebuild a namedtuple as the live value's class; never import the class the manifest names."""
    if template is not None and not isinstance(template, tuple):
        _replaceable(template, stored, path, plan)
        return template
    return _rebuild_namedtuple(template, stored, path, plan)


def _rebuild_namedtuple(template: Any, stored: NamedTupleState, path: tuple[Any, ...], plan: RestorePlan) -> Any:
    cls = type(template)
    if is_namedtuple(template) and qualname(cls) == stored.type and cls._fields == stored.fields:
        values = [
            _restore_into(live, value, (*path, name), plan)
            for name, live, value in zip(stored.fields, template, stored.values, strict=True)
        ]
        return cls._make(values)
    if is_namedtuple(template):
        plan.add(path, "type", f"a {stored.type}{stored.fields} in the checkpoint, a {qualname(cls)}{cls._fields} live")
        return template
    return tuple(_restore_into(None, v, (*path, f), plan) for f, v in zip(stored.fields, stored.values, strict=True))


def _copy_into_later(template: Any, stored: Any, path: tuple[Any, ...], plan: RestorePlan) -> bool:
    """Schedule copying a restored generator into the live one (phase two, like ``load_state_dict``).

    Copying right away would change the live generator even when another item then turns
    out not to match and the restore is abandoned.
    """
    for codec in adapters.object_codecs():
        live, got = codec.get(template), codec.get(stored)
        if live is not None and got is not None and live[0] == got[0] and live[2] == got[2]:
            plan.actions.append((format_path(path), functools.partial(codec.copy_into, template, stored)))
            return True
    return False


def _restore_into(template: Any, stored: Any, path: tuple[Any, ...], plan: RestorePlan) -> Any:
    """Return the value that replaces ``template``; schedule in-place loads in ``plan``.

    A stored value that may not replace the live one (another kind, shape or dtype) is a
    problem, and the live value is kept.
    """
    if isinstance(stored, dict) and not isinstance(template, dict) and is_stateful(template):
        # A plain dict stored for a live object (e.g. a state_dict saved on its own): load it.
        stored = StatefulState(qualname(type(template)), stored)
    if isinstance(stored, StatefulState):
        return _restore_object(template, stored, path, plan)
    if isinstance(stored, NamedTupleState):
        return _restore_namedtuple(template, stored, path, plan)
    if isinstance(stored, dict) or type(stored) in (list, tuple):
        if not _replaceable(template, stored, path, plan):
            return template
        if isinstance(stored, dict):
            t = template if isinstance(template, dict) else {}
            return type(stored)((k, _restore_into(t.get(k), v, (*path, k), plan)) for k, v in stored.items())
        seq = aligned(template, len(stored))
        out = [_restore_into(a, b, (*path, i), plan) for i, (a, b) in enumerate(zip(seq, stored, strict=True))]
        return out if type(stored) is list else tuple(out)
    if _check_devices(stored, path, plan) or not _replaceable(template, stored, path, plan):
        return template
    live_object = template is not None and type(template) is type(stored) and not is_tensor(stored)
    if live_object and _copy_into_later(template, stored, path, plan):
        return template
    return adapters.place_like(stored, template)


def restore_item(template: Any, stored: Any, path: tuple[Any, ...], plan: RestorePlan) -> Any:
    """Restore one item; a replaced value must also pass its framework's structural checks.

    JAX values are replaced, not loaded into, so nothing else would notice a pytree of another
    structure, shape or dtype. An item that does not match keeps its live value (with
    ``strict=False``).
    """
    restored = _restore_into(template, stored, path, plan)
    if restored is template:
        return restored
    problems = adapters.check_like(template, restored)
    for where, what, text in problems:
        plan.add((*path, *where), what, text)
    return template if problems else restored
