"""Putting a checkpoint's values back into a live state.

Restoring is two-phase: every item is read, verified and checked against the live objects
first, and only when all of that succeeded are objects changed in place (``load_state_dict``)
and plain values replaced. A corrupt file or a mismatch therefore changes nothing. What did
not match is returned as a :class:`RestoreReport`.

Phase one (:func:`plan_restore`, the tree walk in :mod:`runstate._impl.restore_tree`) checks
everything that can be checked without changing anything: item names, keys, shapes and dtypes
of state_dicts and of replaced values, the kind of every replaced value, the class of every
stateful object (a module is checked by its keys instead), optimizer parameters and param
groups (matched by name), devices a stored generator needs. Phase two
(:meth:`PendingRestore.apply`) cannot be undone: when a ``load_state_dict`` still raises
there, the items already changed are named in a :class:`~runstate.errors.PartialRestoreError`.
Snapshotting every item to roll it back would double the memory of a restore (a model's and
its optimizer's tensors), so runstate does not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from runstate import adapters
from runstate._impl.group import Group, SingleProcess, agree, same_everywhere
from runstate._impl.reader import CheckpointReader
from runstate._impl.restore_rename import Renamer, Renames, exclude_patterns, exclusion, warn_unmatched_exclude
from runstate._impl.restore_report import Mismatch, RestoreReport, hints
from runstate._impl.restore_tree import RestorePlan, restore_item
from runstate._impl.restore_values import plain
from runstate.distributed import PerRank, is_per_rank, on_resize, unwrap
from runstate.errors import CheckpointError, CorruptCheckpointError, PartialRestoreError, StateMismatchError
from runstate.format.manifest import per_rank_name

__all__ = ["Mismatch", "PendingRestore", "Renames", "RestoreReport", "plain", "plan_restore", "restore_state"]

logger = logging.getLogger("runstate")


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
    reader: CheckpointReader, state: Mapping[str, Any], group: Group, plan: RestorePlan
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
                "%s: item %r keeps its live value: saved per rank by %d process(es), restored by %d (on_resize='skip')",
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


def _check_items(
    reader: CheckpointReader,
    names: dict[str, str],
    covered: set[str],
    plan: RestorePlan,
    excluded: Callable[[str], bool],
) -> None:
    """Record live items the checkpoint lacks and stored items the state lacks."""
    stored_items = reader.manifest.items
    for key, stored_key in names.items():
        if stored_key not in stored_items:
            listed = sorted(k for k in stored_items if "@rank" not in k)
            plan.add((key,), "missing", f"item missing from the checkpoint (it has {listed})")
    for key in stored_items:
        if key not in covered and not excluded(key):
            plan.add((key,), "unexpected", "item in the checkpoint but not in the state")


def _preload_sharded(reader: CheckpointReader, state: Mapping[str, Any], names: dict[str, str], group: Group) -> None:
    """Collective: check that every process restores the same items, then let the adapters read
    sharded items into the live placement (kept in ``reader.preloaded``)."""
    stored_items = reader.manifest.items
    layout = sorted((key, stored_key == key, stored_key in stored_items) for key, stored_key in names.items())
    if not same_everywhere(group, repr(layout)):
        raise StateMismatchError(
            f"{reader.path}: the processes restore different items or kinds of items; every process must "
            f"pass the same item names, with the same ones per-rank (this one: {[k for k, _, _ in layout]})"
        )
    for key in sorted(names):  # collective: the same items in the same order on every process
        stored_key = names[key]
        if stored_key in stored_items:
            for name, value in adapters.preload_sharded(reader, key, stored_key, unwrap(state[key]), group).items():
                reader.preloaded[stored_key, name] = value


def _report(reader: CheckpointReader, plan: RestorePlan, left_alone: tuple[str, ...], *, strict: bool) -> RestoreReport:
    """The report of phase one; raises it as a StateMismatchError when ``strict`` and anything differs."""
    report = RestoreReport(
        reader.path, tuple(plan.problems), dict(plan.renamer.renamed), tuple(hints(plan.problems)), left_alone
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
    return report


def plan_restore(
    reader: CheckpointReader,
    state: MutableMapping[str, Any],
    group: Group,
    *,
    strict: bool,
    renamer: Renamer,
    patterns: list[str],
) -> PendingRestore:
    """Phase one: read, verify and check everything; change nothing.

    Items of ``state`` (and of the checkpoint) whose names match an ``exclude`` pattern are
    left alone: neither read nor checked nor changed.

    Raises:
        CorruptCheckpointError: a checksum, size or header does not match.
        StateMismatchError: ``strict`` and the state does not match.
    """
    plan = RestorePlan(state=state, renamer=renamer)
    excluded = exclusion(patterns)
    warn_unmatched_exclude(patterns, [*state, *reader.manifest.items], reader.path)
    left_alone = tuple(k for k in state if excluded(k))
    names, covered = _stored_names(reader, {k: v for k, v in state.items() if k not in left_alone}, group, plan)
    _check_items(reader, names, covered, plan, excluded)
    if group.distributed:
        _preload_sharded(reader, state, names, group)
    replacements: dict[str, Any] = {}
    for key, stored_key in names.items():
        if stored_key in reader.manifest.items:
            stored = plan.renamer.apply(key, reader.load_item(stored_key))
            replacements[key] = restore_item(unwrap(state[key]), stored, (key,), plan)
    report = _report(reader, plan, left_alone, strict=strict)
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

    Raises:
        CorruptCheckpointError: a checksum, size or header does not match.
        StateMismatchError: ``strict`` and the state does not match.
        CheckpointConfigError: a ``rename`` or ``exclude`` option is malformed.
        PartialRestoreError: loading an object raised in phase two (see :meth:`PendingRestore.apply`).
    """
    group = group or SingleProcess()

    def phase_one() -> PendingRestore:
        renamer = Renamer(rename, reader.path)  # options are checked before anything is read
        patterns = exclude_patterns(exclude, reader.path)
        return plan_restore(reader, state, group, strict=strict, renamer=renamer, patterns=patterns)

    if group.size == 1:
        return phase_one().apply()
    try:
        pending = phase_one()
    except Exception as exc:  # every process must reach the agreement below, whatever failed
        _agree_on_outcome(group, exc, f"{reader.path}: restoring on {group.size} processes")
        raise  # not reached: _agree_on_outcome raised
    _agree_on_outcome(group, None, "")
    return pending.apply()


def _agree_on_outcome(group: Group, error: Exception | None, where: str) -> None:
    """Collective: every process learns the worst outcome of phase one and raises its kind.

    The kind of error is agreed too (a mismatch on one process and damage on another make
    every process raise a ``StateMismatchError``), so a caller catching one kind sees it on
    every process; any other failure wins over both. One collective.
    """
    if error is not None and not isinstance(error, CheckpointError):
        wrapped = CheckpointError(f"{where}: this process could not restore its part ({error!r}); nothing was changed")
        wrapped.__cause__ = error
        error = wrapped
    agree(
        group,
        error,
        lambda: CheckpointError(f"{where}: another process could not restore its part (see its error); nothing was changed"),
        kinds=(
            (
                StateMismatchError,
                lambda: StateMismatchError(
                    f"{where}: another process's state does not match the checkpoint (see its error); nothing was changed"
                ),
            ),
            (
                CorruptCheckpointError,
                lambda: CorruptCheckpointError(f"{where}: another process found this checkpoint damaged (see its log)"),
            ),
        ),
    )
