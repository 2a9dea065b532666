"""Replace or remove a directory under a fixed name without a moment in which a kill loses it.

Why this exists: a name that is overwritten at every save (Lightning's ``last.ckpt``) must
hold a complete directory at every instant, including when the process is SIGKILLed in the
middle of a save. :func:`replace_directory` writes the new directory under a hidden name next
to the target and then swaps the two names in one atomic step (``renameat2`` with
``RENAME_EXCHANGE`` on Linux; elsewhere two renames, with the name missing only between
them), fsyncs the parent so the swap survives a power loss, and only then removes the
previous directory. :func:`remove_entry` renames a directory to a hidden name before
deleting it, so it disappears in one step. What a killed process left under a hidden name
is found and removed by :func:`remove_leftovers_beside`.

The hidden names are ``.<name>.runstate-new-<12 hex>`` (a replacement being written, or
after the swap the previous directory being removed) and ``.<name>.runstate-old-<12 hex>``
(the previous directory, on the way out). Only this module builds or recognises them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from typing import Any

from runstate.storage._fs import fsync_dir, makedirs_durable

__all__ = ["remove_entry", "remove_leftovers_beside", "replace_directory"]

_TAG = ".runstate-"  # hidden names next to a target: f".{name}{_TAG}{new|old}-{hex}"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def replace_directory(target: str, write: Callable[[str], None]) -> None:
    """Write a directory at ``target`` with ``write``, atomically replacing what is there.

    When nothing is at ``target``, ``write(target)`` creates it (``write`` must itself make
    the directory appear only when complete, as ``runstate.save`` does). Otherwise
    ``write`` gets a hidden path next to ``target``; once it returns, the two names are
    swapped atomically, the parent directory is fsynced, and the previous directory is
    removed. At every instant ``target`` holds the previous complete directory or the new
    one (with the two-rename fallback, used where ``RENAME_EXCHANGE`` is missing, the name
    is briefly absent between the renames). A process killed midway leaves at most a hidden
    entry, removed by :func:`remove_leftovers_beside`.

    Args:
        target: the absolute path of the directory; its parent is created if missing.
        write: writes a complete directory at the path it is given.

    Raises:
        OSError: the parent cannot be created, or a rename fails; ``target`` is intact.
        Exception: whatever ``write`` raises; ``target`` is left as it was.

    Example:
        >>> replace_directory("/ckpt/last.ckpt", lambda path: runstate.save(path, state))  # doctest: +SKIP
    """
    parent, name = os.path.split(target)
    makedirs_durable(parent)
    if not os.path.lexists(target):
        write(target)
        return
    tag = uuid.uuid4().hex[:12]
    staged = os.path.join(parent, f".{name}{_TAG}new-{tag}")
    write(staged)
    if _exchange(staged, target):
        previous = staged  # the exchange put the previous directory there
    else:
        # No atomic exchange on this system (not Linux, or a filesystem without it): the
        # name is missing between these two renames, the one window left.
        previous = os.path.join(parent, f".{name}{_TAG}old-{tag}")
        os.rename(target, previous)
        os.rename(staged, target)
    fsync_dir(parent)
    _discard(previous)


def remove_entry(target: str) -> None:
    """Remove what is at ``target``: a file or symlink is unlinked, a directory vanishes in one step.

    A directory is first renamed to a hidden name (and the parent fsynced), so a kill
    during the removal never leaves a half-deleted directory under its name; a symlink is
    removed itself, never what it points to. Nothing at ``target`` is fine.

    Args:
        target: the absolute path to remove.

    Raises:
        OSError: the entry cannot be removed or renamed.
    """
    if os.path.islink(target) or os.path.isfile(target):
        os.remove(target)
    elif os.path.isdir(target):
        parent, name = os.path.split(target)
        doomed = os.path.join(parent, f".{name}{_TAG}old-{uuid.uuid4().hex[:12]}")
        os.rename(target, doomed)
        fsync_dir(parent)
        _discard(doomed)


def remove_leftovers_beside(target: str) -> list[str]:
    """Remove what an interrupted :func:`replace_directory` or :func:`remove_entry` of ``target`` left.

    Only the hidden entries of ``target`` itself are touched (``.<name>.runstate-...``),
    never another name's. Call it before the next replacement, not while another process
    replaces the same ``target``. A process killed between the two renames of the fallback
    swap left no ``target`` but both complete directories (``-old-T`` and ``-new-T``): the new
    one is put back under ``target`` first, so the checkpoint is never lost.

    Args:
        target: the absolute path whose leftovers to remove.

    Returns:
        The paths removed (none when the parent cannot be listed).
    """
    parent, name = os.path.split(target)
    prefix = f".{name}{_TAG}"
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    if not os.path.lexists(target):
        for entry in sorted(entries):
            tag = entry.removeprefix(f"{prefix}new-")
            if entry.startswith(f"{prefix}new-") and f"{prefix}old-{tag}" in entries:
                os.rename(os.path.join(parent, entry), target)  # complete: written before the renames
                fsync_dir(parent)
                entries.remove(entry)
                break
    removed = []
    for entry in entries:
        if entry.startswith(prefix):
            path = os.path.join(parent, entry)
            _discard(path)
            removed.append(path)
    return removed


def _discard(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@functools.cache
def _renameat2() -> Any:
    """libc's ``renameat2``, or None where it is missing (not Linux, or glibc < 2.28)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # a libc without the wrapper
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: str, b: str) -> bool:
    """Swap the names ``a`` and ``b`` atomically; False when this system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # not supported by the kernel or filesystem
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")
