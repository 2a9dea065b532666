"""``RestoreResult``: what ``mgr.restore(state)`` and ``runstate.load(path, state)`` give back.

A restore can partly succeed (``strict=False``: keys missing, unexpected or reshaped), so
the caller gets the report with the step, not on a side attribute it may forget to read.
The result *is* the step restored (an ``int`` subclass), so the idioms written before it
existed keep working unchanged: ``start = mgr.restore(state) or 0``, ``range(start, n)``,
``start + 1`` (a plain int), ``f"{start}"`` and ``%d`` print the number. Arithmetic gives
plain ints; ``int(result)`` or ``result.step`` is the number alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runstate._impl.restore_report import RestoreReport

__all__ = ["RestoreResult"]


class RestoreResult(int):
    """The step restored, with the restore's report and the checkpoint it came from.

    Its integer value is the step (0 for a standalone checkpoint saved without a step), so
    ``mgr.restore(state) or 0`` and ``range(mgr.restore(state) or 0, total)`` keep working;
    like any int it is falsy for step 0.

    Attributes:
        step: the step restored; None for a checkpoint saved by :func:`runstate.save`
            without ``step=``.
        report: the :class:`RestoreReport` (what did not match, with ``strict=False``);
            ``result.report.ok`` is True after an exact restore.
        path: the checkpoint directory (or URL) restored from.

    Example:
        >>> result = mgr.restore(state)  # doctest: +SKIP
        >>> if result is not None and not result.report:  # doctest: +SKIP
        ...     print(result.report)
    """

    step: int | None
    report: RestoreReport
    path: str
    #: stored in a checkpoint as its int value (``state["step"] = mgr.restore(state) or 0``)
    _runstate_stored_as_int = True

    def __new__(cls, step: int | None, report: RestoreReport, path: str) -> RestoreResult:
        """Args:
        step: the step restored, or None (a checkpoint saved without a step).
        report: the restore's report.
        path: the checkpoint restored from.
        """
        result = super().__new__(cls, 0 if step is None else int(step))
        object.__setattr__(result, "step", None if step is None else int(step))
        object.__setattr__(result, "report", report)
        object.__setattr__(result, "path", path)
        return result

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"RestoreResult is read-only: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"RestoreResult is read-only: cannot delete {name!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (RestoreResult, (self.step, self.report, self.path))

    def __repr__(self) -> str:
        return f"RestoreResult(step={self.step!r}, path={self.path!r}, ok={self.report.ok})"

    # str(), f"{result}" and "%s" give the number, as for the int it replaces.
    __str__ = int.__repr__
