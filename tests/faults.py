"""A fault-injecting shim for the OS calls a checkpoint writer makes.

``inject(at=N, error=errno.ENOSPC)`` patches, for the calling thread (and runstate's retention
thread, which deletes old checkpoints after a save: call ``mgr.wait()`` inside), every call that
writes or persists something: ``open`` for writing and the ``write``/``flush``/``close`` of
the file it returns, ``os.open``, ``os.close``, ``os.fsync``, ``os.mkdir``, ``os.rename``,
``os.replace``, ``os.unlink``, ``os.rmdir``, ``os.ftruncate`` and ``os.pwrite``. The calls are
numbered from 0 in the order they happen; call number ``at`` fails with ``OSError(error)``,
as a full or failing disk would. With ``short_write=True`` a failing ``write`` first writes
half of its bytes and returns that count, and the *next* write fails: what ``write(2)`` does
when the disk fills up in the middle of a buffer.

With ``at=None`` nothing fails and :attr:`Faults.calls` lists every call of a clean run, so a
test can fail each position in turn.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Faults", "inject"]

_OS_CALLS = ("open", "close", "fsync", "mkdir", "rename", "replace", "unlink", "rmdir", "ftruncate", "pwrite")


@dataclass
class Faults:
    """The plan and the log of one injection.

    Attributes:
        at: the number of the call that fails (None: none fails).
        error: the errno it fails with.
        short_write: a failing write first writes half of its bytes.
        calls: ``"name(arg)"`` of every call seen, in order.
        fired: the description of the call that failed, once it has.
    """

    at: int | None
    error: int = errno.ENOSPC
    short_write: bool = False
    calls: list[str] = field(default_factory=list)
    fired: str | None = None
    _pending_short: bool = False

    def check(self, name: str, arg: Any, *, short_ok: bool = False) -> bool:
        """Count one call; raise when it is the one to fail. True means "write half, then fail next"."""
        what = f"{name}({arg!r})"
        number = len(self.calls)
        self.calls.append(what)
        if self._pending_short and name == "write":
            self._pending_short = False
            self._raise(what)
        if number != self.at:
            return False
        if self.short_write and name == "write" and short_ok:
            self._pending_short = True
            self.fired = what
            return True
        self._raise(what)
        return False  # pragma: no cover

    def _raise(self, what: str) -> None:
        self.fired = what
        raise OSError(self.error, os.strerror(self.error))


class _File:
    """Wraps a file opened for writing, so that its writes go through :meth:`Faults.check`."""

    def __init__(self, f: Any, path: Any, faults: Faults, active: Callable[[], bool]) -> None:
        self._f, self._path, self._faults, self._active = f, os.fspath(path), faults, active

    def write(self, data: Any) -> int:
        # Only an unbuffered file can return a short count; a buffered one loops internally.
        raw = isinstance(self._f, io.FileIO)
        if self._active() and self._faults.check("write", self._path, short_ok=raw):
            flat = memoryview(data).cast("B")
            written: int = self._f.write(flat[: len(flat) // 2])
            return written
        n: int = self._f.write(data)
        return n

    def flush(self) -> None:
        if self._active():
            self._faults.check("flush", self._path)
        self._f.flush()

    def close(self) -> None:
        try:
            if self._active():
                self._faults.check("file.close", self._path)
        finally:
            self._f.close()

    def __enter__(self) -> _File:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


@contextlib.contextmanager
def inject(at: int | None, error: int = errno.ENOSPC, *, short_write: bool = False) -> Iterator[Faults]:
    """Patch the OS calls of the current thread; see the module docstring."""
    faults = Faults(at, error, short_write)
    owner = threading.get_ident()

    def active() -> bool:  # the calling thread, and runstate's retention thread (the save's upkeep)
        return threading.get_ident() == owner or threading.current_thread().name.startswith("runstate-retention")

    def wrap_os(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if active():
                faults.check(f"os.{name}", args[0] if args else None)
            return real(*args, **kwargs)

        return wrapper

    real_open = builtins.open

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, mode, *args, **kwargs)
        if not active() or not any(c in mode for c in "wxa+"):
            return f
        try:
            faults.check("open", os.fspath(file))
        except OSError:
            f.close()
            if "x" in mode:
                saved["unlink"](file)  # a real open that fails creates nothing
            raise
        return _File(f, file, faults, active)

    saved = {name: getattr(os, name) for name in _OS_CALLS}
    try:
        for name, real in saved.items():
            setattr(os, name, wrap_os(name, real))
        builtins.open = fake_open
        yield faults
    finally:
        builtins.open = real_open
        for name, real in saved.items():
            setattr(os, name, real)
