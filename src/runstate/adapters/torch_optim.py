"""PyTorch optimizers and LR schedulers: the checks that make restoring their state safe.

An optimizer's state_dict names its parameters by position, so loading it into an optimizer
built over a changed model would give one parameter another's moments. runstate stores the
parameters' names next to the state (``param_names``, from the modules of the same state) and
matches by name on restore: what matches keeps its state, new parameters start fresh, and the
report says which. Part of the torch adapter (:mod:`runstate.adapters.torch`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from runstate.adapters.base import RestoreContext
from runstate.format.tree import StatefulState, format_path

__all__ = [
    "check_optimizer",
    "check_scheduler",
    "is_optimizer_state",
    "optimizer_param_names",
    "remap_optimizer_state",
    "restore_optimizer",
]

logger = logging.getLogger("runstate")

# Optimizer state buffers that always have the shape of their parameter.
_PARAM_SHAPED = (
    "exp_avg",
    "exp_avg_sq",
    "max_exp_avg_sq",
    "momentum_buffer",
    "square_avg",
    "sum",
    "acc_delta",
    "grad_avg",
    "ax",
    "prev",
)


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def is_optimizer_state(stored: Any) -> bool:
    """True when ``stored`` has the shape of an optimizer state_dict (checkpoints are untrusted)."""
    groups = stored.get("param_groups") if isinstance(stored, dict) else None
    return (
        isinstance(groups, list)
        and all(isinstance(g, dict) and isinstance(g.get("params", []), list) for g in groups)
        and isinstance(stored.get("state"), dict)
        and all(_hashable(i) for g in groups for i in g.get("params", []))
    )


def check_optimizer(opt: torch.optim.Optimizer, stored: Any, where: str) -> list[str]:
    """Problems that would make ``opt.load_state_dict(stored)`` wrong or fail."""
    problems: list[str] = []
    if not is_optimizer_state(stored):  # a checkpoint is data from anywhere: its shape is checked before use
        return [f"{where}: the checkpoint does not hold an optimizer state_dict"]
    groups = stored["param_groups"]
    if len(groups) != len(opt.param_groups):
        return [
            f"{where}['param_groups']: checkpoint has {len(groups)} param groups, "
            f"the optimizer has {len(opt.param_groups)}"
        ]
    params: dict[Any, torch.Tensor] = {}
    for i, (saved, live) in enumerate(zip(groups, opt.param_groups, strict=True)):
        ids = saved.get("params", [])
        if len(ids) != len(live["params"]):
            problems.append(
                f"{where}['param_groups'][{i}]: checkpoint has {len(ids)} parameters, "
                f"the optimizer has {len(live['params'])}"
            )
            continue
        params.update(zip(ids, live["params"], strict=True))
    for pid, buffers in stored["state"].items():
        param = params.get(pid)
        if param is None or not isinstance(buffers, dict):
            continue
        for key in _PARAM_SHAPED:
            buf = buffers.get(key)
            if isinstance(buf, torch.Tensor) and buf.dim() > 0 and tuple(buf.shape) != tuple(param.shape):
                problems.append(
                    f"{where}['state'][{pid!r}][{key!r}]: shape {tuple(buf.shape)} in checkpoint, "
                    f"parameter has shape {tuple(param.shape)}"
                )
    return problems


def check_scheduler(sched: Any, stored: Any, where: str) -> list[str]:
    """Problems of an LR scheduler's stored state: its per-group lists must fit the optimizer.

    A scheduler's ``base_lrs`` (``min_lrs`` for ``ReduceLROnPlateau``) has one entry per param
    group; loaded for another number of groups it is accepted, and wrong at the next step.
    """
    optimizer = getattr(sched, "optimizer", None)
    if not isinstance(optimizer, torch.optim.Optimizer) or not isinstance(stored, dict):
        return []
    groups = len(optimizer.param_groups)
    return [
        f"{where}[{key!r}]: the checkpoint's scheduler drives {len(stored[key])} param groups, the live "
        f"optimizer has {groups}"
        for key in ("base_lrs", "min_lrs")
        if isinstance(stored.get(key), list) and len(stored[key]) != groups
    ]


def module_param_names(state: Any) -> dict[int, str]:
    """``id(parameter) -> "item.name"`` for every module among the state's top-level items."""
    names: dict[int, str] = {}
    for item, value in state.items():
        if isinstance(value, torch.nn.Module):
            for name, param in value.named_parameters(remove_duplicate=False):
                names.setdefault(id(param), f"{item}.{name}")
    return names


