"""Putting a checkpoint's values back into a live state.

Restoring is two-phase: every item is read, verified and checked against the live objects
first, and only when all of that succeeded are objects changed in place (``load_state_dict``)
and plain values replaced. A corrupt file or a mismatch therefore changes nothing. What did
not match is returned as a :class:`RestoreReport`.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from runstate.distributed import PerRank, is_per_rank, on_resize, unwrap
from runstate.errors import CheckpointError, CorruptCheckpointError, StateMismatchError
from runstate.format.manifest import per_rank_name
from runstate.format.tree import NamedTupleState, StatefulState, format_path
from runstate.group import Group, SingleProcess, same_everywhere
from runstate.reader import CheckpointReader
from runstate.registry import Registration, registry
from runstate.stateful import is_stateful

__all__ = ["Mismatch", "PendingRestore", "RestoreReport", "plain", "plan_restore", "restore_state"]

logger = logging.getLogger("runstate")

#: ``{"model": [(r"^module\.", "")]}``: regex substitutions applied to an item's stored keys.
Renames = Mapping[str, Sequence[tuple[str, str]]]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class Mismatch:
    """One difference between the live state and the checkpoint.

    Attributes:
        item: the top-level item.
        key: where, as a Python subscript path (``state['model']['fc.weight']``).
        kind: ``missing`` (live, not stored), ``unexpected`` (stored, not live), ``shape``,
            ``dtype``, ``optimizer`` (parameter groups differ), ``new_parameter`` /
            ``dropped_parameter`` (optimizer state matched by parameter name).
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
    """

    path: str
    mismatches: tuple[Mismatch, ...] = ()
    renamed: dict[str, int] = field(default_factory=dict)
    hints: tuple[str, ...] = ()

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
    rename: Renames
    actions: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)
    problems: list[Mismatch] = field(default_factory=list)
    renamed: dict[str, int] = field(default_factory=dict)

    def add(self, path: tuple[Any, ...], kind: str, text: str) -> None:
        where = format_path(path)
        self.problems.append(Mismatch(str(path[0]), where, kind, f"{where}: {text}"))


def _torch() -> Any:
    if "torch" not in sys.modules:
        return None
    from runstate.adapters import torch as torch_adapter

    return torch_adapter


def plain(value: Any) -> Any:
    """Replace every ``StatefulState`` in a decoded tree by its plain state."""
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
    return value


def _is_tensor(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (int, float))


def _compare(template: Any, stored: Any, path: tuple[Any, ...], plan: _Plan, *, keys: bool) -> None:
    """Record key, shape and dtype differences between a live state_dict and a stored one."""
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
                _compare(template[k], v, (*path, k), plan, keys=False)
    elif _is_tensor(template) and _is_tensor(stored):
        if tuple(template.shape) != tuple(stored.shape):
            plan.add(path, "shape", f"shape {tuple(stored.shape)} in checkpoint, {tuple(template.shape)} live")
        elif str(template.dtype) != str(stored.dtype):
            plan.add(path, "dtype", f"dtype {stored.dtype} in checkpoint, {template.dtype} live")


def _place(stored: Any, template: Any, torch_adapter: Any) -> Any:
    """Send restored tensors to the devices of the live tensors at the same paths."""
    if torch_adapter is None:
        return stored
    if isinstance(stored, dict) and isinstance(template, dict):
        return {k: _place(v, template.get(k), torch_adapter) for k, v in stored.items()}
    return torch_adapter.place_like(stored, template)


def _apply_renames(item: str, stored: Any, plan: _Plan) -> Any:
    """Rename an item's stored top-level keys with its regex rules."""
    rules = plan.rename.get(item)
    target = stored.state if isinstance(stored, StatefulState) else stored
    if not rules or not isinstance(target, dict):
        return stored
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]
    out = type(target)()
    count = 0
    for key, value in target.items():
        new = key
        if isinstance(key, str):
            for pattern, repl in compiled:
                new = pattern.sub(repl, new)
        count += new != key
        out[new] = value
    plan.renamed[item] = count
    if isinstance(stored, StatefulState):
        return StatefulState(stored.type, out, stored.param_names)
    return out


