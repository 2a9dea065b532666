"""``runstate.save`` and ``runstate.load``: one checkpoint directory, no manager."""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from runstate._impl.checkpoint import (
    CheckpointInfo,
    prepare,
    validate_state,
    validate_step,
    write_checkpoint,
)
from runstate._impl.group import current_group
from runstate._impl.parallel import save_together
from runstate._impl.reader import CheckpointReader
from runstate._impl.restore import plain, restore_state
from runstate.adapters import prepare_loaders
from runstate.errors import CheckpointWriteError
from runstate.storage import is_url, local_path, open_store
from runstate.storage.local import commit_directory

__all__ = ["load", "save"]


def save(
    path: str | os.PathLike[str],
    state: Mapping[str, Any],
    *,
    step: int | None = None,
    metrics: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
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

    Returns:
        The :class:`CheckpointInfo` of the committed checkpoint.

    Raises:
        UnsupportedTypeError: a value cannot be stored without pickle (nothing is written).
        StepExistsError: ``path`` already exists.
        CheckpointWriteError: the disk failed; nothing was committed.

    Example:
        >>> info = runstate.save("ckpt", {"model": model, "epoch": 3}, step=1200)  # doctest: +SKIP
    """
    path = os.fspath(path)
    validate_state(state, f"save({path!r})")
    prepare_loaders(state, saving=True)
    checked_step = None if step is None else validate_step(step)
    group = current_group()
    if is_url(path):
        parent_url, _, name = path.rstrip("/").rpartition("/")
        store = open_store(parent_url, storage_options=storage_options)
        if group.distributed:  # every process calls save; rank 0 commits
            save_together(group, store, name, state, step=checked_step, metrics=metrics)
            with CheckpointReader(store.child(name)) as reader:
                return reader.info()
        prepared = prepare(state, metrics)
        with store.begin(name) as staging:
            return write_checkpoint(staging, prepared, step=checked_step)
    open_store(path, storage_options=storage_options)  # refuses options with a plain path
    path = local_path(path)  # "~/ckpt" expanded; "ckpt", "./ckpt", "../ckpt" are relative to the cwd
    parent, name = os.path.split(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise CheckpointWriteError(20, f"cannot save to {path}: {parent} is a file, not a directory")
    if group.distributed:
        store = open_store(parent)
        save_together(group, store, name, state, step=checked_step, metrics=metrics)
        with CheckpointReader(path) as reader:
            return reader.info()
    prepared = prepare(state, metrics)
    with commit_directory(path) as tmp:
        info = write_checkpoint(tmp, prepared, step=checked_step)
    return CheckpointInfo(info.step, path, info.created, info.metrics, info.nbytes)


def load(
    path: str | os.PathLike[str],
    state: MutableMapping[str, Any] | None = None,
    *,
    strict: bool = True,
    rename: Mapping[str, Sequence[tuple[str, str]]] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    exclude: Sequence[str] | None = None,
) -> dict[str, Any]:
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
        ``state`` itself after restoring, or the stored tree when ``state`` is None.

    Raises:
        CheckpointNotFoundError: ``path`` is not a checkpoint.
        CorruptCheckpointError: a checksum, size or header does not match the manifest.
        StateMismatchError: ``strict`` and the state does not match (nothing was changed).
        FormatVersionError: the checkpoint needs a newer runstate.
    """
    path = os.fspath(path)
    with CheckpointReader(path, storage_options=storage_options) as reader:
        if state is None:
            return {name: plain(reader.load_item(name)) for name in reader.manifest.items}
        validate_state(state, f"load({path!r})")
        prepare_loaders(state, saving=False)
        restore_state(reader, state, strict=strict, rename=rename, group=current_group(), exclude=exclude)
        return dict(state) if not isinstance(state, dict) else state
