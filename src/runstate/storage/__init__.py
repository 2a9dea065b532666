"""Where checkpoint bytes go: a local directory, or any fsspec URL (S3, GCS, memory...).

Only this package touches storage: the rest of runstate asks a :class:`Store`.
:func:`open_store` picks the backend: a plain path gets :class:`LocalStore` (atomic rename,
fsync, ``flock``); a URL (``s3://``, ``memory://``, ``file://``...) gets
:class:`~runstate.storage.fsspec_store.FsspecStore`, imported only then, so fsspec is never
imported unless a URL is used. :func:`parent_store` gives the store in which a standalone
checkpoint is created, :func:`atomic_file` writes one file (an export) atomically, and
:func:`replace_directory` / :func:`remove_entry` replace or remove a directory under a fixed name
(Lightning's ``last.ckpt``) without a moment in which a kill loses it.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping
from typing import Any

from runstate.errors import CheckpointConfigError, CheckpointWriteError
from runstate.storage._fs import atomic_file, fsync_dir, makedirs_durable
from runstate.storage._rundir import list_committed, remove_leftovers
from runstate.storage._swap import remove_entry, remove_leftovers_beside, replace_directory
from runstate.storage.base import (
    ABANDONED,
    BLOBS_DIR,
    DAMAGED,
    INTERRUPTED_DELETION,
    INTERRUPTED_SAVE,
    LOCK_NAME,
    MISNAMED,
    AttachedStaging,
    BegunStaging,
    EntryKind,
    Extra,
    Lock,
    Staging,
    Store,
    step_dirname,
)
from runstate.storage.local import LocalStore, RunLock, commit_directory, local_path

__all__ = [
    "ABANDONED",
    "BLOBS_DIR",
    "DAMAGED",
    "INTERRUPTED_DELETION",
    "INTERRUPTED_SAVE",
    "LOCK_NAME",
    "MISNAMED",
    "AttachedStaging",
    "BegunStaging",
    "EntryKind",
    "Extra",
    "LocalStore",
    "Lock",
    "RunLock",
    "Staging",
    "Store",
    "absolute_path",
    "atomic_file",
    "commit_directory",
    "fsync_dir",
    "is_url",
    "list_committed",
    "local_path",
    "makedirs_durable",
    "open_store",
    "parent_store",
    "remove_entry",
    "remove_leftovers",
    "remove_leftovers_beside",
    "replace_directory",
    "split_path",
    "step_dirname",
]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(location: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` locations (handled by fsspec), False for plain paths."""
    return isinstance(location, str) and bool(_URL.match(location))


def open_store(
    location: str | os.PathLike[str] | Store, *, storage_options: Mapping[str, Any] | None = None
) -> Store:
    """The :class:`Store` rooted at ``location``.

    Args:
        location: a local path (today's POSIX backend), a URL for fsspec such as
            ``s3://bucket/run``, ``memory://run`` or ``file:///abs/run`` (``file://`` uses
            the object-store protocol through fsspec, not the local backend), or a Store.
        storage_options: options for fsspec (credentials, ``client_kwargs``...); URLs only.

    Raises:
        CheckpointConfigError: ``storage_options`` given with a plain path, or an empty path.
        CheckpointError: fsspec (or the URL's backend, e.g. s3fs) is missing.
    """
    if isinstance(location, Store):
        return location
    if not os.fspath(location):  # "" would write into the working directory but list nothing there
        raise CheckpointConfigError("the path is empty; give a directory such as 'runs/exp' ('.' for the working directory)")
    if is_url(location):
        from runstate.storage.fsspec_store import FsspecStore

        return FsspecStore(str(location), storage_options=storage_options)
    if storage_options:
        raise CheckpointConfigError(
            f"storage_options only apply to URLs such as s3://bucket/run, not to the local path {os.fspath(location)!r}"
        )
    return LocalStore(location)  # ~ expanded; relative paths work from the working directory


def absolute_path(location: str | os.PathLike[str]) -> str:
    """A local path made absolute: ``~`` expanded, relative to the working directory, normalized.

    Example:
        >>> absolute_path("/runs/exp/../ckpt/")
        '/runs/ckpt'
    """
    return os.path.abspath(local_path(location))


def split_path(path: str | os.PathLike[str]) -> tuple[str, str]:
    """A local path's parent directory (``"."`` for a bare name) and last name, ``~`` expanded and normalized.

    Example:
        >>> split_path("runs/exp/step-1200/")
        ('runs/exp', 'step-1200')
    """
    parent, name = os.path.split(os.path.normpath(local_path(path)))
    return parent or ".", name


def parent_store(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[Store, str]:
    """The store in which the standalone checkpoint ``path`` is created, and its name there.

    ``store.begin(name)`` then writes the checkpoint and ``store.join(name)`` is its location.

    Args:
        path: a URL (``s3://bucket/ckpt``: the store of ``s3://bucket``) or a local path
            (``~`` expanded; a relative path is relative to the working directory, so
            ``"ckpt"`` is ``"./ckpt"``; the store is rooted at the absolute parent).
        storage_options: fsspec options; URLs only.

    Raises:
        CheckpointConfigError: an empty path, or ``storage_options`` with a local path.
        CheckpointWriteError: ``errno.ENOTDIR``, the parent of a local path is a file.

    Example:
        >>> store, name = parent_store("~/ckpt")  # doctest: +SKIP
        >>> store.join(name)  # doctest: +SKIP
        '/home/me/ckpt'
    """
    if is_url(path):
        url = str(path).rstrip("/")
        parent, _, name = url.rpartition("/")
        if "/" not in url.partition("://")[2]:  # memory://ckpt: no location holds it (it is not "memory:/")
            raise CheckpointConfigError(f"{path}: name the checkpoint inside a location, e.g. {url}/ckpt")
        return open_store(parent, storage_options=storage_options), name
    open_store(path, storage_options=storage_options)  # refuses an empty path, or options with a plain path
    full = os.path.abspath(local_path(path))
    parent, name = os.path.split(full)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise CheckpointWriteError(
            errno.ENOTDIR, f"cannot save to {local_path(path)}: {parent} is a file, not a directory"
        )
    return LocalStore(parent), name
