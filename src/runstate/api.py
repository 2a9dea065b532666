"""``runstate.save`` and ``runstate.load``: one checkpoint directory, no manager."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, overload

from runstate._impl.group import current_group
from runstate._impl.pipeline import CheckpointInfo, capture, save_checkpoint, validate_state, validate_step
from runstate._impl.reader import CheckpointReader
from runstate._impl.restore import plain, restore_state
from runstate._impl.restore_result import RestoreResult
from runstate.adapters import prepare_loaders
from runstate.format.compress import Compression, resolve_compression
from runstate.storage import is_url, local_path, parent_store

__all__ = ["load", "save"]


def save(
    path: str | os.PathLike[str],
    state: Mapping[str, Any],
    *,
    step: int | None = None,
    metrics: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    compression: str | Compression | None = None,
) -> CheckpointInfo:
    """Save ``state`` as one checkpoint directory at ``path``, atomically.

    Args:
        path: the checkpoint directory to create; it must not exist yet. A relative path
            (``"ckpt"``, ``"../ckpt"``) is relative to the working directory; ``~`` is
            expanded. A URL
            (``s3://bucket/ckpt``, ``memory://ckpt``) is written with the object-store
            protocol: tensor files first, ``manifest.json`` last as the commit marker.
        state: named items: objects with ``state_dict()``/``load_state_dict()`` (modules,
            optimizers, schedulers, data loaders, ``runstate.RNG()``...), generators, tensors,
            arrays and plain Python values.
        step: the training step, recorded in the manifest.
        metrics: numbers to record with the checkpoint (e.g. ``{"loss": 0.31}``).
        storage_options: fsspec options for a URL (credentials, ``client_kwargs``...).
        compression: ``"zstd"`` (or a :class:`runstate.Compression`) to compress the tensor
            files losslessly (needs ``pip install runstate[zstd]``; docs/performance.md says
            when it pays); None (the default) writes them as they are.

    Returns:
        The :class:`CheckpointInfo` of the committed checkpoint.

    Raises:
        UnsupportedTypeError: a value cannot be stored without pickle (nothing is written).
        CheckpointConfigError: a bad ``compression`` value, or zstandard is not installed.
        StepExistsError: ``path`` already exists.
        CheckpointWriteError: the disk failed; nothing was committed.

    Example:
        >>> info = runstate.save("ckpt", {"model": model, "epoch": 3}, step=1200)  # doctest: +SKIP
    """
    location = os.fspath(path)
    packing = resolve_compression(compression)
    validate_state(state, f"save({location!r})")
    prepare_loaders(state, saving=True)
    checked_step = None if step is None else validate_step(step)
    store, name = parent_store(location, storage_options)
    group = current_group()  # every process of a torch.distributed job calls save; rank 0 commits
    captured = capture(state, metrics, group, where=store.join(name), compression=packing)
    info = save_checkpoint(store, name, captured, group=group, step=checked_step)
    # a local path is reported as given ("ckpt" stays relative, "~" expanded)
    return info if is_url(location) else dataclasses.replace(info, path=local_path(location))


@overload
def load(
    path: str | os.PathLike[str],
    state: None = None,
    *,
    strict: bool = True,
    rename: Mapping[str, Sequence[tuple[str, str]]] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    exclude: Sequence[str] | None = None,
) -> dict[str, Any]: ...


@overload
def load(
    path: str | os.PathLike[str],
    state: MutableMapping[str, Any],
    *,
    strict: bool = True,
    rename: Mapping[str, Sequence[tuple[str, str]]] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    exclude: Sequence[str] | None = None,
) -> RestoreResult: ...


def load(
    path: str | os.PathLike[str],
    state: MutableMapping[str, Any] | None = None,
    *,
    strict: bool = True,
    rename: Mapping[str, Sequence[tuple[str, str]]] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    exclude: Sequence[str] | None = None,
) -> dict[str, Any] | RestoreResult:
    r"""Load a checkpoint directory written by :func:`save` or a ``CheckpointManager``.

    Args:
        path: the checkpoint directory.
        state: the live state to restore into. Stateful objects (modules, optimizers,
            schedulers, loaders, generators) are restored in place; every other value is
            replaced in this dict by the stored one. When None, the stored tree is returned
            as plain Python, NumPy and torch values.
        strict: when True, the items and keys of ``state`` must match the checkpoint;
            when False, what matches is restored and the rest is reported in a warning.
        rename: per item, regex substitutions applied to the stored keys before matching,
            e.g. ``{"model": [(r"^module\.", "")]}`` for a checkpoint written under DDP.
        storage_options: fsspec options for a URL such as ``s3://bucket/run/step-000000000100``.
        exclude: item names or glob patterns (``["config", "log_*"]``) to leave alone: their
            live values are kept, and they are neither checked nor reported missing or
            unexpected. For run metadata such as a config that the resumed run sets itself.

    Returns:
        With ``state``: a :class:`RestoreResult`, the step restored (an int; 0 for a
        checkpoint saved without a step, then ``result.step`` is None) carrying the
        restore's ``report`` (what did not match, with ``strict=False``) and ``path``.
        Without: the stored tree, a dict.

    Raises:
        CheckpointNotFoundError: ``path`` is not a checkpoint.
        CorruptCheckpointError: a checksum, size or header does not match the manifest.
        StateMismatchError: ``strict`` and the state does not match (nothing was changed).
        FormatVersionError: the checkpoint needs a newer runstate.

    Example:
        >>> result = runstate.load("ckpt", state, strict=False)  # doctest: +SKIP
        >>> result.step, result.report.ok  # doctest: +SKIP
        (1200, True)
    """
    path = os.fspath(path)
    with CheckpointReader(path, storage_options=storage_options) as reader:
        if state is None:
            return {name: plain(reader.load_item(name)) for name in reader.manifest.items}
        validate_state(state, f"load({path!r})")
        prepare_loaders(state, saving=False)
        report = restore_state(reader, state, strict=strict, rename=rename, group=current_group(), exclude=exclude)
        return RestoreResult(reader.manifest.step, report, reader.path)
