"""Putting a checkpoint's values back into a live state.

Restoring is two-phase: every item is read, verified and checked against the live objects
first, and only when all of that succeeded are objects changed in place (``load_state_dict``)
and plain values replaced. A corrupt file or a mismatch therefore changes nothing. What did
not match is returned as a :class:`RestoreReport`.

Phase one checks everything that can be checked without changing anything: item names, keys,
shapes and dtypes of state_dicts and of replaced values, the kind of every replaced value, the
class of every stateful object (a module is checked by its keys instead), optimizer parameters
and param groups (matched by name), devices a stored generator needs. Phase two cannot be
undone: when a ``load_state_dict`` still raises there, the items already changed are named in
a :class:`~runstate.errors.PartialRestoreError`. Snapshotting every item to roll it back would
double the memory of a restore (a model's and its optimizer's tensors), so runstate does not.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import re
import sys
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runstate._impl.group import Group, SingleProcess, same_everywhere
from runstate._impl.reader import CheckpointReader
from runstate.adapters import find_codec, object_codecs
from runstate.distributed import PerRank, is_per_rank, on_resize, unwrap
from runstate.errors import (
    CheckpointError,
    CorruptCheckpointError,
    PartialRestoreError,
    StateMismatchError,
    UnsupportedTypeError,
)
from runstate.format.manifest import item_name, per_rank_name
from runstate.format.tree import NamedTupleState, StatefulState, format_path
from runstate.registry import Registration, registry
from runstate.stateful import is_stateful

__all__ = ["Mismatch", "PendingRestore", "RestoreReport", "plain", "plan_restore", "restore_state"]

logger = logging.getLogger("runstate")

#: ``{"model": [(r"^module\.", "")]}``: regex substitutions applied to an item's stored keys.
Renames = Mapping[str, Sequence[tuple[str, str]]]
_Rules = dict[str, list[tuple["re.Pattern[str]", str]]]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# Problems with which an object is still loaded (what matches is restored): the report says
# which parameters start fresh and which param groups keep their live hyper-parameters.
_LOADABLE = ("new_parameter", "dropped_parameter", "param_groups")


@dataclass(frozen=True)
class Mismatch:
    """One difference between the live state and the checkpoint.

    Attributes:
        item: the top-level item.
        key: where, as a Python subscript path (``state['model']['fc.weight']``).
        kind: ``missing`` (live, not stored), ``unexpected`` (stored, not live), ``shape``,
            ``dtype``, ``kind`` (a replaced value of another kind: an array for a module, a
            NumPy array for a torch tensor...), ``class`` (a stateful object of another class),
            ``optimizer`` (parameter groups differ), ``param_groups`` (a param group that
            matches no stored group by its parameters' names), ``new_parameter`` /
            ``dropped_parameter`` (optimizer state matched by parameter name), ``device`` (a
            stored generator of a device this machine lacks).
        message: the full sentence.
    """

    item: str
    key: str
    kind: str
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class RestoreReport:
    """What a restore did not restore as stored, item by item.

    Attributes:
        path: the checkpoint restored from.
        mismatches: every difference found (empty after an exact restore).
        renamed: per item, how many stored keys the ``rename`` rules changed.
        hints: suggestions, e.g. a ``rename`` for a DDP or ``torch.compile`` prefix.
        excluded: the items left alone because of ``exclude``.
    """

    path: str
    mismatches: tuple[Mismatch, ...] = ()
    renamed: dict[str, int] = field(default_factory=dict)
    hints: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when everything matched."""
        return not self.mismatches

    def of(self, item: str, kind: str | None = None) -> list[str]:
        """The keys of one item's mismatches, optionally of one kind."""
        return [m.key for m in self.mismatches if m.item == item and (kind is None or m.kind == kind)]

    def __str__(self) -> str:
        lines = [m.message for m in self.mismatches] + [f"hint: {h}" for h in self.hints]
        return "\n  ".join(lines) if lines else "everything matched"


@dataclass
class _Plan:
    """What phase two will do, and what phase one found wrong."""

    strict: bool
    state: Mapping[str, Any]
    rules: _Rules
    source: str = ""
    actions: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)
    problems: list[Mismatch] = field(default_factory=list)
    renamed: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def add(self, path: tuple[Any, ...], kind: str, text: str) -> None:
        where = format_path(path)
        self.problems.append(Mismatch(str(path[0]), where, kind, f"{where}: {text}"))


