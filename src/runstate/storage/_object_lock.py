"""The writer lock of a run on an object store: an advisory ``.lock`` object naming its owner.

Object stores cannot lock (no ``flock``, no atomic create-if-absent everywhere), so this
lock only catches mistakes; see :class:`ObjectLock`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from runstate.errors import LockError
from runstate.storage._fs import object_write_error
from runstate.storage.base import LOCK_NAME

if TYPE_CHECKING:
    from runstate.storage.fsspec_store import FsspecStore

__all__ = ["DEFAULT_LOCK_TIMEOUT", "ObjectLock"]

logger = logging.getLogger("runstate")

#: A lock object older than this whose owner cannot be checked is taken over (with a warning).
DEFAULT_LOCK_TIMEOUT = 3600.0


class ObjectLock:
    """An advisory writer lock: a ``.lock`` object holding its owner's pid, host, time and a token.

    Object stores cannot lock, so this only catches mistakes: ``acquire`` raises ``LockError``
    when the object names another owner that may still be alive, i.e. another process on
    this host whose pid is alive, or any owner on another host whose lock is younger than
    ``timeout`` seconds (refreshed at every save). A lock whose owner is known dead (same
    host, pid gone) or older than ``timeout`` is taken over with a warning. Two writers
    starting at the same instant can both succeed: one writer per run is the user's job.

    A damaged lock object (not JSON, or a field missing or of the wrong type or range: a
    truncated upload, a hand edit) names no owner that could be alive, so it is taken over
    with a warning too, never reported as a raw ``ValueError``/``TypeError``.
    """

    def __init__(self, store: FsspecStore, timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self._store = store
        self._path = store.path(LOCK_NAME)
        self._token = uuid.uuid4().hex
        self._held = False
        self.timeout = timeout

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._held

    def _read(self) -> dict[str, Any] | None:
        try:
            raw = self._store.fs.cat_file(self._path)
        except FileNotFoundError:
            return None
        try:
            owner = json.loads(raw)
        except (ValueError, RecursionError):  # also invalid UTF-8, or nesting too deep to decode
            return {}
        return owner if isinstance(owner, dict) else {}

    @staticmethod
    def _damage(owner: Mapping[str, Any]) -> str | None:
        """What is wrong with a lock object's content, or None when it is well formed."""
        if not owner:
            return "not a JSON object"
        pid, host, when, token = (owner.get(k) for k in ("pid", "host", "time", "token"))
        if type(pid) is not int or not 0 < pid < 2**31:
            return f"pid {pid!r:.40} is not a process id"
        if not isinstance(host, str) or not isinstance(token, str):
            return "host or token is not a string"
        if isinstance(when, bool) or not isinstance(when, (int, float)) or not 0 <= when < 1e11:  # NaN fails too
            return f"time {when!r:.40} is not a timestamp"
        return None

    def _alive(self, owner: Mapping[str, Any]) -> bool:
        age = time.time() - float(owner["time"])
        if owner["host"] == socket.gethostname():
            try:
                os.kill(owner["pid"], 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        return age < self.timeout

    def acquire(self) -> None:
        """Take (or refresh) the lock; raise ``LockError`` if another owner may be alive."""
        self._store.fs.invalidate_cache(self._path)
        owner = self._read()
        damage = None if owner is None else self._damage(owner)
        if owner is not None and damage is not None:
            logger.warning(
                "taking over the damaged lock object %s (%s); it names no writer that could be alive",
                self._store.join(LOCK_NAME),
                damage,
            )
        elif owner is not None and owner["token"] != self._token:
            who = f"pid {owner['pid']} on {owner['host']}, written {time.ctime(float(owner['time']))}"
            if self._alive(owner):
                raise LockError(
                    errno.EWOULDBLOCK,
                    f"{self._store.location} is being written by another CheckpointManager ({who}); only one "
                    f"writer per run is allowed: stop the other one, use another location, or, if it is dead, "
                    f"delete {self._store.join(LOCK_NAME)}",
                )
            logger.warning("taking over the lock of %s from a writer that is gone (%s)", self._store.location, who)
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), "token": self._token}
        try:
            self._store.make_dirs()
            self._store.fs.pipe_file(self._path, json.dumps(mine).encode())
        except Exception as exc:
            raise object_write_error(exc, "cannot write lock object", self._store.join(LOCK_NAME)) from exc
        self._held = True

    def release(self) -> None:
        """Delete the lock object if it is still ours (idempotent)."""
        if not self._held:
            return
        self._held = False
        with contextlib.suppress(Exception):
            self._store.fs.invalidate_cache(self._path)
            owner = self._read()
            if owner is not None and owner.get("token") == self._token:
                self._store.fs.rm_file(self._path)
