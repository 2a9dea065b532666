"""Resuming with changes: new hyper-parameters, a re-warmup, a longer or shorter schedule.

Why this exists: after a restore, setting ``group["lr"]`` by hand does not stick. The
scheduler keeps its own copies of the base learning rate (``base_lrs``, ``initial_lr``,
``max_lr``...) and overwrites the change at its next step, or snaps back to the old value at
its next milestone. These functions change every copy consistently, so the schedule goes on
from where it is, scaled to the new value or stretched to the new horizon, with no jump.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim import lr_scheduler as lrs

from runstate.errors import CheckpointConfigError

__all__ = ["Rewarm", "extend_schedule", "reset_optimizer_state", "set_hparams"]

Scheduler = Any  # LRScheduler | ReduceLROnPlateau; torch's own typing of these differs by version


def _children(scheduler: Scheduler) -> list[Scheduler]:
    """The scheduler and the schedulers it drives (SequentialLR, ChainedScheduler)."""
    out = [scheduler]
    for child in getattr(scheduler, "_schedulers", []) or []:
        out += _children(child)
    return out


def _active(scheduler: Scheduler) -> Scheduler:
    """The scheduler that sets the learning rate now (the current child of a SequentialLR)."""
    if isinstance(scheduler, lrs.SequentialLR):
        idx = bisect_right(scheduler._milestones, scheduler.last_epoch)
        return _active(scheduler._schedulers[idx])
    return scheduler


def _floor(scheduler: Scheduler | None) -> float:
    """The LR a schedule anneals towards, which does not scale with the base LR."""
    if scheduler is None:
        return 0.0
    active = _active(scheduler)
    if isinstance(active, (lrs.CosineAnnealingLR, lrs.CosineAnnealingWarmRestarts)):
        return float(active.eta_min)
    return 0.0


def _rescale(value: float, old: float, new: float, floor: float) -> float:
    if old == floor:
        return new
    return floor + (value - floor) * (new - floor) / (old - floor)


def _set_lr(optimizer: Optimizer, scheduler: Scheduler | None, groups: Sequence[int], lr: float) -> None:
    if isinstance(scheduler, lrs.CyclicLR):
        raise CheckpointConfigError(
            "set_hparams: CyclicLR has two bases (base_lr, max_lr); rebuild it with the new values"
        )
    onecycle = [s for s in (_children(scheduler) if scheduler is not None else []) if isinstance(s, lrs.OneCycleLR)]
    floor = _floor(scheduler)
    for i in groups:
        group = optimizer.param_groups[i]
        old = float(group["max_lr"] if onecycle else group.get("initial_lr", group["lr"]))
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):
            if key in group:
                group[key] = _rescale(float(group[key]), old, lr, floor if key in ("lr", "initial_lr") else 0.0)
        for s in _children(scheduler) if scheduler is not None else []:
            s_floor = (
                float(getattr(s, "eta_min", 0.0))
                if isinstance(s, (lrs.CosineAnnealingLR, lrs.CosineAnnealingWarmRestarts))
                else 0.0
            )
            if hasattr(s, "base_lrs"):
                s.base_lrs[i] = _rescale(float(s.base_lrs[i]), old, lr, s_floor)
            if getattr(s, "_last_lr", None) is not None:
                s._last_lr[i] = float(group["lr"])
        if isinstance(scheduler, lrs.ReduceLROnPlateau):
            scheduler._last_lr = [float(g["lr"]) for g in optimizer.param_groups]


def _chosen_groups(optimizer: Optimizer, groups: Iterable[int] | None) -> list[int]:
    """The indices of the param groups to change; all of them when ``groups`` is None."""
    chosen = list(range(len(optimizer.param_groups))) if groups is None else list(groups)
    for i in chosen:
        if not 0 <= i < len(optimizer.param_groups):
            raise CheckpointConfigError(
                f"set_hparams: param group {i} does not exist (the optimizer has {len(optimizer.param_groups)})"
            )
    return chosen


def _set_in_groups(optimizer: Optimizer, chosen: Sequence[int], name: str, value: float | tuple[float, ...]) -> None:
    for i in chosen:
        group = optimizer.param_groups[i]
        if name not in group:
            raise CheckpointConfigError(f"set_hparams: param group {i} of {type(optimizer).__name__} has no {name!r}")
        group[name] = value


def set_hparams(
    optimizer: Optimizer,
    scheduler: Scheduler | None = None,
    *,
    lr: float | None = None,
    weight_decay: float | None = None,
    betas: tuple[float, float] | None = None,
    momentum: float | None = None,
    groups: Iterable[int] | None = None,
) -> None:
    """Change hyper-parameters after a restore so that the change sticks.

    ``lr`` is the new *base* (peak) learning rate: every copy the optimizer and the scheduler
    keep (``group["lr"]``, ``initial_lr``, ``max_lr``/``min_lr`` of OneCycleLR, each
    scheduler's ``base_lrs`` and last LR, those of SequentialLR's children) is rescaled, so
    the current LR becomes ``lr`` times the schedule's current factor and the schedule goes
    on from its current position as if it had been built with ``lr``. For cosine schedules
    with ``eta_min`` the distance above ``eta_min`` is what scales.

    Args:
        optimizer: the restored optimizer.
        scheduler: its LR scheduler, if any (LambdaLR, StepLR, MultiStepLR, ExponentialLR,
            CosineAnnealingLR, CosineAnnealingWarmRestarts, OneCycleLR, LinearLR,
            ConstantLR, PolynomialLR, SequentialLR, ChainedScheduler, ReduceLROnPlateau).
        lr: the new base learning rate.
        weight_decay: the new weight decay.
        betas: the new Adam-style betas.
        momentum: the new momentum (SGD, RMSprop).
        groups: indices of the param groups to change (default: all).

    Raises:
        CheckpointConfigError: a group lacks the hyper-parameter, or the scheduler keeps its own copy
            that this function cannot update consistently (CyclicLR; OneCycleLR with
            ``cycle_momentum`` for betas/momentum).

    Example:
        >>> mgr.restore(state)  # doctest: +SKIP
        >>> runstate.torch.set_hparams(opt, sched, lr=3e-4)  # doctest: +SKIP
    """
    chosen = _chosen_groups(optimizer, groups)
    cycling = any(getattr(s, "cycle_momentum", False) for s in (_children(scheduler) if scheduler is not None else []))
    if cycling and (betas is not None or momentum is not None):
        raise CheckpointConfigError(
            "set_hparams: this OneCycleLR cycles momentum/betas itself (cycle_momentum=True) and would "
            "overwrite them at its next step; change base_momentum/max_momentum in its param groups instead"
        )
    for name, value in (("weight_decay", weight_decay), ("betas", betas), ("momentum", momentum)):
        if value is not None:
            _set_in_groups(optimizer, chosen, name, tuple(value) if name == "betas" else float(value))  # type: ignore[arg-type]
    if lr is not None:
        _set_lr(optimizer, scheduler, chosen, float(lr))


class Rewarm:
    """A short warmup after a resume, on top of whatever schedule is in use.

    Fresh optimizer moments, a raised LR or a changed model can make the first steps after a
    resume too large. ``Rewarm`` multiplies the learning rate by a factor ramping linearly
    from ``start_factor`` to 1 over ``steps`` steps. Call its :meth:`step` *instead of*
    ``scheduler.step()``: it removes its factor, steps the scheduler (so chainable schedules
    stay right), and applies the next factor. It is a Stateful: put it in the saved state.

    Args:
        optimizer: the optimizer whose LR is ramped.
        steps: length of the ramp in steps.
        scheduler: the LR scheduler to step (None: the LR is otherwise constant).
        start_factor: the factor of the first step after the resume.

    Example:
        >>> rewarm = runstate.torch.Rewarm(opt, steps=200, scheduler=sched)  # doctest: +SKIP
        >>> state["rewarm"] = rewarm
        >>> for batch in loader:
        ...     loss.backward(); opt.step(); rewarm.step()
    """

    def __init__(
        self, optimizer: Optimizer, *, steps: int, scheduler: Scheduler | None = None, start_factor: float = 0.01
    ) -> None:
        if type(steps) is not int or steps < 1:
            raise CheckpointConfigError(f"Rewarm: steps must be a positive int, got {steps!r}")
        if not 0 < start_factor <= 1:
            raise CheckpointConfigError(f"Rewarm: start_factor must be in (0, 1], got {start_factor!r}")
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.steps = steps
        self.start_factor = float(start_factor)
        self.count = 0
        self._apply(self.factor)

    @property
    def factor(self) -> float:
        """The multiplier in force now."""
        if self.count >= self.steps:
            return 1.0
        return self.start_factor + (1.0 - self.start_factor) * self.count / self.steps

    def _apply(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * factor

    def step(self, *args: Any) -> None:
        """Step the scheduler (arguments go to it, e.g. a metric for ReduceLROnPlateau)."""
        old = self.factor
        if old != 1.0:
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] / old
        if self.scheduler is not None:
            self.scheduler.step(*args)
        self.count += 1
        new = self.factor
        if new != 1.0:
            self._apply(new)

    def state_dict(self) -> dict[str, Any]:
        """The ramp's position and settings."""
        return {"count": self.count, "steps": self.steps, "start_factor": self.start_factor}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue a saved ramp (the optimizer's restored LR already includes its factor)."""
        self.steps = int(state_dict["steps"])
        self.start_factor = float(state_dict["start_factor"])
        self.count = int(state_dict["count"])


def extend_schedule(scheduler: Scheduler, *, total_steps: int) -> None:
    """Lengthen or shorten a schedule's horizon, keeping the current LR continuous.

    The part of the schedule still ahead is stretched (or squeezed) to end at
    ``total_steps`` (counted like the scheduler's ``last_epoch``), at the same final value.

    * OneCycleLR: ``total_steps``; in the annealing phase the current position keeps its
      fraction of the annealing curve; a warmup in progress keeps its length.
    * CosineAnnealingLR: ``T_max``; the base is re-anchored so the curve through the current
      LR reaches ``eta_min`` at the new end.
    * LinearLR: ``total_iters`` and ``start_factor``, so the line through the current factor
      reaches ``end_factor`` at the new end.
    * PolynomialLR: ``total_iters`` and the base, likewise.

    Raises:
        CheckpointConfigError: ``total_steps`` is not after the current step, or the scheduler is of
            another kind.
    """
    t = int(scheduler.last_epoch)
    if type(total_steps) is not int or total_steps <= t:
        raise CheckpointConfigError(
            f"extend_schedule: total_steps={total_steps!r} must be an int after the current step {t}"
        )
    stretch = next((f for cls, f in _STRETCH.items() if isinstance(scheduler, cls)), None)
    if stretch is None:
        raise CheckpointConfigError(
            f"extend_schedule: {type(scheduler).__name__} is not supported "
            "(OneCycleLR, CosineAnnealingLR, LinearLR, PolynomialLR are)"
        )
    stretch(scheduler, t, total_steps)


def _stretch_one_cycle(scheduler: Scheduler, t: int, total_steps: int) -> None:
    phases = scheduler._schedule_phases
    last = phases[-1]
    start = float(phases[-2]["end_step"]) if len(phases) > 1 else 0.0
    if t > start:  # annealing: keep the fraction done, stretch what is left
        pct = (t - start) / (float(last["end_step"]) - start)
        new_end = float(total_steps - 1)
        new_start = (t - pct * new_end) / (1.0 - pct)
        if len(phases) > 1:
            phases[-2]["end_step"] = new_start
        last["end_step"] = new_end
    else:
        last["end_step"] = float(total_steps - 1)
    scheduler.total_steps = total_steps


def _stretch_cosine(scheduler: Scheduler, t: int, total_steps: int) -> None:
    eta = float(scheduler.eta_min)
    c = (1 + math.cos(math.pi * t / total_steps)) / 2
    for i, group in enumerate(scheduler.optimizer.param_groups):
        scheduler.base_lrs[i] = eta + (float(group["lr"]) - eta) / c
    scheduler.T_max = total_steps


def _stretch_linear(scheduler: Scheduler, t: int, total_steps: int) -> None:
    old = (
        scheduler.start_factor
        + (scheduler.end_factor - scheduler.start_factor) * min(t, scheduler.total_iters) / scheduler.total_iters
    )
    frac = t / total_steps
    scheduler.start_factor = (old - scheduler.end_factor * frac) / (1 - frac)
    scheduler.total_iters = total_steps
    for i, group in enumerate(scheduler.optimizer.param_groups):
        scheduler.base_lrs[i] = float(group["lr"]) / old


def _stretch_polynomial(scheduler: Scheduler, t: int, total_steps: int) -> None:
    factor = (1 - t / total_steps) ** scheduler.power
    for i, group in enumerate(scheduler.optimizer.param_groups):
        scheduler.base_lrs[i] = float(group["lr"]) / factor
    scheduler.total_iters = total_steps


#: How :func:`extend_schedule` moves the horizon of each scheduler class it supports.
_STRETCH: dict[type, Callable[[Scheduler, int, int], None]] = {
    lrs.OneCycleLR: _stretch_one_cycle,
    lrs.CosineAnnealingLR: _stretch_cosine,
    lrs.LinearLR: _stretch_linear,
    lrs.PolynomialLR: _stretch_polynomial,
}


def reset_optimizer_state(optimizer: Optimizer, params: Iterable[torch.Tensor] | None = None) -> int:
    """Forget the optimizer's per-parameter state (moments, step counts).

    Args:
        optimizer: the optimizer.
        params: the parameters to reset (default: all).

    Returns:
        How many parameters had state that was dropped.
    """
    targets = list(optimizer.state) if params is None else [p for p in params if p in optimizer.state]
    for p in targets:
        del optimizer.state[p]
    return len(targets)