def _torch() -> Any:
    if "torch" not in sys.modules:
        return None
    from runstate.adapters import torch as torch_adapter

    return torch_adapter


def _unavailable(value: Any) -> str | None:
    """Why a stored object cannot exist here (a CUDA generator without CUDA), else None.

    Such a placeholder is only ever made by the torch adapter, so it can only exist when that
    module is loaded.
    """
    adapter = sys.modules.get("runstate.adapters.torch")
    if adapter is not None and isinstance(value, adapter.UnavailableGenerator):
        return str(value.reason)
    return None


def plain(value: Any) -> Any:
    """Replace every ``StatefulState`` in a decoded tree by its plain state.

    Raises:
        UnsupportedTypeError: the tree holds a generator this machine cannot create (a CUDA
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
    missing = _unavailable(value)
    if missing is not None:
        raise UnsupportedTypeError(
            f"{missing}; load it on a machine that has that device, or restore into a live state "
            "with strict=False to keep the live value instead"
        )
    return value


def _is_lazy(x: Any) -> bool:
    """True for an uninitialized parameter of a lazy torch module (its shape is unknown)."""
    adapter = _torch()
    return adapter is not None and bool(adapter.is_lazy(x))


def _is_tensor(x: Any) -> bool:
    if _is_lazy(x):
        return True
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (int, float))


def _kind(value: Any) -> str:
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
    missing = _unavailable(value)
    if missing is not None:
        return f"a torch.Generator on {value.device}"
    codec = find_codec(value)
    if codec is not None:
        return "a NumPy array" if codec.lib == "numpy" else f"a {codec.lib} tensor"
    for objects in object_codecs():
        got = objects.get(value)
        if got is not None:
            attrs = ", ".join(f"{k} {v}" for k, v in sorted(got[2].items()))
            return f"a {got[0]}" + (f" ({attrs})" if attrs else "")
    return f"a {_qualname(type(value))}"


def _tensor_differs(template: Any, stored: Any, path: tuple[Any, ...], plan: _Plan) -> bool:
    """Record a shape or dtype difference between two tensors; True when there is one."""
    if _is_lazy(template):  # an uninitialized lazy parameter takes the stored shape (like torch)
        return False
    if tuple(template.shape) != tuple(stored.shape):
        plan.add(path, "shape", f"shape {tuple(stored.shape)} in checkpoint, {tuple(template.shape)} live")
        return True
    if str(template.dtype) != str(stored.dtype):
        plan.add(path, "dtype", f"dtype {stored.dtype} in checkpoint, {template.dtype} live")
        return True
    return False


def _replaceable(template: Any, stored: Any, path: tuple[Any, ...], plan: _Plan) -> bool:
    """Check that a stored value may replace the live one: same kind; tensors of the same shape
    and dtype. A live ``None`` is a placeholder that takes anything."""
    if template is None:
        return True
    live, got = _kind(template), _kind(stored)
    if live != got:
        plan.add(path, "kind", f"{got} in the checkpoint, {live} live")
        return False
    if _is_tensor(template) and _is_tensor(stored) and not isinstance(template, np.generic):
        return not _tensor_differs(template, stored, path, plan)
    return True


def _compare(template: Any, stored: Any, path: tuple[Any, ...], plan: _Plan, *, keys: bool, kinds: bool) -> None:
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
    live_tensor, stored_tensor = _is_tensor(template), _is_tensor(stored)
    if live_tensor and stored_tensor:
        _tensor_differs(template, stored, path, plan)
    elif kinds and live_tensor != stored_tensor and template is not None:
        plan.add(path, "kind", f"{_kind(stored)} in the checkpoint, {_kind(template)} live")


def _place(stored: Any, template: Any, torch_adapter: Any) -> Any:
    """Send restored tensors to the devices of the live tensors at the same paths."""
    if torch_adapter is None:
        return stored
    if isinstance(stored, dict) and isinstance(template, dict):
        return {k: _place(v, template.get(k), torch_adapter) for k, v in stored.items()}
    return torch_adapter.place_like(stored, template)


def _compile_renames(rename: Renames | None, source: str) -> _Rules:
    """Check and compile the ``rename`` rules before anything is read.

    Raises:
        StateMismatchError: a rule is not a ``(pattern, replacement)`` pair of strings, or a
            pattern is not a valid regular expression.
    """
    if rename is None:
        return {}
    if not isinstance(rename, Mapping):
        raise StateMismatchError(
            f"{source}: rename must be a dict of item names to [(pattern, replacement), ...], "
            f"got {type(rename).__qualname__}"
        )
    out: _Rules = {}
    for item, rules in rename.items():
        if isinstance(rules, (str, bytes)) or not isinstance(rules, Iterable):
            raise StateMismatchError(f"{source}: rename[{item!r}] must be a list of (pattern, replacement) pairs")
        compiled = []
        for rule in rules:
            if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and all(isinstance(x, str) for x in rule)):
                raise StateMismatchError(
                    f"{source}: rename[{item!r}]: each rule must be a (pattern, replacement) pair of strings, "
                    f"got {rule!r}"
                )
            pattern, repl = rule
            try:
                compiled.append((re.compile(pattern), repl))
            except re.error as exc:
                raise StateMismatchError(
                    f"{source}: rename[{item!r}]: pattern {pattern!r} is not a valid regular expression ({exc}); "
                    "nothing was changed"
                ) from exc
        out[item] = compiled
    return out


def _renamed(item: str, key: str, plan: _Plan) -> str:
    for pattern, repl in plan.rules.get(item, ()):
        try:
            key = pattern.sub(repl, key)
        except (re.error, IndexError) as exc:  # e.g. a replacement naming a group the pattern lacks
            raise StateMismatchError(
                f"{plan.source}: rename[{item!r}]: replacement {repl!r} of pattern {pattern.pattern!r} is "
                f"invalid ({exc}); nothing was changed"
            ) from exc
    return key


def _apply_renames(item: str, stored: Any, plan: _Plan) -> Any:
    """Rename an item's stored top-level keys with its regex rules.

    Raises:
        StateMismatchError: the rules give two stored keys the same name (one would be lost).
    """
    rules = plan.rules.get(item)
    target = stored.state if isinstance(stored, StatefulState) else stored
    if not rules or not isinstance(target, dict):
        return stored
    out = type(target)()
    origin: dict[Any, Any] = {}
    clashes: dict[Any, list[Any]] = {}
    count = 0
    for key, value in target.items():
        new = _renamed(item, key, plan) if isinstance(key, str) else key
        count += new != key
        if new in origin:
            clashes.setdefault(new, [origin[new]]).append(key)
        origin[new] = key
        out[new] = value
    if clashes:
        listed = "; ".join(f"{olds!r} -> {new!r}" for new, olds in list(clashes.items())[:10])
        raise StateMismatchError(
            f"{plan.source}: the rename rules of item {item!r} give several stored keys the same name, "
            f"so all but one would be lost: {listed}"
            f"{f' (and {len(clashes) - 10} more)' if len(clashes) > 10 else ''}; change the rules so that "
            "each stored key gets a name of its own (nothing was changed)"
        )
    plan.renamed[item] = count
    if isinstance(stored, StatefulState):
        return StatefulState(stored.type, out, stored.param_names)
    return out


def _rename_param(name: str | None, plan: _Plan) -> str | None:
    if name is None or "." not in name:
        return name
    item, rest = name.split(".", 1)
    return f"{item}.{_renamed(item, rest, plan)}"


def _restore_optimizer(obj: Any, stored: StatefulState, path: tuple[Any, ...], plan: _Plan, torch_adapter: Any) -> Any:
    """Return the optimizer state_dict to load, matched by parameter name when they differ.

    Param groups are matched by their parameters' names too, so a group keeps its own
    hyper-parameters when the groups are listed in another order.
    """
    where = format_path(path)
    live_names = torch_adapter.optimizer_param_names(obj, plan.state)
    names = stored.param_names
    if (
        live_names is None
        or not torch_adapter.valid_param_names(names)
        or not torch_adapter.is_optimizer_state(stored.state)
    ):
        for text in torch_adapter.check_optimizer(obj, stored.state, where):
            plan.add(path, "optimizer", text.removeprefix(f"{where}: "))
        return stored.state
    names = [[_rename_param(n, plan) for n in group] for group in names]
    if names == live_names:
        for text in torch_adapter.check_optimizer(obj, stored.state, where):
            plan.add(path, "optimizer", text.removeprefix(f"{where}: "))
        return stored.state
    remapped, kept, new, gone, unmatched = torch_adapter.remap_optimizer_state(obj, stored.state, names, live_names)
    for n in new:
        plan.add((*path, n), "new_parameter", "new parameter: its optimizer state starts fresh")
    for n in gone:
        plan.add((*path, n), "dropped_parameter", "parameter no longer in the model: its optimizer state is dropped")
    for gi, why in unmatched:
        plan.add(
            (*path, "param_groups", gi),
            "param_groups",
            f"this param group matches no param group of the checkpoint ({why}), so it keeps its live "
            "hyper-parameters (lr, weight_decay...); build the optimizer with the groups of the run that saved",
        )
    logger.info("%s: optimizer state matched by name for %d parameters", where, len(kept))
    return remapped


def _same_class(stored: str, cls: type) -> bool:
    """True when ``stored`` (``<module>.<qualname>``) names ``cls``.

    A class defined in the script that saved is ``__main__.X`` there and ``train.X`` when the
    script is imported (or the other way round): those match.
    """
    live = _qualname(cls)
    if stored == live:
        return True
    if stored.startswith("__main__."):
        return stored.removeprefix("__main__.") == cls.__qualname__
    return cls.__module__ == "__main__" and stored.endswith(f".{cls.__qualname__}")


def _check_class(obj: Any, stored: StatefulState, path: tuple[Any, ...], plan: _Plan) -> bool:
    """Record a stateful object of another class than the stored one; True when they match.

    The state_dict of one class does not fit another (Adam's moments in SGD, a StepLR's
    state in a CosineAnnealingLR): loading it would be accepted and go wrong later.
    """
    if _same_class(stored.type, type(obj)):
        return True
    plan.add(
        path,
        "class",
        f"the checkpoint holds the state of a {stored.type}, the live object is a {_qualname(type(obj))}; "
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


def _check_devices(stored: Any, path: tuple[Any, ...], plan: _Plan) -> bool:
    """Record every stored generator in a tree that this machine cannot create; True if any."""
    missing = _unavailable(stored)
    if missing is not None:
        plan.add(path, "device", f"{missing}; pass strict=False to keep the live value")
        return True
    if isinstance(stored, dict):
        return any([_check_devices(v, (*path, k), plan) for k, v in stored.items()])
    if type(stored) in (list, tuple):
        return any([_check_devices(v, (*path, i), plan) for i, v in enumerate(stored)])
    return False


def _restore_stateful(obj: Any, stored: StatefulState, path: tuple[Any, ...], plan: _Plan) -> None:
    where = format_path(path)
    torch_adapter = _torch()
    module = torch_adapter is not None and torch_adapter.is_module(obj)
    # A module is checked by its keys, shapes and dtypes, not its class: wrappers (DDP,
    # torch.compile), lazy modules that change class, and renamed model classes load fine.
    if not module and not _check_class(obj, stored, path, plan):
        return
    template = _live_state(obj.state_dict, path, f"{type(obj).__qualname__}.state_dict()")
    before = len(plan.problems)
    source = stored.state
    if torch_adapter is not None and torch_adapter.is_optimizer(obj):
        source = _restore_optimizer(obj, stored, path, plan, torch_adapter)
    elif torch_adapter is not None and not module:
        for text in torch_adapter.check_scheduler(obj, source, where):
            plan.add(path, "optimizer", text.removeprefix(f"{where}: "))  # not loaded when not strict
    _compare(template, source, path, plan, keys=True, kinds=module)
    _check_devices(source, path, plan)
    problems = plan.problems[before:]
    state = _place(source, template, torch_adapter)
    if module:
        if problems and isinstance(state, dict):
            bad = {p.key for p in problems}
            state = {k: v for k, v in state.items() if k in template and format_path((*path, k)) not in bad}
        plan.actions.append((where, lambda: obj.load_state_dict(state, strict=not problems)))
    elif problems and not all(p.kind in _LOADABLE for p in problems):
        plan.skipped.append(where)
    else:
        plan.actions.append((where, lambda: obj.load_state_dict(state)))


def _restore_into(template: Any, stored: Any, path: tuple[Any, ...], plan: _Plan) -> Any:
    """Return the value that replaces ``template``; schedule in-place loads in ``plan``.

    A stored value that may not replace the live one (another kind, shape or dtype) is a
    problem, and the live value is kept.
    """
    if isinstance(stored, dict) and not isinstance(template, dict) and is_stateful(template):
        # A plain dict stored for a live object (e.g. a state_dict saved on its own): load it.
        stored = StatefulState(_qualname(type(template)), stored)
    if isinstance(stored, StatefulState):
        registered = registry.get(type(template))
        if registered is not None:
            _restore_registered(template, registered, stored, path, plan)
            return template
        if is_stateful(template):
            _restore_stateful(template, _with_namedtuples(stored, template, path), path, plan)
            return template
        if not _replaceable(template, stored, path, plan) or _check_devices(stored.state, path, plan):
            return template
        return plain(stored)
    if isinstance(stored, NamedTupleState):
        if template is not None and not isinstance(template, tuple):
            _replaceable(template, stored, path, plan)
            return template
        return _restore_namedtuple(template, stored, path, plan)
    if isinstance(stored, dict) or type(stored) in (list, tuple):
        if not _replaceable(template, stored, path, plan):
            return template
        if isinstance(stored, dict):
            t = template if isinstance(template, dict) else {}
            return type(stored)((k, _restore_into(t.get(k), v, (*path, k), plan)) for k, v in stored.items())
        seq = template if isinstance(template, (list, tuple)) and len(template) == len(stored) else [None] * len(stored)
        out = [_restore_into(a, b, (*path, i), plan) for i, (a, b) in enumerate(zip(seq, stored, strict=True))]
        return out if type(stored) is list else tuple(out)
    if _check_devices(stored, path, plan) or not _replaceable(template, stored, path, plan):
        return template
    live_object = template is not None and type(template) is type(stored) and not _is_tensor(stored)
    if live_object and _copy_into_later(template, stored, path, plan):
        return template
    stored = _place_jax(stored, template)
    torch_adapter = _torch()
    if torch_adapter is not None:
        return torch_adapter.place_like(stored, template)
    return stored


def _copy_into_later(template: Any, stored: Any, path: tuple[Any, ...], plan: _Plan) -> bool:
    """Schedule copying a restored generator into the live one (phase two, like ``load_state_dict``).

    Copying right away would change the live generator even when another item then turns
    out not to match and the restore is abandoned.
    """
    from runstate.adapters import object_codecs

    for codec in object_codecs():
        live, got = codec.get(template), codec.get(stored)
        if live is not None and got is not None and live[0] == got[0] and live[2] == got[2]:
            plan.actions.append((format_path(path), functools.partial(codec.copy_into, template, stored)))
            return True
    return False


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and isinstance(getattr(type(value), "_fields", None), tuple)


def _restore_namedtuple(template: Any, stored: NamedTupleState, path: tuple[Any, ...], plan: _Plan) -> Any:
    """Rebuild a namedtuple as the live value's class; never import the class the manifest names."""
    cls = type(template)
    if _is_namedtuple(template) and _qualname(cls) == stored.type and cls._fields == stored.fields:
        values = [
            _restore_into(live, value, (*path, name), plan)
            for name, live, value in zip(stored.fields, template, stored.values, strict=True)
        ]
        return cls._make(values)
    if _is_namedtuple(template):
        plan.add(
            path, "type", f"a {stored.type}{stored.fields} in the checkpoint, a {_qualname(cls)}{cls._fields} live"
        )
        return template
    return tuple(_restore_into(None, v, (*path, f), plan) for f, v in zip(stored.fields, stored.values, strict=True))