def optimizer_param_names(value: Any, state: Any) -> list[list[str | None]] | None:
    """The names of an optimizer's parameters, group by group, or None if not an optimizer
    or none of its parameters belongs to a module of the state."""
    if not isinstance(value, torch.optim.Optimizer):
        return None
    names = module_param_names(state)
    out = [[names.get(id(p)) for p in group["params"]] for group in value.param_groups]
    return out if any(n is not None for group in out for n in group) else None


def valid_param_names(names: Any) -> bool:
    """True for a well-formed list of groups of str-or-None names (checkpoints are untrusted)."""
    return isinstance(names, list) and all(
        isinstance(g, list) and all(n is None or isinstance(n, str) for n in g) for g in names
    )


def _match_groups(live_names: list[list[str | None]], stored_names: list[list[str | None]]) -> list[int | str]:
    """For each live param group, the stored group it restores from, or why there is none.

    Groups are matched by their parameters' names, never by position: a live group matches
    the one stored group that holds all of its named parameters (parameters new to the model
    do not count), when no other live group matches it too. A group of parameters outside
    every module (no names at all) matches the stored group at its position if that one has
    no names either.
    """
    group_of: dict[str, int] = {}
    for gi, names in enumerate(stored_names):
        for name in names:
            if name is not None:
                group_of[name] = gi
    found: list[set[int]] = [{group_of[n] for n in names if n is not None and n in group_of} for names in live_names]
    out: list[int | str] = []
    for gi, (names, groups) in enumerate(zip(live_names, found, strict=True)):
        if len(groups) == 1:
            out.append(next(iter(groups)))
        elif len(groups) > 1:
            out.append(f"its parameters come from {len(groups)} param groups of the checkpoint {sorted(groups)}")
        elif all(n is None for n in names) and gi < len(stored_names) and all(n is None for n in stored_names[gi]):
            out.append(gi)
        else:
            out.append("none of its parameters is in the checkpoint")
    claims: dict[int, list[int]] = {}
    for gi, match in enumerate(out):
        if isinstance(match, int):
            claims.setdefault(match, []).append(gi)
    for match, live_groups in claims.items():
        if len(live_groups) > 1:
            for gi in live_groups:
                out[gi] = f"live groups {live_groups} all come from param group {match} of the checkpoint"
    return out


def _fits(buffers: Any, param: torch.Tensor) -> bool:
    """True for a stored parameter's state whose parameter-shaped buffers have its shape."""
    return isinstance(buffers, dict) and all(
        not (
            isinstance(buffers.get(k), torch.Tensor)
            and buffers[k].dim() > 0
            and tuple(buffers[k].shape) != tuple(param.shape)
        )
        for k in _PARAM_SHAPED
    )