def _rename_param(name: str | None, plan: _Plan) -> str | None:
    if name is None or "." not in name:
        return name
    item, rest = name.split(".", 1)
    for pattern, repl in plan.rename.get(item, ()):
        rest = re.sub(pattern, repl, rest)
    return f"{item}.{rest}"


def _restore_optimizer(obj: Any, stored: StatefulState, path: tuple[Any, ...], plan: _Plan, torch_adapter: Any) -> Any:
    """Return the optimizer state_dict to load, matched by parameter name when they differ."""
    where = format_path(path)
    live_names = torch_adapter.optimizer_param_names(obj, plan.state)
    names = stored.param_names
    if live_names is None or not torch_adapter.valid_param_names(names) or not isinstance(stored.state, dict):
        for text in torch_adapter.check_optimizer(obj, stored.state, where):
            plan.add(path, "optimizer", text.removeprefix(f"{where}: "))
        return stored.state
    names = [[_rename_param(n, plan) for n in group] for group in names]
    if names == live_names:
        for text in torch_adapter.check_optimizer(obj, stored.state, where):
            plan.add(path, "optimizer", text.removeprefix(f"{where}: "))
        return stored.state
    remapped, kept, new, gone = torch_adapter.remap_optimizer_state(obj, stored.state, names, live_names)
    for n in new:
        plan.add((*path, n), "new_parameter", "new parameter: its optimizer state starts fresh")
    for n in gone:
        plan.add((*path, n), "dropped_parameter", "parameter no longer in the model: its optimizer state is dropped")
    logger.info("%s: optimizer state matched by name for %d parameters", where, len(kept))
    return remapped


def _restore_stateful(obj: Any, stored: StatefulState, path: tuple[Any, ...], plan: _Plan) -> None:
    where = format_path(path)
    template = obj.state_dict()
    torch_adapter = _torch()
    before = len(plan.problems)
    source = stored.state
    if torch_adapter is not None and torch_adapter.is_optimizer(obj):
        source = _restore_optimizer(obj, stored, path, plan, torch_adapter)
    _compare(template, source, path, plan, keys=True)
    problems = plan.problems[before:]
    state = _place(source, template, torch_adapter)
    if torch_adapter is not None and torch_adapter.is_module(obj):
        if problems and isinstance(state, dict):
            state = {
                k: v
                for k, v in state.items()
                if k in template and not (_is_tensor(v) and tuple(v.shape) != tuple(template[k].shape))
            }
        plan.actions.append((where, lambda: obj.load_state_dict(state, strict=not problems)))
    elif problems and not all(p.kind in ("new_parameter", "dropped_parameter") for p in problems):
        plan.actions.append((where, lambda: logger.warning("skipped restoring %s: it does not match", where)))
    else:
        plan.actions.append((where, lambda: obj.load_state_dict(state)))


def _restore_into(template: Any, stored: Any, path: tuple[Any, ...], plan: _Plan) -> Any:
    """Return the value that replaces ``template``; schedule in-place loads in ``plan``."""
    if isinstance(stored, dict) and not isinstance(template, dict) and is_stateful(template):
        # A plain dict stored for a live object (e.g. a state_dict saved on its own): load it.
        stored = StatefulState(f"{type(template).__module__}.{type(template).__qualname__}", stored)
    if isinstance(stored, StatefulState):
        registered = registry.get(type(template))
        if registered is not None:
            _restore_registered(template, registered, stored, path, plan)
            return template
        if is_stateful(template):
            _restore_stateful(template, _with_namedtuples(stored, template), path, plan)
            return template
        return plain(stored)
    if isinstance(stored, NamedTupleState):
        return _restore_namedtuple(template, stored, path, plan)
    if isinstance(stored, dict):
        t = template if isinstance(template, dict) else {}
        return type(stored)((k, _restore_into(t.get(k), v, (*path, k), plan)) for k, v in stored.items())
    if type(stored) in (list, tuple):
        seq = template if isinstance(template, (list, tuple)) and len(template) == len(stored) else [None] * len(stored)
        out = [_restore_into(a, b, (*path, i), plan) for i, (a, b) in enumerate(zip(seq, stored, strict=True))]
        return out if type(stored) is list else tuple(out)
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


