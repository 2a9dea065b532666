"""The one save pipeline: capture, then write and commit, for one process or many.

Every save, ``runstate.save`` or a manager's (sync, async or collective), goes through the
same two steps, with every decision agreed through the :class:`~runstate._impl.group.Group`
(a single process is the group of one, where agreeing costs nothing):

1. :func:`capture` validates the metrics and encodes the whole state, so a value that
   cannot be stored fails before any file is created. If any process cannot, all raise;
   if the processes save different items, all raise.
2. :func:`save_checkpoint`: rank 0 starts the checkpoint (``Store.begin``: a hidden
   temporary directory, or the final prefix of an object store) and tells the others where
   (``Store.attach``). Every process writes its files (:mod:`runstate._impl.parts`): rank 0
   the replicated items, every rank its per-rank items and its blocks of sharded items.
   Only when every process succeeded does rank 0 merge the parts into ``manifest.json`` and
   commit; otherwise everything is removed. A process that dies at any moment therefore
   never leaves a committed partial checkpoint: its peers block or fail, and rank 0 never
   commits.

The on-disk result of a single process has no part file and no ``ranks`` in its manifest
(``docs/format.md``). Where the bytes go is the business of the :class:`~runstate.storage.Store`;
what to save when, retention and async are the callers' (:mod:`runstate._impl.savers`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from runstate import adapters
from runstate._impl import parts
from runstate._impl.group import Group, agree, same_everywhere
from runstate._version import __version__
from runstate.distributed import is_per_rank, unwrap
from runstate.errors import (
    CheckpointConfigError,
    CheckpointError,
    CheckpointWriteError,
    CorruptCheckpointError,
    LockError,
    StateMismatchError,
    StepExistsError,
    UnsupportedTypeError,
)
from runstate.format.compress import Compression
from runstate.format.manifest import RANK_SUFFIX, Manifest, RankInfo, per_rank_name
from runstate.format.tree import Encoder
from runstate.storage.base import Staging, Store

if TYPE_CHECKING:  # incremental reads manifests through the reader, which imports this module
    from runstate._impl.incremental import Incremental, Prepared

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "Captured",
    "CheckpointInfo",
    "capture",
    "save_checkpoint",
    "validate_state",
    "validate_step",
]

DEFAULT_SHARD_BYTES = parts.DEFAULT_SHARD_BYTES


@dataclass(frozen=True)
class CheckpointInfo:
    """What a committed checkpoint is, without loading it.

    Attributes:
        step: the training step it was saved at (None for a standalone save without one).
        path: the checkpoint directory.
        created: creation time, ISO-8601 with timezone.
        metrics: the metrics passed to ``save``.
        nbytes: total size of its files in bytes.
    """

    step: int | None
    path: str
    created: str
    metrics: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0


def validate_state(state: Any, action: str) -> None:
    """Check that ``state`` is a dict with string keys."""
    if not isinstance(state, Mapping):
        raise UnsupportedTypeError(
            f"{action}: state must be a dict of named items such as "
            f"{{'model': model, 'optimizer': opt}}, got {type(state).__qualname__}"
        )
    for key in state:
        if type(key) is not str or not key:
            raise UnsupportedTypeError(f"{action}: state keys must be non-empty strings (item names), got {key!r}")


def validate_step(step: Any) -> int:
    """Return ``step`` if it is a non-negative int, else raise ``UnsupportedTypeError``."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):  # int subclasses: a RestoreResult
        raise UnsupportedTypeError(f"step must be a non-negative int, got {step!r} ({type(step).__qualname__})")
    if step < 0:
        raise UnsupportedTypeError(f"step must be a non-negative int, got {step}")
    return int(step)


@dataclass
class Captured:
    """A state encoded for this process and ready to write: every unsupported value has raised.

    Attributes:
        items: this process's items, by stored name (``x@rank<r>`` for a per-rank item in a
            group): the encoded tree and the encoder holding the tensors.
        sharded: the items every process saves in blocks (sharded tensors).
        per_rank: the (plain) names of the items each process saves for itself.
        metrics: the metric values, as given (numbers, bools, strings, None).
        metrics_node: the metrics as a typed tree, as the manifest stores them.
        compression: how to compress the tensor files (None: as they are).
        incremental: the writer's dedup state when the run is incremental (tensor files go to
            the run's blob area, unchanged tensors are not written again); None otherwise.
        frozen: per item, the tensors its framework says training leaves unchanged (only
            computed for an incremental save).
        prepared: what the incremental state decided at capture (frozen tensors proven
            unchanged, taken out of the items' blobs), or None.
    """

    items: dict[str, tuple[dict[str, Any], Encoder]]
    sharded: frozenset[str]
    per_rank: tuple[str, ...]
    metrics: dict[str, Any]
    metrics_node: dict[str, Any]
    compression: Compression | None = None
    incremental: Incremental | None = None
    frozen: dict[str, frozenset[str]] = field(default_factory=dict)
    prepared: Prepared | None = None


