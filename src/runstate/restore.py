"""Putting a checkpoint's values back into a live state.

Restoring is two-phase: every item is read, verified and checked against the live objects
first, and only when all of that succeeded are objects changed in place (``load_state_dict``)
and plain values replaced. A corrupt file or a mismatch therefore changes nothing.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from runstate.errors import StateMismatchError
from runstate.format.tree import StatefulState, format_path
from runstate.reader import CheckpointReader
from runstate.stateful import is_stateful

__all__ = ["plain", "restore_state"]

logger = logging.getLogger("runstate")


@dataclass
class _Plan:
    """What phase two will do, and what phase one found wrong."""

    actions: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    strict: bool = True


def _torch() -> Any:
    if "torch" not in sys.modules:
        return None
    from runstate.adapters import torch as torch_adapter

    return torch_adapter


def plain(value: Any) -> Any:
    """Replace every ``StatefulState`` in a decoded tree by its plain state."""
    if isinstance(value, StatefulState):
        return plain(value.state)
    if isinstance(value, dict):
        return type(value)((k, plain(v)) for k, v in value.items())
    if type(value) is list:
        return [plain(v) for v in value]
    if type(value) is tuple:
        return tuple(plain(v) for v in value)
    return value


def _is_tensor(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (int, float))


def _compare(template: Any, stored: Any, path: tuple[Any, ...], out: list[str], *, keys: bool) -> None:
    """Report key, shape and dtype differences between a live state_dict and a stored one."""
    if isinstance(template, dict) and isinstance(stored, dict):
        if keys and template:
            missing = [k for k in template if k not in stored]
            unexpected = [k for k in stored if k not in template]
            for k in missing:
                out.append(f"{format_path((*path, k))}: missing from the checkpoint")
            for k in unexpected:
                out.append(f"{format_path((*path, k))}: in the checkpoint but not in the live object")
        for k, v in stored.items():
            if k in template:
                _compare(template[k], v, (*path, k), out, keys=False)
    elif _is_tensor(template) and _is_tensor(stored):
        if tuple(template.shape) != tuple(stored.shape):
            out.append(f"{format_path(path)}: shape {tuple(stored.shape)} in checkpoint, {tuple(template.shape)} live")
        elif str(template.dtype) != str(stored.dtype):
            out.append(f"{format_path(path)}: dtype {stored.dtype} in checkpoint, {template.dtype} live")


def _place(stored: Any, template: Any, torch_adapter: Any) -> Any:
    """Send restored tensors to the devices of the live tensors at the same paths."""
    if torch_adapter is None:
        return stored
    if isinstance(stored, dict) and isinstance(template, dict):
        return {k: _place(v, template.get(k), torch_adapter) for k, v in stored.items()}
    return torch_adapter.place_like(stored, template)


def _restore_stateful(obj: Any, stored: StatefulState, path: tuple[Any, ...], plan: _Plan) -> None:
    where = format_path(path)
    template = obj.state_dict()
    torch_adapter = _torch()
    problems: list[str] = []
    _compare(template, stored.state, path, problems, keys=True)
    if torch_adapter is not None and torch_adapter.is_optimizer(obj):
        problems += torch_adapter.check_optimizer(obj, stored.state, where)
    state = _place(stored.state, template, torch_adapter)
    plan.problems += problems
    if torch_adapter is not None and torch_adapter.is_module(obj):
        if problems and isinstance(state, dict):
            state = {
                k: v
                for k, v in state.items()
                if k in template and not (_is_tensor(v) and tuple(v.shape) != tuple(template[k].shape))
            }
        plan.actions.append((where, lambda: obj.load_state_dict(state, strict=not problems)))
    elif problems:
        plan.actions.append((where, lambda: logger.warning("skipped restoring %s: it does not match", where)))
    else:
        plan.actions.append((where, lambda: obj.load_state_dict(state)))


def _restore_into(template: Any, stored: Any, path: tuple[Any, ...], plan: _Plan) -> Any:
    """Return the value that replaces ``template``; schedule in-place loads in ``plan``."""
    if isinstance(stored, StatefulState):
        if is_stateful(template):
            _restore_stateful(template, stored, path, plan)
            return template
        return plain(stored)
    if isinstance(stored, dict):
        t = template if isinstance(template, dict) else {}
        return type(stored)((k, _restore_into(t.get(k), v, (*path, k), plan)) for k, v in stored.items())
    if type(stored) in (list, tuple):
        seq = template if isinstance(template, (list, tuple)) and len(template) == len(stored) else [None] * len(stored)
        out = [_restore_into(a, b, (*path, i), plan) for i, (a, b) in enumerate(zip(seq, stored, strict=True))]
        return out if type(stored) is list else tuple(out)
    if template is not None and type(template) is type(stored) and not _is_tensor(stored):
        from runstate.adapters import object_codecs

        for codec in object_codecs():
            if codec.copy_into(template, stored):
                return template
    torch_adapter = _torch()
    if torch_adapter is not None:
        return torch_adapter.place_like(stored, template)
    return stored


def restore_state(reader: CheckpointReader, state: MutableMapping[str, Any], *, strict: bool) -> None:
    """Restore ``state`` from ``reader``'s checkpoint (see ``runstate.load``)."""
    plan = _Plan(strict=strict)
    stored_items = reader.manifest.items
    for key in state:
        if key not in stored_items:
            plan.problems.append(
                f"{format_path((key,))}: item missing from the checkpoint (it has {sorted(stored_items)})"
            )
    for key in stored_items:
        if key not in state:
            plan.problems.append(f"{format_path((key,))}: item in the checkpoint but not in the state")
    replacements: dict[str, Any] = {}
    for key in state:
        if key in stored_items:
            replacements[key] = _restore_into(state[key], reader.load_item(key), (key,), plan)
    if plan.problems:
        report = "\n  ".join(plan.problems)
        if strict:
            raise StateMismatchError(
                f"{reader.path}: the state does not match the checkpoint ({len(plan.problems)} problems):\n  "
                f"{report}\nfix the state, or pass strict=False to restore only what matches"
            )
        logger.warning("%s: restoring only what matches; %d problems:\n  %s", reader.path, len(plan.problems), report)
    for where, action in plan.actions:
        try:
            action()
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise StateMismatchError(f"{reader.path}: loading {where} failed: {exc}") from exc
    for key, value in replacements.items():
        if value is not state[key]:
            state[key] = value
