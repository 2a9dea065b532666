"""Checkpoints on any fsspec filesystem: S3 (``s3://``), ``memory://``, ``file://``, GCS...

Object stores have no atomic rename, so the commit marker is an object, not a name: a
checkpoint is written in place under its final prefix ``<run>/step-000000000100/``, every
tensor file first and ``manifest.json`` (which holds every file's size and every tensor's
checksum) **last**. Invariant: a step prefix is a committed checkpoint exactly when its
``manifest.json`` exists. A prefix without one is the leftover of an interrupted save;
readers ignore it and the next writer deletes it (also before saving that same step again).
Deleting a checkpoint removes ``manifest.json`` first, so it is invisible at once, then the
rest. S3 has been strongly consistent for read-after-write and listing since December 2020,
so a reader lists exactly what was committed.

There is no ``flock`` on an object store: the writer lock is an advisory ``.lock`` object
naming its owner (see :class:`ObjectLock`). One writer per run is the user's job.

Large files are uploaded in parts (s3fs starts a multipart upload once a file exceeds
the block size); several files are written at once (:attr:`FsspecStaging.parallel_writes`)
and a large read is split into ranges fetched concurrently by a bounded thread pool.

fsspec is imported only when a URL is opened; it is an optional dependency
(``pip install 'runstate[s3]'``).
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

from runstate.errors import CheckpointError, CheckpointWriteError, CorruptCheckpointError, StepExistsError
from runstate.format.manifest import MANIFEST_NAME
from runstate.storage._fs import object_write_error
from runstate.storage._object_lock import ObjectLock
from runstate.storage.base import BLOBS_DIR, STEP_RE, AttachedStaging, BegunStaging, EntryKind, Store, step_dirname

__all__ = ["DEFAULT_BLOCK_SIZE", "FsspecAttachedStaging", "FsspecStaging", "FsspecStore", "ObjectLock"]

logger = logging.getLogger("runstate")

#: Upload part / read block size: 32 MiB (S3 allows 10,000 parts, so files up to 312 GiB).
DEFAULT_BLOCK_SIZE = 32 * 1024 * 1024
#: At most this many files written, or byte ranges read, at the same time.
DEFAULT_MAX_WORKERS = 8
#: A read at least this large is split into ranges fetched concurrently.
_PARALLEL_READ = 8 * 1024 * 1024
#: Small reads fetch this much ahead (one request reads a safetensors header and small tensors).
_READ_AHEAD = 1024 * 1024


def _fsspec() -> Any:
    try:
        import fsspec
    except ImportError as exc:
        raise CheckpointError(
            "URLs such as s3://bucket/run need fsspec (and s3fs for s3://): pip install 'runstate[s3]'"
        ) from exc
    return fsspec




class _RangeFile(io.RawIOBase):
    """A read-only object whose reads are HTTP range requests; large reads go in parallel."""

    def __init__(self, fs: Any, path: str, size: int, max_workers: int, block_size: int) -> None:
        super().__init__()
        self._fs, self._path, self._size = fs, path, size
        self._pos = 0
        self._workers, self._block = max_workers, block_size
        self._cache_start, self._cache = 0, b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _fetch(self, start: int, end: int) -> bytes:
        data: bytes = self._fs.cat_file(self._path, start=start, end=end)
        if len(data) != end - start:  # the object changed or is being deleted
            raise CorruptCheckpointError(
                f"{self._path}: read {len(data)} bytes at offset {start}, expected {end - start}; "
                "the object changed while it was read"
            )
        return data

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        n = min(len(out), self._size - self._pos)
        if n <= 0:
            return 0
        start = self._pos
        cached = self._cache_start <= start and start + n <= self._cache_start + len(self._cache)
        if cached:
            offset = start - self._cache_start
            out[:n] = self._cache[offset : offset + n]
        elif n < _PARALLEL_READ:
            end = min(self._size, start + max(n, _READ_AHEAD))
            self._cache_start, self._cache = start, self._fetch(start, end)
            out[:n] = self._cache[:n]
        else:
            part = max(_PARALLEL_READ // 2, min(self._block, -(-n // self._workers)))
            ranges = [(s, min(n, s + part)) for s in range(0, n, part)]

            def fetch(r: tuple[int, int]) -> None:
                out[r[0] : r[1]] = self._fetch(start + r[0], start + r[1])

            with ThreadPoolExecutor(max_workers=min(self._workers, len(ranges))) as pool:
                list(pool.map(fetch, ranges))
        self._pos += n
        return n


class _FsspecFiles:
    """What both kinds of fsspec staging share: new objects under the checkpoint's final prefix."""

    location: str
    final: str
    parallel_writes: int

    def __init__(self, store: FsspecStore, name: str) -> None:
        self._store = store
        self._name = name
        self.location = store.join(name)
        self.final = self.location
        self.parallel_writes = store.max_workers
        self._written: list[str] = []

    @contextlib.contextmanager
    def open_write(self, name: str) -> Iterator[IO[bytes]]:
        """A new object, uploaded in parts of the block size; complete when the block exits."""
        if not name or "/" in name or name in (".", "..") or name == MANIFEST_NAME:
            raise ValueError(f"{name!r} is not a plain file name (manifest.json is written by commit)")
        path = self._store.path(f"{self._name}/{name}")
        f = self._store.fs.open(path, "wb", block_size=self._store.block_size)
        self._written.append(path)
        try:
            yield f
        except BaseException:
            with contextlib.suppress(Exception):  # aborts a multipart upload: no orphan parts
                f.discard()
            with contextlib.suppress(Exception):
                f.close()
            raise
        f.close()

    def reader(self) -> FsspecStore:
        """The store of the prefix being written."""
        return self._store.child(self._name)


