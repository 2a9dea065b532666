"""Where checkpoint bytes go: a local directory, or any fsspec URL (S3, GCS, memory...).

:func:`open_store` picks the backend: a plain path gets :class:`LocalStore` (atomic rename,
fsync, ``flock``); a URL (``s3://``, ``memory://``, ``file://``...) gets
:class:`~runstate.storage.fsspec_store.FsspecStore`, imported only then, so fsspec is never
imported unless a URL is used.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from runstate.errors import CheckpointError
from runstate.storage.base import Lock, Staging, Store, step_dirname
from runstate.storage.local import (
    LocalStore,
    RunLock,
    commit_directory,
    fsync_dir,
    list_committed,
    local_path,
    remove_leftovers,
)

__all__ = [
    "LocalStore",
    "Lock",
    "RunLock",
    "Staging",
    "Store",
    "commit_directory",
    "fsync_dir",
    "is_url",
    "list_committed",
    "local_path",
    "open_store",
    "remove_leftovers",
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
        CheckpointError: ``storage_options`` given with a plain path, an empty path, or fsspec missing.
    """
    if isinstance(location, Store):
        return location
    if not os.fspath(location):  # "" would write into the working directory but list nothing there
        raise CheckpointError("the path is empty; give a directory such as 'runs/exp' ('.' for the working directory)")
    if is_url(location):
        from runstate.storage.fsspec_store import FsspecStore

        return FsspecStore(str(location), storage_options=storage_options)
    if storage_options:
        raise CheckpointError(
            f"storage_options only apply to URLs such as s3://bucket/run, not to the local path {os.fspath(location)!r}"
        )
    return LocalStore(location)  # ~ expanded; relative paths work from the working directory