def _has_namedtuples(value: Any) -> bool:
    if isinstance(value, NamedTupleState):
        return True
    if isinstance(value, dict):
        return any(_has_namedtuples(v) for v in value.values())
    if type(value) in (list, tuple):
        return any(_has_namedtuples(v) for v in value)
    return False


def _namedtuples_like(stored: Any, template: Any) -> Any:
    """Turn ``NamedTupleState`` in a stored state_dict into the live state_dict's classes."""
    if isinstance(stored, NamedTupleState):
        cls = type(template)
        items = (
            template
            if _is_namedtuple(template) and len(template) == len(stored.values)
            else (None,) * len(stored.values)
        )
        values = [_namedtuples_like(v, t) for v, t in zip(stored.values, items, strict=True)]
        if _is_namedtuple(template) and _qualname(cls) == stored.type and cls._fields == stored.fields:
            return cls._make(values)
        return tuple(values)
    if isinstance(stored, dict):
        t = template if isinstance(template, dict) else {}
        return type(stored)((k, _namedtuples_like(v, t.get(k))) for k, v in stored.items())
    if type(stored) in (list, tuple):
        seq = template if isinstance(template, (list, tuple)) and len(template) == len(stored) else [None] * len(stored)
        out = [_namedtuples_like(v, t) for v, t in zip(stored, seq, strict=True)]
        return out if type(stored) is list else tuple(out)
    return stored


