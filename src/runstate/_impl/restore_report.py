"""What a restore found: :class:`Mismatch` and :class:`RestoreReport` (public, re-exported by
``runstate``), and the hints a report gives for the key prefixes of framework wrappers."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from runstate import adapters

__all__ = ["Mismatch", "RestoreReport", "hints"]


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

    ``bool(report)`` is ``report.ok``, like :class:`runstate.VerifyReport`.

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

    def __bool__(self) -> bool:
        return self.ok

    def of(self, item: str, kind: str | None = None) -> list[str]:
        """The keys of one item's mismatches, optionally of one kind."""
        return [m.key for m in self.mismatches if m.item == item and (kind is None or m.kind == kind)]

    def __str__(self) -> str:
        lines = [m.message for m in self.mismatches] + [f"hint: {h}" for h in self.hints]
        return "\n  ".join(lines) if lines else "everything matched"


def hints(problems: Sequence[Mismatch]) -> list[str]:
    """Suggest a ``rename`` when keys differ only by a prefix a framework's wrapper adds (DDP's
    ``module.``, see :func:`runstate.adapters.key_prefixes`)."""
    out = []
    for item in sorted({p.item for p in problems}):
        missing = {p.key for p in problems if p.item == item and p.kind == "missing"}
        unexpected = {p.key for p in problems if p.item == item and p.kind == "unexpected"}
        if not missing or not unexpected:
            continue
        prefix_of = f"state[{item!r}]["
        miss = {k[len(prefix_of) :].strip("]'\"") for k in missing}
        unex = {k[len(prefix_of) :].strip("]'\"") for k in unexpected}
        for prefix in adapters.key_prefixes():
            if {k.removeprefix(prefix) for k in unex if k.startswith(prefix)} >= miss:
                out.append(
                    f"the checkpoint's keys carry a {prefix!r} prefix: pass rename={{{item!r}: [(r'^{re.escape(prefix)}', '')]}}"
                )
            elif {k.removeprefix(prefix) for k in miss if k.startswith(prefix)} >= unex:
                out.append(f"the live keys carry a {prefix!r} prefix: pass rename={{{item!r}: [(r'^', {prefix!r})]}}")
    return out