def _with_namedtuples(stored: StatefulState, obj: Any) -> StatefulState:
    if not _has_namedtuples(stored.state):
        return stored
    return StatefulState(stored.type, _namedtuples_like(stored.state, obj.state_dict()), stored.param_names)


def _restore_registered(
    obj: Any, registered: Registration, stored: StatefulState, path: tuple[Any, ...], plan: _Plan
) -> None:
    """An object of a class registered with ``runstate.register``: ``set_state`` in place."""
    where = format_path(path)
    template = registered.get_state(obj)
    before = len(plan.problems)
    _compare(template, stored.state, path, plan, keys=True)
    state = _namedtuples_like(stored.state, template)
    if len(plan.problems) > before:
        plan.actions.append((where, lambda: logger.warning("skipped restoring %s: it does not match", where)))
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

    def apply(self) -> RestoreReport:
        """Change the live objects and values; returns the report."""
        for where, action in self.actions:
            try:
                action()
            except (RuntimeError, ValueError, KeyError, TypeError) as exc:
                raise StateMismatchError(f"{self.reader.path}: loading {where} failed: {exc}") from exc
        for key, value in self.replacements.items():
            live = self.state[key]
            if isinstance(live, PerRank):
                live.value = value
            elif value is not live:
                self.state[key] = value
        return self.report


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


def plan_restore(
    reader: CheckpointReader,
    state: MutableMapping[str, Any],
    *,
    strict: bool,
    rename: Renames | None = None,
    group: Group | None = None,
) -> PendingRestore:
    """Phase one: read, verify and check everything; change nothing.

    Raises:
        CorruptCheckpointError: a checksum, size or header does not match.
        StateMismatchError: ``strict`` and the state does not match.
    """
    group = group or SingleProcess()
    plan = _Plan(strict=strict, state=state, rename=rename or {})
    stored_items = reader.manifest.items
    names, covered = _stored_names(reader, state, group, plan)
    for key, stored_key in names.items():
        if stored_key not in stored_items:
            listed = sorted(k for k in stored_items if "@rank" not in k)
            plan.add((key,), "missing", f"item missing from the checkpoint (it has {listed})")
    for key in stored_items:
        if key not in covered:
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
    report = RestoreReport(reader.path, tuple(plan.problems), dict(plan.renamed), tuple(_hints(plan.problems)))
    if plan.problems:
        if strict:
            err = StateMismatchError(
                f"{reader.path}: the state does not match the checkpoint ({len(plan.problems)} problems):\n  "
                f"{report}\nfix the state, or pass strict=False to restore only what matches"
            )
            err.report = report
            raise err
        logger.warning("%s: restoring only what matches; %d problems:\n  %s", reader.path, len(plan.problems), report)
    return PendingRestore(reader, state, report, plan.actions, replacements)


def restore_state(
    reader: CheckpointReader,
    state: MutableMapping[str, Any],
    *,
    strict: bool,
    rename: Renames | None = None,
    group: Group | None = None,
) -> RestoreReport:
    """Restore ``state`` from ``reader``'s checkpoint (see ``runstate.load``).

    With several processes, every one checks its part first; the state changes only when
    all of them succeeded, and otherwise every process raises.
    """
    group = group or SingleProcess()
    if group.size == 1:
        return plan_restore(reader, state, strict=strict, rename=rename, group=group).apply()
    status = _OK
    error: Exception | None = None
    try:
        pending = plan_restore(reader, state, strict=strict, rename=rename, group=group)
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
