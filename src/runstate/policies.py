"""Small pure policies: when to save, and which checkpoints to keep.

They hold no I/O and no clock of their own, so they are tested with plain numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

__all__ = ["Retention", "SaveCadence"]


def _positive(name: str, value: Any, kind: type = int) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) if kind is float else type(value) is int
    if not ok or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive {kind.__name__} or None, got {value!r}")


@dataclass(frozen=True)
class SaveCadence:
    """Decides whether ``CheckpointManager.save`` writes at a given step.

    A save happens when ``step`` is a multiple of ``every_steps``, or when at least
    ``every_seconds`` have passed since the last save; with neither set, always.
    """

    every_steps: int | None = None
    every_seconds: float | None = None

    def __post_init__(self) -> None:
        _positive("save_every_steps", self.every_steps)
        _positive("save_every_seconds", self.every_seconds, float)

    def should_save(self, step: int, seconds_since_last_save: float) -> bool:
        """True when a checkpoint is due."""
        if self.every_steps is None and self.every_seconds is None:
            return True
        if self.every_steps is not None and step % self.every_steps == 0:
            return True
        return self.every_seconds is not None and seconds_since_last_save >= self.every_seconds


@dataclass(frozen=True)
class Retention:
    """Which checkpoints survive: the union of the last N, every K-th step and the best M.

    Attributes:
        keep_last: keep the N newest steps (None: keep all).
        keep_every: also keep steps divisible by this.
        keep_best: also keep the M best by ``metrics[best_metric]``.
        best_metric: the metric that ranks checkpoints for ``keep_best``.
        best_mode: ``"min"`` or ``"max"``.
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
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if self.keep_best is not None and not self.best_metric:
            raise ValueError("keep_best needs best_metric, the name of the metric to rank checkpoints by")

    @property
    def needs_metrics(self) -> bool:
        """True when deciding needs each checkpoint's metrics."""
        return self.keep_best is not None

    def to_keep(
        self, steps: Sequence[int], metrics: Mapping[int, Mapping[str, Any]], protected: Sequence[int] = ()
    ) -> set[int]:
        """The steps to keep among ``steps``; the newest and ``protected`` are always kept."""
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