def _metric_value(name: str, value: Any) -> Any:
    if value is not None and type(value) not in (int, float, bool, str) and callable(getattr(value, "item", None)):
        with contextlib.suppress(TypeError, ValueError, RuntimeError):  # not a single number: rejected below
            value = value.item()  # a 0-dim tensor or NumPy scalar, e.g. loss.detach()
    if value is None or type(value) in (int, float, bool, str):
        return value
    raise UnsupportedTypeError(
        f"metrics[{name!r}]: must be a number, bool, str or None, got {type(value).__qualname__}"
    )


def _encode(state: Mapping[str, Any], metrics: Mapping[str, Any] | None, group: Group) -> tuple[Captured, str]:
    """Encode ``state`` for this process; also return its layout (item names and kinds),
    which every process of the group must share."""
    if metrics is not None and not isinstance(metrics, Mapping):
        raise UnsupportedTypeError(f"metrics must be a dict of names to numbers, got {type(metrics).__qualname__}")
    metric_values = {str(k): _metric_value(str(k), v) for k, v in (metrics or {}).items()}
    metrics_node = Encoder("metrics", lambda _v: None, []).encode(metric_values)
    for name in state:
        if RANK_SUFFIX.search(name):
            raise UnsupportedTypeError(
                f"item name {name!r}: names ending in @rank<N> are reserved for per-rank copies; rename the item"
            )
    objects = adapters.object_codecs()
    values = {name: unwrap(value) for name, value in state.items()}
    items: dict[str, tuple[dict[str, Any], Encoder]] = {}
    sharded: set[str] = set()
    per_rank: list[str] = []
    layout = []
    for name, value in values.items():
        enc = Encoder(name, adapters.find_codec, objects, adapters.REGISTRATIONS)
        tree = enc.encode(value)
        tree.update(adapters.item_extras(name, value, values))  # e.g. an optimizer's parameter names
        if is_per_rank(state[name]):
            items[per_rank_name(name, group.rank) if group.distributed else name] = (tree, enc)
            per_rank.append(name)
            layout.append((name, "per-rank"))
        elif any(adapters.is_sharded_blob(blob) for blob in enc.blobs.values()):
            items[name] = (tree, enc)
            sharded.add(name)
            layout.append((name, "sharded"))
        else:
            if group.rank == 0:
                items[name] = (tree, enc)
            layout.append((name, "replicated"))
    captured = Captured(items, frozenset(sharded), tuple(per_rank), metric_values, metrics_node)
    return captured, repr(sorted(layout))


def capture(
    state: Mapping[str, Any],
    metrics: Mapping[str, Any] | None,
    group: Group,
    *,
    where: str = "save",
    compression: Compression | None = None,
    incremental: Incremental | None = None,
) -> Captured:
    """Validate ``metrics`` and encode ``state`` without touching the storage (step 1).

    Collective: every process of ``group`` calls it with its own state.

    Args:
        state: the named items (checked by :func:`validate_state` first, by the caller).
        metrics: numbers to record with the checkpoint, or None.
        group: the processes saving together.
        where: the checkpoint's location, for error messages.
        compression: how to compress the tensor files, from ``resolve_compression``.
        incremental: the writer's dedup state (a ``CheckpointManager(incremental=True)``).

    Raises:
        UnsupportedTypeError: a value or metric cannot be stored (on the process that met it;
            the others raise ``CheckpointWriteError``).
        StateMismatchError: the processes save different items (on every process).
    """
    captured: Captured | None = None
    layout = ""
    error: BaseException | None = None
    try:
        captured, layout = _encode(state, metrics, group)
    except Exception as exc:  # every process must reach the agreement below, whatever failed
        error = _as_checkpoint_error(exc, where, group)
    agree(
        group,
        error,
        lambda: CheckpointWriteError(f"{where}: another process could not encode its state (see its error)"),
    )
    if not same_everywhere(group, layout):
        raise StateMismatchError(
            f"{where}: the processes save different items or kinds of items; every process must save the same "
            f"item names, with the same ones per-rank and sharded (this one: {layout}); nothing was written"
        )
    assert captured is not None
    captured.compression = compression
    if incremental is not None:
        captured.incremental = incremental
        captured.frozen = {name: adapters.frozen_tensors(unwrap(state[name])) for name in captured.items}
        plain = {n: v for n, v in captured.items.items() if n not in captured.sharded}
        captured.prepared = incremental.prepare(plain, captured.frozen)
    return captured


