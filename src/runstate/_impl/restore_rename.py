"""The ``rename`` and ``exclude`` options of a restore, checked before anything is read.

``rename={"model": [(r"^module\\.", "")]}`` rewrites an item's stored keys with regular
expressions (e.g. to load a DDP checkpoint into a plain model); ``exclude=["config", "log_*"]``
leaves items alone. A malformed option raises :class:`~runstate.errors.CheckpointConfigError`
before any file is read, so nothing changes.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from runstate.errors import CheckpointConfigError, StateMismatchError
from runstate.format.manifest import item_name
from runstate.format.tree import StatefulState

__all__ = ["Renamer", "Renames", "exclude_patterns", "exclusion", "warn_unmatched_exclude"]

logger = logging.getLogger("runstate")

#: ``{"model": [(r"^module\.", "")]}``: regex substitutions applied to an item's stored keys.
Renames = Mapping[str, Sequence[tuple[str, str]]]


def _compile_rule(rule: Any, item: Any, source: str) -> tuple[re.Pattern[str], str]:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and all(isinstance(x, str) for x in rule)):
        raise CheckpointConfigError(
            f"{source}: rename[{item!r}]: each rule must be a (pattern, replacement) pair of strings, got {rule!r}"
        )
    pattern, repl = rule
    try:
        return re.compile(pattern), repl
    except re.error as exc:
        raise CheckpointConfigError(
            f"{source}: rename[{item!r}]: pattern {pattern!r} is not a valid regular expression ({exc}); "
            "nothing was changed"
        ) from exc


class Renamer:
    """The checked ``rename`` rules of one restore, applied to stored keys.

    Args:
        rename: the option as passed (None: no rules).
        source: the checkpoint, for messages.

    Raises:
        CheckpointConfigError: a rule is not a ``(pattern, replacement)`` pair of strings, or a
            pattern is not a valid regular expression.
    """

    def __init__(self, rename: Renames | None, source: str) -> None:
        self.source = source
        self.rules: dict[str, list[tuple[re.Pattern[str], str]]] = {}
        self.renamed: dict[str, int] = {}
        if rename is None:
            return
        if not isinstance(rename, Mapping):
            raise CheckpointConfigError(
                f"{source}: rename must be a dict of item names to [(pattern, replacement), ...], "
                f"got {type(rename).__qualname__}"
            )
        for item, rules in rename.items():
            if isinstance(rules, (str, bytes)) or not isinstance(rules, Iterable):
                raise CheckpointConfigError(
                    f"{source}: rename[{item!r}] must be a list of (pattern, replacement) pairs"
                )
            self.rules[item] = [_compile_rule(rule, item, source) for rule in rules]

    def key(self, item: str, key: str) -> str:
        """``key`` of ``item`` after the item's rules.

        Raises:
            CheckpointConfigError: a replacement is invalid (e.g. names a group the pattern lacks).
        """
        for pattern, repl in self.rules.get(item, ()):
            try:
                key = pattern.sub(repl, key)
            except (re.error, IndexError) as exc:
                raise CheckpointConfigError(
                    f"{self.source}: rename[{item!r}]: replacement {repl!r} of pattern {pattern.pattern!r} is "
                    f"invalid ({exc}); nothing was changed"
                ) from exc
        return key

    def param(self, name: str | None) -> str | None:
        """A stored parameter name ``"item.key"`` after the rules of its item."""
        if name is None or "." not in name:
            return name
        item, rest = name.split(".", 1)
        return f"{item}.{self.key(item, rest)}"

    def apply(self, item: str, stored: Any) -> Any:
        """Rename an item's stored top-level keys with its rules (counted in :attr:`renamed`).

        Raises:
            StateMismatchError: the rules give two of this checkpoint's keys the same name (one
                would be lost).
        """
        target = stored.state if isinstance(stored, StatefulState) else stored
        if not self.rules.get(item) or not isinstance(target, dict):
            return stored
        out = type(target)()
        origin: dict[Any, Any] = {}
        clashes: dict[Any, list[Any]] = {}
        count = 0
        for key, value in target.items():
            new = self.key(item, key) if isinstance(key, str) else key
            count += new != key
            if new in origin:
                clashes.setdefault(new, [origin[new]]).append(key)
            origin[new] = key
            out[new] = value
        if clashes:
            listed = "; ".join(f"{olds!r} -> {new!r}" for new, olds in list(clashes.items())[:10])
            more = f" (and {len(clashes) - 10} more)" if len(clashes) > 10 else ""
            raise StateMismatchError(
                f"{self.source}: the rename rules of item {item!r} give several stored keys the same name, "
                f"so all but one would be lost: {listed}{more}; change the rules so that "
                "each stored key gets a name of its own (nothing was changed)"
            )
        self.renamed[item] = count
        return StatefulState(stored.type, out, stored.param_names) if isinstance(stored, StatefulState) else out


def exclude_patterns(exclude: str | Iterable[str] | None, source: str) -> list[str]:
    """The patterns of ``exclude``, checked.

    Raises:
        CheckpointConfigError: ``exclude`` is not a name or a list of names / glob patterns.
    """
    if exclude is None:
        return []
    patterns = [exclude] if isinstance(exclude, str) else list(exclude) if isinstance(exclude, Iterable) else None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise CheckpointConfigError(
            f"{source}: exclude must be a list of item names or glob patterns (e.g. ['config', 'log_*']), "
            f"got {exclude!r}"
        )
    return patterns


def exclusion(patterns: Sequence[str]) -> Callable[[str], bool]:
    """The test ``exclude`` stands for: item names or glob patterns (``"config"``, ``"log_*"``)."""

    def excluded(name: str) -> bool:
        base = item_name(name)  # a per-rank item's stored copies
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(base, p) for p in patterns)

    return excluded


def warn_unmatched_exclude(patterns: Sequence[str], names: Iterable[str], source: str) -> None:
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