def _with_namedtuples(stored: StatefulState, obj: Any, path: tuple[Any, ...]) -> StatefulState:
    if not _has_namedtuples(stored.state):
        return stored
    template = _live_state(obj.state_dict, path, f"{type(obj).__qualname__}.state_dict()")
    return StatefulState(stored.type, _namedtuples_like(stored.state, template), stored.param_names)


def _restore_registered(
    obj: Any, registered: Registration, stored: StatefulState, path: tuple[Any, ...], plan: _Plan
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
    state = _namedtuples_like(stored.state, template)
    if len(plan.problems) > before:
        plan.skipped.append(where)
    else:
        plan.actions.append((where, lambda: registered.set_state(obj, state)))


def _jax() -> Any:
    from runstate.adapters import jax_adapter

    return jax_adapter()


def _place_jax(stored: Any, template: Any) -> Any:
    adapter = _jax()
    return stored if adapter is None else adapter.place_like(stored, template)


def _restore_item(template: Any, stored: Any, path: tuple[Any, ...], plan: _Plan) -> Any:
    """Restore one item; a JAX pytree must also keep its structure, shapes and dtypes.

    JAX values are replaced, not loaded into, so nothing else would notice a mismatch. An item
    that does not match keeps its live value (with ``strict=False``).
    """
    restored = _restore_into(template, stored, path, plan)
    adapter = _jax()
    if adapter is None or restored is template:
        return restored
    problems = adapter.check_like(template, restored)
    for where, kind, text in problems:
        plan.add((*path, *where), kind, text)
    return template if problems else restored


def _hints(problems: Sequence[Mismatch]) -> list[str]:
    """Suggest a ``rename`` when keys differ only by a DDP / torch.compile prefix."""
    hints = []
    items = {p.item for p in problems}
    for item in sorted(items):
        missing = {p.key for p in problems if p.item == item and p.kind == "missing"}
        unexpected = {p.key for p in problems if p.item == item and p.kind == "unexpected"}
        if not missing or not unexpected:
            continue
        prefix_of = f"state[{item!r}]["
        miss = {k[len(prefix_of) :].strip("]'\"") for k in missing}
        unex = {k[len(prefix_of) :].strip("]'\"") for k in unexpected}
        for prefix in _WRAPPER_PREFIXES:
            if {k.removeprefix(prefix) for k in unex if k.startswith(prefix)} >= miss:
                hints.append(
                    f"the checkpoint's keys carry a {prefix!r} prefix: pass rename={{{item!r}: [(r'^{re.escape(prefix)}', '')]}}"
                )
            elif {k.removeprefix(prefix) for k in miss if k.startswith(prefix)} >= unex:
                hints.append(f"the live keys carry a {prefix!r} prefix: pass rename={{{item!r}: [(r'^', {prefix!r})]}}")
    return hints


@dataclass
class PendingRestore:
    """A checked restore, ready to change the live state (phase two)."""

    reader: CheckpointReader
    state: MutableMapping[str, Any]
    report: RestoreReport
    actions: list[tuple[str, Callable[[], Any]]]
    replacements: dict[str, Any]
    skipped: list[str] = field(default_factory=list)

    def apply(self) -> RestoreReport:
        """Change the live objects and values; returns the report.

        Raises:
            PartialRestoreError: a ``load_state_dict`` (or a registered ``set_state``) raised;
                it names the items already restored. Plain values are replaced only after
                every object was loaded, so they are all still live.
        """
        for where in self.skipped:
            logger.warning("skipped restoring %s: it does not match", where)
        done: list[str] = []
        for where, action in self.actions:
            try:
                action()
            except Exception as exc:  # whatever user code raises: the caller learns what changed
                raise self._partial(where, done, exc) from exc
            done.append(where)
        try:
            for key, value in self.replacements.items():
                live = self.state[key]
                if isinstance(live, PerRank):
                    live.value = value
                elif value is not live:
                    self.state[key] = value
        except Exception as exc:
            raise self._partial("the plain values", done, exc) from exc
        return self.report

    def _partial(self, where: str, done: list[str], exc: Exception) -> PartialRestoreError:
        if done:
            changed = f"{', '.join(done)} {'was' if len(done) == 1 else 'were'} already restored"
            advice = (
                "the live state is now a mix of restored and live values: rebuild these objects (or "
                "restart the process) before restoring again"
            )
        else:
            changed = "no other item had been changed yet"
            advice = "fix the cause and restore again"
        err = PartialRestoreError(
            f"{self.reader.path}: restoring {where} raised {type(exc).__name__}: {exc}; {changed}; {where} may "
            f"be partly changed, every other item and plain value keeps its live value; {advice}"
        )
        err.restored, err.failed, err.report = tuple(done), where, self.report
        return err


def _stored_names(
    reader: CheckpointReader, state: Mapping[str, Any], group: Group, plan: _Plan
) -> tuple[dict[str, str], set[str]]:
    """Map each live item to the stored item it restores from; also the stored items accounted for.

    A per-rank item restores rank ``r``'s copy when the world size is unchanged; otherwise
    its ``on_resize`` rule applies.
    """
    manifest = reader.manifest
    saved_world = manifest.ranks.world_size if manifest.ranks is not None else 1
    saved_per_rank = set(manifest.ranks.per_rank) if manifest.ranks is not None else set()
    names: dict[str, str] = {}
    covered: set[str] = set()
    for key, live in state.items():
        family = {per_rank_name(key, r) for r in range(saved_world)} if key in saved_per_rank else {key}
        covered |= family
        if key not in saved_per_rank and not (is_per_rank(live) and saved_world != group.size):
            names[key] = key
        elif saved_world == group.size:
            names[key] = per_rank_name(key, group.rank)
        elif on_resize(live) == "skip":
            logger.warning(
                "%s: item %r keeps its live value: saved per rank by %d process(es), restored by %d "
                "(on_resize='skip')",
                reader.path,
                key,
                saved_world,
                group.size,
            )
        else:
            plan.add(
                (key,),
                "world_size",
                f"per-rank item saved by {saved_world} process(es), restored by {group.size}: wrap it as "
                "runstate.PerRank(value, on_resize='skip') to keep its live value, or restore with the same "
                "world size",
            )
    return names, covered


def _exclusion(patterns: Sequence[str]) -> Callable[[str], bool]:
    """The test ``exclude`` stands for: item names or glob patterns (``"config"``, ``"log_*"``)."""

    def excluded(name: str) -> bool:
        base = item_name(name)  # a per-rank item's stored copies
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(base, p) for p in patterns)

    return excluded