def remap_optimizer_state(
    opt: torch.optim.Optimizer,
    stored: dict[str, Any],
    stored_names: list[list[str | None]],
    live_names: list[list[str | None]],
) -> tuple[dict[str, Any], list[str], list[str], list[str], list[tuple[int, str]]]:
    """Rebuild a stored optimizer state_dict for the live parameters, matching by name.

    Parameters and param groups are both matched by name: the hyper-parameters (``lr``,
    ``weight_decay``...) of a live group come from the stored group holding its parameters,
    wherever the groups are in the list. A live group that matches no stored group
    one-to-one keeps its live hyper-parameters and is reported.

    Returns:
        The state_dict to load; the names of the parameters that kept their state, that are
        new (fresh state) and that are gone (their state dropped); and, per live group that
        matches no stored group, its index and why.
    """
    stored_groups = stored["param_groups"]
    stored_state = stored["state"]
    stored_names = [list(names) for names in stored_names[: len(stored_groups)]]
    stored_names += [[] for _ in range(len(stored_groups) - len(stored_names))]
    by_name: dict[str, Any] = {}
    for names, group in zip(stored_names, stored_groups, strict=True):
        for name, pid in zip(names, group.get("params", []), strict=False):
            if name is not None:
                by_name[name] = pid
    sources = _match_groups(live_names, stored_names)
    kept: list[str] = []
    new: list[str] = []
    groups: list[dict[str, Any]] = []
    state: dict[int, Any] = {}
    unmatched: list[tuple[int, str]] = []
    index = 0
    for gi, live in enumerate(opt.param_groups):
        match = sources[gi]
        if isinstance(match, int):
            source = stored_groups[match]
        else:
            source = live
            unmatched.append((gi, match))
        ids = []
        for param, name in zip(live["params"], live_names[gi], strict=True):
            ids.append(index)
            pid = by_name.get(name) if name is not None else None
            buffers = stored_state.get(pid) if pid is not None else None
            if _fits(buffers, param):
                state[index] = buffers
                kept.append(str(name))
            else:
                new.append(str(name) if name is not None else f"group {gi} #{len(ids) - 1}")
            index += 1
        groups.append({**{k: v for k, v in source.items() if k != "params"}, "params": ids})
    live_set = {n for g in live_names for n in g if n is not None}
    gone = sorted(n for n in by_name if n not in live_set)
    return {"state": state, "param_groups": groups}, kept, new, gone, unmatched


def _add_all(ctx: RestoreContext, path: tuple[Any, ...], texts: list[str]) -> None:
    where = format_path(path)
    for text in texts:
        ctx.add(path, "optimizer", text.removeprefix(f"{where}: "))


def restore_optimizer(
    opt: torch.optim.Optimizer, stored: StatefulState, path: tuple[Any, ...], ctx: RestoreContext
) -> Any:
    """Return the optimizer state_dict to load, matched by parameter name when they differ.

    Param groups are matched by their parameters' names too, so a group keeps its own
    hyper-parameters when the groups are listed in another order.
    """
    where = format_path(path)
    live_names = optimizer_param_names(opt, ctx.state)
    names = stored.param_names
    if live_names is None or not valid_param_names(names) or not is_optimizer_state(stored.state):
        _add_all(ctx, path, check_optimizer(opt, stored.state, where))
        return stored.state
    names = [[ctx.rename_param(n) for n in group] for group in names]
    if names == live_names:
        _add_all(ctx, path, check_optimizer(opt, stored.state, where))
        return stored.state
    remapped, kept, new, gone, unmatched = remap_optimizer_state(opt, stored.state, names, live_names)
    for n in new:
        ctx.add((*path, n), "new_parameter", "new parameter: its optimizer state starts fresh")
    for n in gone:
        ctx.add((*path, n), "dropped_parameter", "parameter no longer in the model: its optimizer state is dropped")
    for gi, why in unmatched:
        ctx.add(
            (*path, "param_groups", gi),
            "param_groups",
            f"this param group matches no param group of the checkpoint ({why}), so it keeps its live "
            "hyper-parameters (lr, weight_decay...); build the optimizer with the groups of the run that saved",
        )
    logger.info("%s: optimizer state matched by name for %d parameters", where, len(kept))
    return remapped


def restore_source(obj: Any, stored: StatefulState, path: tuple[Any, ...], ctx: RestoreContext) -> Any:
    """The state to load into a torch optimizer (matched by name) or scheduler (checked)."""
    if isinstance(obj, torch.optim.Optimizer):
        return restore_optimizer(obj, stored, path, ctx)
    if not isinstance(obj, torch.nn.Module):
        _add_all(ctx, path, check_scheduler(obj, stored.state, format_path(path)))  # not loaded when not strict
    return stored.state