def save_checkpoint(
    store: Store,
    name: str,
    captured: Captured,
    *,
    group: Group,
    step: int | None,
    before_start: Callable[[], None] | None = None,
    before_commit: Callable[[Staging, bytes], None] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> CheckpointInfo:
    """Write a captured state as the checkpoint ``name`` of ``store`` and commit it (step 2).

    Collective: every process of ``group`` calls it with the same store, name and step.

    Args:
        store: where the checkpoint goes (a run directory, or the parent of a standalone one).
        name: the checkpoint's name in ``store``.
        captured: this process's state, from :func:`capture` with the same group.
        group: the processes saving together.
        step: recorded in the manifest.
        before_start: called on rank 0 before the checkpoint is started (lock, leftovers);
            raising stops the save on every process.
        before_commit: called on rank 0 with the staging and the manifest once every file is
            durable, before the commit (e.g. to read everything back); raising aborts.
        shard_bytes: split an item's files past this many tensor bytes.

    Returns:
        The :class:`CheckpointInfo` of the committed checkpoint, on every process.

    Raises:
        StepExistsError: ``name`` is already committed.
        CheckpointWriteError: the storage failed (``errno`` kept), or another process did;
            nothing was committed.
        CheckpointError: another error of this process or of rank 0 (the same kind on every process).
    """
    where = store.join(name)
    began: list[Staging] = []  # rank 0's staging, once begun

    def begin() -> str:
        if before_start is not None:
            before_start()
        began.append(store.begin(name))
        return began[0].location

    location = _rank0_does(group, begin, where, "could not start the checkpoint")
    staging, part = _write_agreed(
        store, began[0] if began else None, location, captured, group, shard_bytes, where, step
    )
    with staging:  # an exception aborts (on rank 0: the whole checkpoint; elsewhere: this process's files)
        text = _rank0_does(
            group,
            lambda: _commit(staging, name, part, captured, group, step, before_commit),
            where,
            "could not commit the checkpoint",
            staging,
        )
    info = json.loads(text)
    return CheckpointInfo(step, info["path"], info["created"], captured.metrics, info["nbytes"])


def _write_agreed(
    store: Store,
    began: Staging | None,
    location: str,
    captured: Captured,
    group: Group,
    shard_bytes: int,
    where: str,
    step: int | None = None,
) -> tuple[Staging, parts.Part]:
    """Collective: every process writes its files into the checkpoint; when any failed, all raise.

    Returns:
        This process's staging (``began`` on rank 0, attached elsewhere) and its part.
    """
    staging = began
    part: parts.Part = {}
    error: BaseException | None = None
    try:
        if staging is None:
            staging = store.attach(location)
        if captured.incremental is not None and not group.distributed:
            part = _write_incremental(store, staging, captured, step, shard_bytes)
        else:
            part = parts.write_part(
                staging,
                captured.items,
                captured.sharded,
                rank=group.rank,
                shard_bytes=shard_bytes,
                publish=group.distributed,  # the committing process reads the others' parts
                compression=captured.compression,
            )
    except Exception as exc:  # every process must reach the agreement below, whatever failed
        error = _as_checkpoint_error(exc, where, group, staging)
    except BaseException:  # interrupted mid-write (KeyboardInterrupt): this process stops here
        if staging is not None:
            staging.abort()
        raise
    try:
        agree(
            group,
            error,
            lambda: CheckpointWriteError(
                f"{where}: another process failed to write its files (see its error); nothing was committed"
            ),
        )
    except CheckpointError:  # an agreed failure: nothing is committed, this process's files go
        if staging is not None:
            staging.abort()
        raise
    # Any other exception is the collective itself failing (a peer died): what this process wrote
    # stays as an invisible leftover, removed by the next save (as rank 0 cannot know it is safe).
    assert staging is not None
    return staging, part


def _write_incremental(
    store: Store, staging: Staging, captured: Captured, step: int | None, shard_bytes: int
) -> parts.Part:
    """One process's incremental part: tensors in the run's blob area (unchanged ones not
    written again), sharded items (if any) in the checkpoint as usual."""
    assert captured.incremental is not None and captured.prepared is not None
    plain = {n: v for n, v in captured.items.items() if n not in captured.sharded}
    written = captured.incremental.write(
        step, plain, captured.frozen, captured.prepared, shard_bytes=shard_bytes, compression=captured.compression
    )
    try:
        part = parts.write_part(
            staging,
            {n: v for n, v in captured.items.items() if n in captured.sharded},
            captured.sharded,
            rank=0,
            shard_bytes=shard_bytes,
            publish=False,
            compression=captured.compression,
        )
    except BaseException:
        captured.incremental.abandoned()  # joins the blob area's fsync; the next save writes everything
        raise
    for name, (tree, _enc) in plain.items():
        part["items"][name] = {"tree": tree, "chunks": {}, "tensors": written.entries.get(name, {})}
    part["items"] = {name: part["items"][name] for name in captured.items}  # the state's order
    part["blobs"], part["own_blobs"] = written.blobs, written.own
    return part


def _commit(
    staging: Staging,
    name: str,
    own: parts.Part,
    captured: Captured,
    group: Group,
    step: int | None,
    before_commit: Callable[[Staging, bytes], None] | None,
) -> str:
    """Merge every process's part into the manifest and commit (rank 0); return what every
    process needs to know of the committed checkpoint, as JSON."""
    try:
        try:
            found = [own, *parts.read_parts(staging, range(1, group.size))] if group.distributed else [own]
            items, files = parts.merge(found, staging.final)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointWriteError(f"{staging.final}: cannot merge the processes' parts: {exc!r}") from exc
        manifest = Manifest(
            step=step,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
            metrics=captured.metrics_node,
            versions=_versions(),
            items=items,
            files=files,
            ranks=RankInfo(group.size, captured.per_rank) if group.distributed else None,
            blobs=own.get("blobs", {}),
            own_blobs=own.get("own_blobs", frozenset()),
        )
        raw = manifest.to_json_bytes()
        if captured.incremental is not None:
            captured.incremental.durable()  # the blob folder's fsync, started when its last new blob was created
        if before_commit is not None:
            before_commit(staging, raw)
        final = staging.commit(raw)
    except BaseException:
        staging.abort()
        if captured.incremental is not None:
            captured.incremental.abandoned()
        raise
    if captured.incremental is not None:
        captured.incremental.committed(name, raw)
    return json.dumps({"path": final, "created": manifest.created, "nbytes": manifest.nbytes + len(raw)})


def _versions() -> dict[str, str]:
    return {
        "runstate": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        **adapters.framework_versions(),
    }


def _rank0_does(
    group: Group, action: Callable[[], str], where: str, failure: str, staging: Staging | None = None
) -> str:
    """Collective: rank 0 runs ``action``, and every process gets the text it returned.

    When ``action`` fails, rank 0 raises its error and every other process an error of the
    same kind (rebuilt from its name). One broadcast.
    """
    text, error = "", None
    if group.rank == 0:
        try:
            text = action()
        except Exception as exc:
            error = _as_checkpoint_error(exc, where, group, staging)
            text = f"\0{type(error).__name__}\0{error}"
    text = group.broadcast_text(text)
    if error is not None:
        raise error
    if text.startswith("\0"):
        kind, _, reason = text[1:].partition("\0")
        raise _SAME_KIND.get(kind, CheckpointWriteError)(f"{where}: rank 0 {failure}: {reason}")
    return text


#: How the other processes rebuild an error of rank 0, by its type's name (any other: CheckpointWriteError).
_SAME_KIND: dict[str, Callable[[str], CheckpointError]] = {
    "StepExistsError": StepExistsError,
    "LockError": lambda message: LockError(errno.EWOULDBLOCK, message),
    "CheckpointConfigError": CheckpointConfigError,
    "CorruptCheckpointError": CorruptCheckpointError,
    "StateMismatchError": StateMismatchError,
    "UnsupportedTypeError": UnsupportedTypeError,
}


def _as_checkpoint_error(exc: Exception, where: str, group: Group, staging: Staging | None = None) -> BaseException:
    """The error this process raises for ``exc``.

    An ``OSError`` while writing becomes the staging's ``CheckpointWriteError`` (``errno`` and
    a hint kept). In a group, any other error that is not a ``CheckpointError`` becomes a
    ``CheckpointWriteError`` too, so that every process raises a ``CheckpointError``; a single
    process raises the original exception, which says most.
    """
    if isinstance(exc, CheckpointError):
        return exc
    if isinstance(exc, OSError) and staging is not None:
        wrapped = staging.write_error(exc)
    elif group.distributed:
        wrapped = CheckpointWriteError(f"{where}: {exc!r}; nothing was committed")
    else:
        return exc
    wrapped.__cause__ = exc
    return wrapped