def _warn_unmatched_exclude(patterns: Sequence[str], names: Iterable[str], source: str) -> None:
    """Log a pattern of ``exclude`` that matches no item: most likely a typo that restores the item."""
    names = [item_name(n) for n in names]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            logger.warning(
                "%s: exclude=%r matches no item of the state or the checkpoint (items: %s); "
                "check its spelling: nothing is left alone because of it",
                source,
                pattern,
                sorted(set(names)),
            )


def _exclude_patterns(exclude: str | Iterable[str] | None, source: str) -> list[str]:
    """The patterns of ``exclude``, checked."""
    if exclude is None:
        return []
    patterns = [exclude] if isinstance(exclude, str) else list(exclude) if isinstance(exclude, Iterable) else None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise StateMismatchError(
            f"{source}: exclude must be a list of item names or glob patterns (e.g. ['config', 'log_*']), "
            f"got {exclude!r}"
        )
    return patterns


def plan_restore(
    reader: CheckpointReader,
    state: MutableMapping[str, Any],
    *,
    strict: bool,
    rename: Renames | None = None,
    group: Group | None = None,
    exclude: str | Iterable[str] | None = None,
) -> PendingRestore:
    """Phase one: read, verify and check everything; change nothing.

    Items of ``state`` (and of the checkpoint) whose names match ``exclude`` are left alone:
    neither read nor checked nor changed.

    Raises:
        CorruptCheckpointError: a checksum, size or header does not match.
        StateMismatchError: ``strict`` and the state does not match; or a ``rename`` or
            ``exclude`` option is malformed.
    """
    group = group or SingleProcess()
    plan = _Plan(strict=strict, state=state, rules=_compile_renames(rename, reader.path), source=reader.path)
    patterns = _exclude_patterns(exclude, reader.path)
    excluded = _exclusion(patterns)
    _warn_unmatched_exclude(patterns, [*state, *reader.manifest.items], reader.path)
    left_alone = tuple(k for k in state if excluded(k))
    live = {k: v for k, v in state.items() if k not in left_alone}
    stored_items = reader.manifest.items
    names, covered = _stored_names(reader, live, group, plan)
    for key, stored_key in names.items():
        if stored_key not in stored_items:
            listed = sorted(k for k in stored_items if "@rank" not in k)
            plan.add((key,), "missing", f"item missing from the checkpoint (it has {listed})")
    for key in stored_items:
        if key not in covered and not excluded(key):
            plan.add((key,), "unexpected", "item in the checkpoint but not in the state")
    if group.distributed:
        from runstate.adapters.torch_dist import preload_sharded

        layout = sorted((key, stored_key == key, stored_key in stored_items) for key, stored_key in names.items())
        if not same_everywhere(group, repr(layout)):
            raise StateMismatchError(
                f"{reader.path}: the processes restore different items or kinds of items; every process must "
                f"pass the same item names, with the same ones per-rank (this one: {[k for k, _, _ in layout]})"
            )
        for key in sorted(names):  # collective: the same items in the same order on every process
            stored_key = names[key]
            if stored_key in stored_items:
                for name, value in preload_sharded(reader, key, stored_key, unwrap(state[key]), group).items():
                    reader.preloaded[stored_key, name] = value
    replacements: dict[str, Any] = {}
    for key, stored_key in names.items():
        if stored_key in stored_items:
            stored = _apply_renames(key, reader.load_item(stored_key), plan)
            replacements[key] = _restore_item(unwrap(state[key]), stored, (key,), plan)
    report = RestoreReport(
        reader.path, tuple(plan.problems), dict(plan.renamed), tuple(_hints(plan.problems)), left_alone
    )
    if plan.problems:
        if strict:
            err = StateMismatchError(
                f"{reader.path}: the state does not match the checkpoint ({len(plan.problems)} problems):\n  "
                f"{report}\nfix the state, or pass strict=False to restore only what matches"
            )
            err.report = report
            raise err
        logger.warning("%s: restoring only what matches; %d problems:\n  %s", reader.path, len(plan.problems), report)
    return PendingRestore(reader, state, report, plan.actions, replacements, plan.skipped)