class FsspecStaging(_FsspecFiles, BegunStaging):
    """A checkpoint being written in place under its final prefix; ``manifest.json`` commits it."""

    def commit(self, manifest: bytes) -> str:
        """Upload ``manifest.json``: one PUT, atomic; the checkpoint is visible from then on."""
        path = self._store.path(f"{self._name}/{MANIFEST_NAME}")
        try:
            self._store.fs.pipe_file(path, manifest)
        except BaseException as exc:
            self.abort()
            if isinstance(exc, CheckpointError):
                raise
            if isinstance(exc, Exception):
                raise object_write_error(exc, "cannot write", path) from exc
            raise
        self.committed = True
        return self.final

    def abort(self) -> None:
        """Delete the whole prefix, also the files attached processes wrote."""
        if self.committed:
            return
        with contextlib.suppress(Exception):
            self._store.delete(self._name)


class FsspecAttachedStaging(_FsspecFiles, AttachedStaging):
    """Files written under the prefix of a checkpoint another process began."""

    def abort(self) -> None:
        """Delete the files this staging wrote (the prefix is the owner's)."""
        for path in self._written:
            with contextlib.suppress(Exception):
                self._store.fs.rm_file(path)


class FsspecStore(Store):
    """A run directory (or one checkpoint) at an fsspec URL.

    Args:
        location: a URL such as ``s3://bucket/runs/exp`` or ``memory://exp``.
        storage_options: passed to fsspec (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``
            for s3fs). ``default_block_size`` also sets the upload part size.
        max_workers: files written, or ranges read, at the same time.
    """

    def __init__(
        self,
        location: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        max_workers: int = DEFAULT_MAX_WORKERS,
        _fs: Any = None,
        _root: str | None = None,
    ) -> None:
        self.location = location.rstrip("/")
        options = dict(storage_options or {})
        if _fs is None:
            try:
                _fs, _root = _fsspec().core.url_to_fs(location, **options)
            except ImportError as exc:  # s3fs missing for s3://
                raise CheckpointError(f"{location}: {exc}; pip install 'runstate[s3]'") from exc
        self.fs = _fs
        self.root = str(_root).rstrip("/")
        self.storage_options = options
        self.block_size = int(options.get("default_block_size") or DEFAULT_BLOCK_SIZE)
        self.max_workers = max(1, max_workers)

    def __repr__(self) -> str:
        return f"FsspecStore({self.location!r})"

    def path(self, name: str) -> str:
        """The filesystem path (protocol stripped) of ``name``."""
        return f"{self.root}/{name}" if name else self.root

    def join(self, name: str) -> str:
        """The URL of ``name``."""
        return f"{self.location}/{name}" if name else self.location

    def child(self, name: str) -> FsspecStore:
        """The store of a prefix, sharing this one's filesystem object."""
        return FsspecStore(
            self.join(name),
            storage_options=self.storage_options,
            max_workers=self.max_workers,
            _fs=self.fs,
            _root=self.path(name),
        )

    @property
    def is_local(self) -> bool:
        """Always False, also for ``file://``: it follows the object-store protocol."""
        return False

    # -- reading -------------------------------------------------------------------------------
    def open_read(self, name: str) -> tuple[IO[bytes], int]:
        """A seekable reader whose reads are range requests; large reads are fetched in parallel."""
        path = self.path(name)
        info = self.fs.info(path)  # FileNotFoundError when missing
        if info.get("type") != "file":
            raise CorruptCheckpointError(f"{self.join(name)}: not a file", file=name)
        size = int(info["size"])
        reader: IO[bytes] = _RangeFile(self.fs, path, size, self.max_workers, self.block_size)  # type: ignore[assignment]
        return reader, size

    def exists(self, name: str = "") -> bool:
        """True when the object or a prefix ``name`` exists."""
        self.fs.invalidate_cache(self.path(name))
        return bool(self.fs.exists(self.path(name)))

    def kind(self, name: str = "") -> EntryKind | None:
        """An object is a ``"file"``, a prefix holding objects a ``"directory"``; None when neither."""
        path = self.path(name)
        self.fs.invalidate_cache(path)
        try:
            found = self.fs.info(path).get("type")
        except FileNotFoundError:
            return None
        return "directory" if found == "directory" else "file" if found == "file" else "other"

    def size(self, name: str = "") -> int:
        """Bytes of the objects under ``name`` (``fs.du``), 0 when there are none."""
        path = self.path(name)
        self.fs.invalidate_cache(path)
        try:
            return int(self.fs.du(path, total=True))
        except FileNotFoundError:
            return 0

    def _steps(self) -> dict[str, bool]:
        """Every ``step-N`` name under the root, and whether it holds a ``manifest.json``.

        One delimited listing of the root, then one existence check per step (in parallel):
        the cost grows with the number of steps, not with the number of objects (a step
        written by 1,000 processes holds thousands of them).
        """
        self.fs.invalidate_cache(self.root)
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return {}
        names = {str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries}
        steps = sorted(n for n in names if STEP_RE.match(n))

        def has_manifest(name: str) -> bool:
            self.fs.invalidate_cache(self.path(name))
            return bool(self.fs.exists(self.path(f"{name}/{MANIFEST_NAME}")))

        if len(steps) <= 1:
            return {name: has_manifest(name) for name in steps}
        with ThreadPoolExecutor(max_workers=min(16, len(steps)), thread_name_prefix="runstate-list") as pool:
            return dict(zip(steps, pool.map(has_manifest, steps), strict=True))

    def list_committed(self) -> dict[int, str]:
        """``step-N`` prefixes holding a ``manifest.json``."""
        out: dict[int, str] = {}
        for name, committed in self._steps().items():
            m = STEP_RE.match(name)
            if m and committed:
                out[int(m.group(1))] = self.join(name)
        return dict(sorted(out.items()))

    def list_leftovers(self) -> list[str]:
        """``step-N`` prefixes without ``manifest.json``: interrupted saves or deletions."""
        return sorted(self.join(name) for name, committed in self._steps().items() if not committed)

    # -- writing -------------------------------------------------------------------------------
    def begin(self, name: str | int) -> FsspecStaging:
        """Start a checkpoint under its final prefix, first deleting any leftover there."""
        name = step_dirname(name) if isinstance(name, int) else name
        if self.exists(f"{name}/{MANIFEST_NAME}"):
            raise StepExistsError(f"{self.join(name)} already exists; choose another step or path, or delete it first")
        try:
            if self.exists(name):
                logger.info("removing leftover of an interrupted save: %s", self.join(name))
                self.fs.rm(self.path(name), recursive=True)
            self.make_dirs(name)
        except (OSError, ValueError) as exc:
            raise object_write_error(exc, "cannot prepare", self.join(name)) from exc
        return FsspecStaging(self, name)

    def make_dirs(self, name: str = "") -> None:
        """Create ``name`` as a directory where directories are real (``file://``); no-op on object stores."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        if "file" in protocols or "local" in protocols:
            self.fs.makedirs(self.path(name), exist_ok=True)

    def attach(self, location: str) -> FsspecAttachedStaging:
        """Write into the prefix ``location`` that :meth:`begin` started (possibly in another process)."""
        if not location.startswith(self.location + "/"):
            raise CheckpointWriteError(
                errno.EINVAL, f"cannot attach to {location}: it is not inside {self.location}; pass a Staging.location"
            )
        return FsspecAttachedStaging(self, location[len(self.location) + 1 :])

    def delete(self, name: str) -> None:
        """Remove ``manifest.json`` first (invisible at once), then every other object."""
        try:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path(f"{name}/{MANIFEST_NAME}"))
        except Exception as exc:
            raise object_write_error(exc, "cannot delete", self.join(name), "it is still there") from exc
        try:
            self.fs.invalidate_cache(self.path(name))
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name), recursive=True)
        except FileNotFoundError:
            pass
        except Exception as exc:
            left = "it is gone, but some of its objects remain until the next writer removes them"
            raise object_write_error(exc, "cannot delete", self.join(name), left) from exc

    def rename(self, name: str, new_name: str) -> str:
        """Copy every object (``manifest.json`` last), then delete the original."""
        self.fs.invalidate_cache(self.path(name))
        prefix = self.path(name) + "/"
        found = [str(p)[len(prefix) :] for p in self.fs.find(self.path(name)) if str(p).startswith(prefix)]
        files = sorted(found, key=lambda f: f == MANIFEST_NAME)
        try:
            self.make_dirs(new_name)
            for f in files:
                self.fs.copy(self.path(f"{name}/{f}"), self.path(f"{new_name}/{f}"))
        except Exception as exc:
            raise object_write_error(exc, "cannot copy", self.join(name), f"it stays where it is (wanted {new_name})") from exc
        self.delete(name)
        return self.join(new_name)

    def remove_leftovers(self) -> list[str]:
        """Delete every ``step-N`` prefix without a manifest."""
        removed = self.list_leftovers()
        for location in removed:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path(location[len(self.location) + 1 :]), recursive=True)
        return removed

    def lock(self) -> ObjectLock:
        """An advisory ``.lock`` object."""
        return ObjectLock(self)

    def sibling(self, name: str) -> FsspecStore:
        """The prefix ``name`` next to the root, sharing this one's filesystem object."""
        return FsspecStore(
            f"{self.location.rsplit('/', 1)[0]}/{name}",
            storage_options=self.storage_options,
            max_workers=self.max_workers,
            _fs=self.fs,
            _root=f"{self.root.rsplit('/', 1)[0]}/{name}",
        )

    @contextlib.contextmanager
    def open_blob_write(self, name: str) -> Iterator[IO[bytes]]:
        """A new object under ``<root>/blobs/``, complete when the block exits (discarded when it raises)."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"{name!r} is not a plain file name")
        path = self.path(f"{BLOBS_DIR}/{name}")
        self.make_dirs(BLOBS_DIR)
        f = self.fs.open(path, "wb", block_size=self.block_size)
        try:
            yield f
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard()
            with contextlib.suppress(Exception):
                f.close()
            with contextlib.suppress(Exception):
                self.fs.rm_file(path)
            raise
        f.close()

    def list_blobs(self) -> dict[str, int]:
        """The ``.safetensors`` objects under ``<root>/blobs/`` and their sizes."""
        folder = self.path(BLOBS_DIR)
        self.fs.invalidate_cache(folder)
        try:
            entries = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return {}
        found = {}
        for e in entries:
            name = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
            if e.get("type") == "file" and name.endswith(".safetensors") and not name.startswith("."):
                found[name] = int(e["size"])
        return dict(sorted(found.items()))

    def delete_blob(self, name: str) -> None:
        """Delete the object ``<root>/blobs/<name>``."""
        try:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path(f"{BLOBS_DIR}/{name}"))
        except Exception as exc:
            raise object_write_error(exc, "cannot delete", self.join(f"{BLOBS_DIR}/{name}"), "it stays") from exc

    def list_names(self) -> list[str]:
        """The names directly under the root prefix."""
        self.fs.invalidate_cache(self.root)
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        return sorted({str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries})
