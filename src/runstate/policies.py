"""Small pure policies: when to save (:class:`SaveCadence`), and which checkpoints to keep
(:class:`Retention`).

They hold no I/O and no clock of their own, so they are tested with plain numbers, and a
``CheckpointManager`` takes them whole (``retention=Retention(keep_last=5)``,
``cadence=SaveCadence(every_steps=100)``) or builds them from its keyword arguments
(``keep_last=5``, ``save_every_steps=100``). A bad value raises :class:`CheckpointConfigError`
when the policy is created, before anything is read or written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from runstate.errors import CheckpointConfigError

__all__ = ["Retention", "SaveCadence"]


def _positive(name: str, value: Any, kind: type = int) -> None:
    """Refuse anything but None or a positive ``kind`` (a float option also takes an int; never a bool)."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) if kind is float else type(value) is int
    if not ok or isinstance(value, bool) or not value > 0:  # "not >" also refuses NaN
        raise CheckpointConfigError(f"{name} must be a positive {kind.__name__} or None, got {value!r}")


@dataclass(frozen=True)
class SaveCadence:
    """Decides whether ``CheckpointManager.save`` writes at a given step.

    A save happens when ``step`` is a multiple of ``every_steps``, or when at least
    ``every_seconds`` have passed since the last save; with neither set, always.
    ``CheckpointManager(dir, cadence=SaveCadence(every_steps=100))`` is the same as
    ``CheckpointManager(dir, save_every_steps=100)``.

    Attributes:
        every_steps: save at steps divisible by this (None: not by step).
        every_seconds: ...or once this many seconds passed since the last save (None: not by time).

    Raises:
        CheckpointConfigError: a value is not positive (or not a number).

    Example:
        >>> SaveCadence(every_steps=10).should_save(20, seconds_since_last_save=0.0)
        True
    """

    every_steps: int | None = None
    every_seconds: float | None = None

    def __post_init__(self) -> None:
        _positive("save_every_steps", self.every_steps)
        _positive("save_every_seconds", self.every_seconds, float)

    def should_save(self, step: int, seconds_since_last_save: float) -> bool:
        """True when a checkpoint is due at ``step``, ``seconds_since_last_save`` after the last one."""
        if self.every_steps is None and self.every_seconds is None:
            return True
        if self.every_steps is not None and step % self.every_steps == 0:
            return True
        return self.every_seconds is not None and seconds_since_last_save >= self.every_seconds


@dataclass(frozen=True)
class Retention:
    """Which checkpoints survive: the union of the last N, every K-th step and the best M.

    The newest checkpoint is always kept. ``CheckpointManager(dir, retention=Retention(keep_last=2,
    keep_best=1, best_metric="val_loss"))`` is the same as passing those keyword arguments to
    the manager.

    Attributes:
        keep_last: keep the N newest steps (None: keep all).
        keep_every: also keep steps divisible by this.
        keep_best: also keep the M best by ``metrics[best_metric]`` (a checkpoint without
            that metric, or with NaN, ranks last).
        best_metric: the metric that ranks checkpoints for ``keep_best``.
        best_mode: ``"min"`` (lower is better) or ``"max"``.

    Raises:
        CheckpointConfigError: a count is not a positive int, ``best_mode`` is neither
            ``"min"`` nor ``"max"``, or ``keep_best`` is given without ``best_metric``.

    Example:
        >>> sorted(Retention(keep_last=2).to_keep([1, 2, 3, 4], {}))
        [3, 4]
    """

    keep_last: int | None = 3
    keep_every: int | None = None
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: str = "min"

    def __post_init__(self) -> None:
        _positive("keep_last", self.keep_last)
        _positive("keep_every", self.keep_every)
        _positive("keep_best", self.keep_best)
        if self.best_metric is not None and not isinstance(self.best_metric, str):
            raise CheckpointConfigError(f"best_metric must be a metric name (a str) or None, got {self.best_metric!r}")
        if not isinstance(self.best_mode, str) or self.best_mode not in ("min", "max"):
            raise CheckpointConfigError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if self.keep_best is not None and not self.best_metric:
            raise CheckpointConfigError("keep_best needs best_metric, the name of the metric to rank checkpoints by")

    @property
    def needs_metrics(self) -> bool:
        """True when deciding needs each checkpoint's metrics."""
        return self.keep_best is not None

    def to_keep(
        self, steps: Sequence[int], metrics: Mapping[int, Mapping[str, Any]], protected: Sequence[int] = ()
    ) -> set[int]:
        """The steps to keep among ``steps``; the newest and ``protected`` are always kept.

        Args:
            steps: the committed steps.
            metrics: each step's recorded metrics (only read for ``keep_best``).
            protected: steps kept whatever the policy says (the one just saved...).
        """
        if not steps:
            return set()
        ordered = sorted(steps)
        if self.keep_last is None:
            return set(ordered)
        keep = set(ordered[-self.keep_last :]) | {ordered[-1]} | (set(protected) & set(ordered))
        if self.keep_every is not None:
            keep |= {s for s in ordered if s % self.keep_every == 0}
        if self.keep_best is not None:
            scored: list[tuple[int | float, int, int]] = []
            for s in ordered:
                v = metrics.get(s, {}).get(self.best_metric or "")
                if _rankable(v):
                    # Python compares int with int and int with float exactly: no conversion
                    # to float, so integers past 2**1024 rank too.
                    scored.append((v if self.best_mode == "min" else -v, -s, s))
            keep |= {s for _, _, s in sorted(scored)[: self.keep_best]}
        return keep


def _rankable(value: Any) -> TypeGuard[int | float]:
    """True for a metric ``keep_best`` can rank: any int or float but NaN (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or not math.isnan(value)  # math.isnan(2**1024) would overflow