def restore_state(
    reader: CheckpointReader,
    state: MutableMapping[str, Any],
    *,
    strict: bool,
    rename: Renames | None = None,
    group: Group | None = None,
    exclude: str | Iterable[str] | None = None,
) -> RestoreReport:
    """Restore ``state`` from ``reader``'s checkpoint (see ``runstate.load``).

    With several processes, every one checks its part first; the state changes only when
    all of them succeeded, and otherwise every process raises.
    """
    group = group or SingleProcess()
    if group.size == 1:
        return plan_restore(reader, state, strict=strict, rename=rename, group=group, exclude=exclude).apply()
    status = _OK
    error: Exception | None = None
    try:
        pending = plan_restore(reader, state, strict=strict, rename=rename, group=group, exclude=exclude)
    except CorruptCheckpointError as exc:
        status, error = _CORRUPT, exc
    except StateMismatchError as exc:
        status, error = _MISMATCH, exc
    except Exception as exc:  # every process must reach the agreement below, whatever failed
        status, error = _FAILED, exc
    agreed = group.all_min(status)  # the worst outcome wins, and every process raises its kind
    if agreed == _OK:
        return pending.apply()
    where = f"{reader.path}: restoring on {group.size} processes"
    if agreed == _CORRUPT:
        if isinstance(error, CorruptCheckpointError):
            raise error
        raise CorruptCheckpointError(f"{where}: another process found this checkpoint damaged (see its log)")
    if agreed == _MISMATCH:
        if isinstance(error, StateMismatchError):
            raise error
        raise StateMismatchError(
            f"{where}: another process's state does not match the checkpoint (see its error); nothing was changed"
        ) from error
    if isinstance(error, CheckpointError) and status == _FAILED:
        raise error
    raise CheckpointError(
        f"{where}: {'this' if status == _FAILED else 'another'} process could not restore its part"
        f"{f' ({error!r})' if status == _FAILED else ' (see its error)'}; nothing was changed"
    ) from error


# Outcomes of phase one on one process, worst first: the group agrees on the smallest.
_FAILED, _MISMATCH, _CORRUPT, _OK = 0, 1, 2, 3
