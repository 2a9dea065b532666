"""Incremental checkpoints: each checkpoint of a run writes only the tensors that changed.

Fine-tuning saves a large frozen base next to small trainable adapters; rewriting the base at
every save fills disks for nothing. With ``CheckpointManager(..., incremental=True)`` the
tensor files of a run live in its blob area (``<run>/blobs/``, docs/format.md section 15)
under names no other save uses, and a checkpoint's manifest lists the blobs it reads. A
tensor whose bytes equal those of the same tensor (same item, name, dtype, shape, lib) in the
last checkpoint this manager saved or restored is not written again: the new manifest
points at the blob that already holds it (never at another manifest, so there are no chains).

Deciding "unchanged": a tensor that has a candidate is hashed (XXH3, the checksum the
manifest carries anyway) and compared; a tensor whose version counter moved is written
without being hashed first. With ``incremental="versions"``, a tensor the framework calls
frozen (a parameter with ``requires_grad=False``) whose storage object (held weakly) and
version counter are unchanged is not read at all: faster, but writes through ``.data``,
NumPy or DLPack move no version counter, so this is opt-in.

Invariants, kept through a SIGKILL at any instant:

* a blob is durable (fsynced with its folder entry, or uploaded) before the manifest that
  refers to it is committed, so a committed checkpoint never refers to a missing blob;
* a blob is removed only by the writer (lock held), only after the manifests that referred
  to it are gone, and only when no manifest of the run (committed, set aside as damaged or
  abandoned) refers to it; a manifest that cannot be read stops the removal. A blob left
  behind by a kill is only disk space, removed by the next collection.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import xxhash

from runstate._impl import parts
from runstate._impl.reader import read_manifest_bytes
from runstate.errors import CheckpointError, CheckpointNotFoundError, FormatVersionError
from runstate.format.compress import Compression
from runstate.format.manifest import FEATURES, FORMAT_VERSION, MANIFEST_NAME, Manifest, TensorEntry
from runstate.format.safetensors_io import checksum, file_metadata
from runstate.format.tensors import TensorBlob
from runstate.format.tree import Encoder
from runstate.storage import BLOBS_DIR, INTERRUPTED_SAVE, LOCK_NAME, Store, step_dirname

__all__ = ["BlobReferences", "Incremental", "WrittenBlobs", "collect_blobs", "referenced_blobs"]

logger = logging.getLogger("runstate")

#: Suffix of the base name of the file holding an item's frozen tensors (``model.frozen.safetensors``):
#: kept apart so that the trainable bytes of the first checkpoint are not kept alive by the base.
_FROZEN = ".frozen"


@dataclass(frozen=True)
class _Known:
    """A tensor of the last checkpoint: where its bytes are, and the token it had then."""

    entry: TensorEntry
    blob_nbytes: int
    token: tuple[Any, Any] | None


@dataclass
class WrittenBlobs:
    """What an incremental save wrote and refers to (one process).

    Attributes:
        entries: per item, the index entry of every tensor (written or reused).
        blobs: every blob the checkpoint refers to, with its size.
        own: the blobs this save wrote.
        reused_bytes: tensor bytes not written because they were unchanged.
    """

    entries: dict[str, dict[str, TensorEntry]]
    blobs: dict[str, int]
    own: frozenset[str]
    reused_bytes: int = 0


class _InBackground:
    """A call (an fsync) running in a thread of its own while the caller goes on; :meth:`result` joins it."""

    def __init__(self, call: Callable[[], None]) -> None:
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = threading.Thread(
            target=self._run, args=(call,), name="runstate-sync-blobs", daemon=True
        )
        try:
            self._thread.start()
        except RuntimeError:  # no new thread (a thread limit; 3.12.0-3.12.2 at interpreter exit): inline
            self._thread = None
            self._run(call)

    def _run(self, call: Callable[[], None]) -> None:
        try:
            call()
        except BaseException as exc:  # raised in the caller's thread by result()
            self._error = exc

    def wait(self) -> None:
        """Block until the call has returned or raised."""
        if self._thread is not None:
            self._thread.join()

    def result(self) -> None:
        """Block until the call is done; raise what it raised."""
        self.wait()
        if self._error is not None:
            raise self._error


class _BlobSink:
    """A run's blob area seen as a place to write ``files`` tensor files, one at a time.

    Once the last of them is created (every new folder entry exists), ``all_created`` is
    called: the blob area's fsync can then run while that file's bytes are written.
    """

    parallel_writes = 1

    def __init__(self, store: Store, files: int, all_created: Callable[[], None]) -> None:
        self._store = store
        self._files = files
        self._opened = 0
        self._all_created = all_created

    @contextlib.contextmanager
    def open_write(self, name: str) -> Iterator[IO[bytes]]:
        """A new blob (see :meth:`Store.open_blob_write`)."""
        with self._store.open_blob_write(name) as f:
            self._opened += 1
            if self._opened == self._files:
                self._all_created()
            yield f


def _same_storage(old: tuple[Any, Any] | None, new: tuple[Any, Any] | None) -> bool:
    if old is None or new is None:
        return False
    alive = old[0]()
    return alive is not None and alive is new[0]()


@dataclass
class Prepared:
    """What :meth:`Incremental.prepare` decided when the state was captured.

    Attributes:
        present: the blobs of the run and their sizes, listed then.
        reused: per item, the frozen tensors proven unchanged (taken out of the encoder's
            blobs, so an async save does not even copy them), with their token and size.
        libs: per item, the libs of all its tensors (for the files' metadata).
        tokens: per ``(item, tensor)``, the framework's token taken at capture (None: none).
    """

    present: dict[str, int]
    reused: dict[str, dict[str, tuple[_Known, Any, int]]]
    libs: dict[str, tuple[str, ...]]
    tokens: dict[tuple[str, str], Any]


class Incremental:
    """The dedup state of one writer: the tensors of the last checkpoint it saved or restored.

    Args:
        store: the run (its blob area receives the tensor files).
        trust_versions: skip hashing a frozen tensor whose storage and version counter are
            unchanged. False (the default) hashes every candidate: writes through ``.data``,
            NumPy or DLPack (PEFT's ``merge_adapter``) do not move the version counter.
    """

    def __init__(self, store: Store, *, trust_versions: bool = False) -> None:
        self.store = store
        self.trust_versions = trust_versions
        self.references = BlobReferences()  # told each committed manifest; read by the blob collection
        self._base: dict[tuple[str, str], _Known] = {}
        self._pending: dict[tuple[str, str], _Known] | None = None
        self._syncing: _InBackground | None = None  # the blob area's fsync of the save in flight
        self.last: WrittenBlobs | None = None  # what the last save wrote (for benchmarks and logs)

    def adopt_manifest(self, manifest: Manifest | None) -> None:
        """Take a restored checkpoint's blobs as the base (no tokens: the first save hashes)."""
        self._base = {}
        if manifest is None:
            return
        for item, entry in manifest.items.items():
            for tname, e in entry.tensors.items():
                if e.file in manifest.blobs:
                    self._base[item, tname] = _Known(e, manifest.blobs[e.file], None)

    def committed(self, name: str, raw: bytes) -> None:
        """The save in flight was committed as the run's entry ``name`` with the manifest
        ``raw``: its tensors become the base."""
        if self._pending is not None:
            self._base = self._pending
            if self.last is not None:
                self.references.wrote(name, raw, self.last.blobs)
        self._pending = None

    def abandoned(self) -> None:
        """The save in flight failed: the next save writes every tensor again.

        Forgetting the base costs one full save, and is what a failure may need: a read-back
        verification that failed on a damaged blob of the base would otherwise fail at every
        later save too, each referring to the same damaged bytes.
        """
        syncing, self._syncing = self._syncing, None
        if syncing is not None:
            syncing.wait()  # its failure, if any, does not matter any more
        self._pending = None
        self._base = {}

    def durable(self) -> None:
        """Return once the blob area's entries of the blobs :meth:`write` wrote are durable.

        :meth:`write` returns with the blob area's fsync in flight, so that it overlaps the
        manifest's encoding; the save calls this before its commit (and before reading the
        checkpoint back), so a committed manifest never refers to a blob whose folder entry
        could still be lost.

        Raises:
            OSError: the fsync failed (nothing may be committed).
        """
        syncing, self._syncing = self._syncing, None
        if syncing is not None:
            syncing.result()

    def prepare(self, items: dict[str, tuple[dict[str, Any], Encoder]], frozen: dict[str, frozenset[str]]) -> Prepared:
        """At capture time: take the frozen tensors proven unchanged out of ``items`` (nothing
        of theirs is read or copied afterwards); the others are decided by :meth:`write`."""
        present = self.store.list_blobs()
        reused: dict[str, dict[str, tuple[_Known, Any, int]]] = {}
        libs: dict[str, tuple[str, ...]] = {}
        tokens: dict[tuple[str, str], Any] = {}
        for item, (_tree, enc) in items.items():
            libs[item] = tuple(b.lib for b in enc.blobs.values())
            for tname, blob in list(enc.blobs.items()):
                token = tokens[item, tname] = blob.token() if blob.token is not None else None
                if not self.trust_versions or tname not in frozen.get(item, frozenset()):
                    continue
                known = self._candidate(item, tname, blob, present)
                if known is not None and _same_storage(known.token, token):
                    assert known.token is not None and token is not None
                    if known.token[1] == token[1]:  # same storage, same version, frozen
                        reused.setdefault(item, {})[tname] = (known, token, blob.nbytes)
                        del enc.blobs[tname]
        return Prepared(present, reused, libs, tokens)

    def write(
        self,
        step: int | None,
        items: dict[str, tuple[dict[str, Any], Encoder]],
        frozen: dict[str, frozenset[str]],
        prepared: Prepared,
        *,
        shard_bytes: int,
        compression: Compression | None = None,
    ) -> WrittenBlobs:
        """Write the changed tensors of ``items`` into the run's blob area; refer to the others.

        Args:
            step: the step saved (in the new blobs' names).
            items: the (unsharded) items of the state, encoded.
            frozen: per item, the tensors its framework says training leaves unchanged.
            prepared: what :meth:`prepare` decided at capture.
            shard_bytes: split an item's new files past this many tensor bytes.
            compression: how to compress the new files (None: as they are). A tensor is
                compared by its decoded bytes, so a compressed one is reused like any other,
                and the entry a reused tensor gets is the stored one, compressed or not.

        Returns:
            The index entries and blobs of the checkpoint (remembered until :meth:`committed`).
        """
        present = prepared.present
        tag = f"{step if step is not None else 0:012d}-{uuid.uuid4().hex[:8]}"
        entries: dict[str, dict[str, TensorEntry]] = {}
        refers: dict[str, int] = {}
        pending: dict[tuple[str, str], _Known] = {}
        plans: list[parts.FilePlan] = []
        taken: set[str] = set()
        reused_bytes = 0
        for item, (_tree, enc) in items.items():
            entries[item] = {}
            for tname, (proven, token, nbytes) in prepared.reused.get(item, {}).items():
                entries[item][tname] = proven.entry
                refers[proven.entry.file] = proven.blob_nbytes
                pending[item, tname] = _Known(proven.entry, proven.blob_nbytes, token)
                reused_bytes += nbytes
            new: dict[bool, list[tuple[str, TensorBlob]]] = {False: [], True: []}
            for tname, blob in enc.blobs.items():
                known = self._unchanged(item, tname, blob, present, prepared.tokens.get((item, tname)))
                if known is None:
                    new[tname in frozen.get(item, frozenset())].append((tname, blob))
                    continue
                entries[item][tname] = known.entry
                refers[known.entry.file] = known.blob_nbytes
                pending[item, tname] = _Known(known.entry, known.blob_nbytes, prepared.tokens.get((item, tname)))
                reused_bytes += blob.nbytes
            for is_frozen, blobs in new.items():
                if blobs:
                    plans.extend(self._plans(item, prepared.libs[item], blobs, is_frozen, tag, taken, shard_bytes))
        # Every blob's folder entry durable before the manifest can be committed: the blob
        # area's fsync starts once the last new blob exists (overlapping its bytes' write and
        # the manifest's encoding); the commit waits for it (durable()).
        self._syncing = None

        def all_created() -> None:
            self._syncing = _InBackground(self.store.sync_blobs)

        sizes, written = parts.write_files(_BlobSink(self.store, len(plans), all_created), plans, compression)
        assert self._syncing is not None or not plans
        for item, by_name in written.items():
            for tname, entry in by_name.items():
                entries[item][tname] = entry
                pending[item, tname] = _Known(entry, sizes[entry.file], prepared.tokens.get((item, tname)))
        refers.update(sizes)
        self._pending = pending
        self.last = WrittenBlobs(entries, refers, frozenset(sizes), reused_bytes)
        return self.last

    def _candidate(self, item: str, tname: str, blob: TensorBlob, present: dict[str, int]) -> _Known | None:
        """The base's tensor of the same name and kind whose blob is still there, or None.

        A compressed entry is compared as what it decodes to (:meth:`TensorEntry.decoded`).
        """
        known = self._base.get((item, tname))
        if known is None:
            return None
        e = known.entry.decoded()
        if (e.dtype, e.shape, e.lib, e.meta) != (blob.dtype, blob.shape, blob.lib, blob.meta):
            return None
        if present.get(e.file) != known.blob_nbytes:  # removed or replaced behind our back: write again
            return None
        return known

    def _unchanged(self, item: str, tname: str, blob: TensorBlob, present: dict[str, int], token: Any) -> _Known | None:
        """The base's tensor when ``blob`` holds its bytes (hashed and compared), else None (write it)."""
        known = self._candidate(item, tname, blob, present)
        if known is None:
            return None
        if _same_storage(known.token, token):
            assert known.token is not None and token is not None
            if known.token[1] != token[1]:
                return None  # the version counter moved: written (safe in every mode), not hashed first
        return known if checksum(blob.read()) == known.entry.decoded().xxh3 else None

    @staticmethod
    def _plans(
        item: str,
        libs: tuple[str, ...],
        blobs: list[tuple[str, TensorBlob]],
        is_frozen: bool,
        tag: str,
        taken: set[str],
        shard_bytes: int,
    ) -> list[parts.FilePlan]:
        shards = parts.shards(blobs, shard_bytes)
        names = parts.file_names(item + (_FROZEN if is_frozen else ""), len(shards), taken)
        metadata = file_metadata(item, libs)
        return [
            parts.FilePlan(f"{tag}-{name}", item, shard, metadata) for name, shard in zip(names, shards, strict=True)
        ]


#: A blob's name as the writer makes it (``<step12>-<8 hex>-<file name>``), for reading the
#: names out of a manifest that cannot be trusted (its checksum fails).
_BLOB_NAME = re.compile(rb"[0-9]{12}-[0-9a-f]{8}-[A-Za-z0-9_.-]+\.safetensors")


def _listed_blobs(raw: bytes, path: str) -> set[str] | None:
    """The blobs a manifest refers to, or a superset of them. An intact manifest: its
    ``blobs`` table. A damaged one that is still JSON (its checksum fails): every blob name
    found anywhere in its bytes, so that a repairable manifest keeps its bytes. None for a
    manifest that is not JSON or of a newer format: nothing can be known about it, so
    nothing may be removed.

    The common case, a JSON manifest of a version this runstate reads, takes the union of
    both answers (the ``blobs`` table's names and every blob name in its bytes) without
    validating the manifest: one JSON decoding instead of a full parse and a checksum,
    and never fewer names than the full parse would give, which only ever keeps more.
    """
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        body = None
    if isinstance(body, dict) and _readable_version(body):
        table = body.get("blobs")
        names = {m.decode("ascii") for m in _BLOB_NAME.findall(raw)}
        if isinstance(table, dict):
            names.update(k for k in table if isinstance(k, str))
        return names
    return _parsed_blobs(raw, path)


def _readable_version(body: dict[str, Any]) -> bool:
    """Whether a manifest's version fields are ones this runstate reads (anything else, even
    malformed, goes through the full parse, which decides)."""
    requires = body.get("requires", [])
    return (
        type(body.get("format_version")) is int
        and body["format_version"] <= FORMAT_VERSION
        and isinstance(requires, list)
        and all(isinstance(r, str) and r in FEATURES for r in requires)
    )


def _parsed_blobs(raw: bytes, path: str) -> set[str] | None:
    """:func:`_listed_blobs` through the full parse (a manifest the fast path does not take)."""
    try:
        return set(Manifest.from_json_bytes(raw, path).blobs)
    except FormatVersionError:
        return None
    except CheckpointError:
        try:
            json.loads(raw)
        except (ValueError, RecursionError):
            return None
        return {m.decode("ascii") for m in _BLOB_NAME.findall(raw)}


class BlobReferences:
    """The blobs each manifest of a run refers to, remembered by a digest of the manifest's bytes.

    Retention collects unreferenced blobs after every save of an incremental run, and each
    kept manifest lists every tensor of the state (the base's too). A manifest whose bytes
    are those seen before refers to the same blobs, so only new or changed manifests are
    decoded again, and the writer tells what it just committed (:meth:`wrote`), so that its
    own manifests are never decoded. Every manifest is still read at every collection:
    nothing is assumed about who changed what (a manifest replaced or damaged on disk has
    other bytes). Held by the writer (one per run, never shared between runs); the names no
    collection saw are forgotten.
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, bytes, frozenset[str] | None]] = {}

    def wrote(self, name: str, raw: bytes, blobs: Iterable[str]) -> None:
        """The writer committed the manifest ``raw`` as the run's entry ``name``, referring to ``blobs``."""
        self._seen[name] = (len(raw), xxhash.xxh3_128_digest(raw), frozenset(blobs))

    def listed(self, name: str, raw: bytes, path: str) -> frozenset[str] | None:
        """The blobs the manifest ``raw`` of the run's entry ``name`` refers to (see :func:`_listed_blobs`)."""
        digest = xxhash.xxh3_128_digest(raw)
        seen = self._seen.get(name)
        if seen is not None and seen[:2] == (len(raw), digest):
            return seen[2]
        listed = _listed_blobs(raw, path)
        found = None if listed is None else frozenset(listed)
        self._seen[name] = (len(raw), digest, found)
        return found

    def keep_only(self, names: set[str]) -> None:
        """Forget the entries not in ``names`` (removed from the run)."""
        for name in [n for n in self._seen if n not in names]:
            del self._seen[name]


def referenced_blobs(
    store: Store,
    *,
    ignore: set[str] | frozenset[str] = frozenset(),
    references: BlobReferences | None = None,
) -> set[str] | None:
    """Every blob a manifest of the run refers to, except the manifests of the entries named
    in ``ignore`` (about to be removed). None when one cannot be read: then no blob is
    provably unused.

    Every entry of the run counts, not only committed steps: checkpoints set aside (damaged,
    abandoned), interrupted deletions, and any folder with a manifest, such as a step the user
    renamed or copied (``best/``) to keep it from retention. Only the blob area, the lock and
    interrupted saves (never committed) are skipped.

    Args:
        store: the run.
        ignore: entries whose references do not count.
        references: what earlier collections of this run learned (None: decode every manifest).
    """
    references = references if references is not None else BlobReferences()
    skip = {BLOBS_DIR, LOCK_NAME, *ignore}
    skip |= {e.name for e in store.list_extras() if e.kind == INTERRUPTED_SAVE}
    committed = {step_dirname(s) for s in store.list_committed()}
    found: set[str] = set()
    names = store.list_names()
    references.keep_only(set(names))
    for name in names:
        if name in skip:
            continue
        child = store.child(name)
        try:
            raw = read_manifest_bytes(child)
        except CheckpointNotFoundError:
            continue  # not a checkpoint: a file, a folder without a manifest (never or no longer committed)
        except CheckpointError as exc:
            if name not in committed and store.kind(name) != "directory":
                continue
            logger.warning("cannot read %s (%s); unreferenced blobs are kept", child.join(MANIFEST_NAME), exc)
            return None
        listed = references.listed(name, raw, child.join(MANIFEST_NAME))
        if listed is None:
            logger.warning(
                "%s is not JSON or of a newer format; unreferenced blobs are kept", child.join(MANIFEST_NAME)
            )
            return None
        found |= listed
    return found


def collect_blobs(
    store: Store,
    *,
    dry_run: bool = False,
    ignore: set[str] | frozenset[str] = frozenset(),
    references: BlobReferences | None = None,
) -> list[str]:
    """Remove the blobs no manifest of the run refers to (the writer, lock held); return their locations.

    Args:
        store: the run.
        dry_run: only list them.
        ignore: checkpoints set aside whose references do not count (a dry run of their removal).
        references: what earlier collections of this run learned (see :class:`BlobReferences`).

    Raises:
        CheckpointWriteError: a removal failed (what was removed before stays removed).
    """
    present = store.list_blobs()
    if not present:
        return []
    referenced = referenced_blobs(store, ignore=ignore, references=references)
    if referenced is None:
        return []
    unused = [name for name in present if name not in referenced]
    blob_area = store.child(BLOBS_DIR)
    for name in unused:
        if not dry_run:
            store.delete_blob(name)
    return [blob_area.join(name) for name in unused]
