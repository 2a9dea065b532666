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

import json
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any

from runstate._impl import parts
from runstate._impl.reader import read_manifest_bytes
from runstate.errors import CheckpointError, CheckpointNotFoundError, FormatVersionError
from runstate.format.manifest import MANIFEST_NAME, Manifest, TensorEntry
from runstate.format.safetensors_io import checksum, file_metadata
from runstate.format.tensors import TensorBlob
from runstate.format.tree import Encoder
from runstate.storage import BLOBS_DIR, INTERRUPTED_SAVE, LOCK_NAME, Store, step_dirname

__all__ = ["Incremental", "WrittenBlobs", "collect_blobs", "referenced_blobs"]

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


class _BlobSink:
    """A run's blob area seen as a place to write tensor files (one at a time)."""

    parallel_writes = 1

    def __init__(self, store: Store) -> None:
        self.open_write = store.open_blob_write


def _same_storage(old: tuple[Any, Any] | None, new: tuple[Any, Any] | None) -> bool:
    if old is None or new is None:
        return False
    alive = old[0]()
    return alive is not None and alive is new[0]()


def _meta(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k != "compression"}


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
        self._base: dict[tuple[str, str], _Known] = {}
        self._pending: dict[tuple[str, str], _Known] | None = None
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

    def committed(self) -> None:
        """The save in flight was committed: its tensors become the base."""
        if self._pending is not None:
            self._base = self._pending
        self._pending = None

    def abandoned(self) -> None:
        """The save in flight failed: the next save writes every tensor again.

        Forgetting the base costs one full save, and is what a failure may need: a read-back
        verification that failed on a damaged blob of the base would otherwise fail at every
        later save too, each referring to the same damaged bytes.
        """
        self._pending = None
        self._base = {}

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
    ) -> WrittenBlobs:
        """Write the changed tensors of ``items`` into the run's blob area; refer to the others.

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
        sizes, written = parts.write_files(_BlobSink(self.store), plans)
        if plans:
            self.store.sync_blobs()  # every blob's entry durable before the manifest can be committed
        for item, by_name in written.items():
            for tname, entry in by_name.items():
                entries[item][tname] = entry
                pending[item, tname] = _Known(entry, sizes[entry.file], prepared.tokens.get((item, tname)))
        refers.update(sizes)
        self._pending = pending
        self.last = WrittenBlobs(entries, refers, frozenset(sizes), reused_bytes)
        return self.last

    def _candidate(self, item: str, tname: str, blob: TensorBlob, present: dict[str, int]) -> _Known | None:
        """The base's tensor of the same name and kind whose blob is still there, or None."""
        known = self._base.get((item, tname))
        if known is None:
            return None
        e = known.entry
        if (e.dtype, e.shape, e.lib, _meta(e.meta)) != (blob.dtype, blob.shape, blob.lib, _meta(blob.meta)):
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
        return known if checksum(blob.read()) == known.entry.xxh3 else None

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
    """The blobs a manifest refers to. An intact manifest: its ``blobs`` table. A damaged one
    that is still JSON (its checksum fails): every blob name found anywhere in its bytes, so
    that a repairable manifest keeps its bytes. None for a manifest that is not JSON or of a
    newer format: nothing can be known about it, so nothing may be removed."""
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


def referenced_blobs(store: Store, *, ignore: set[str] | frozenset[str] = frozenset()) -> set[str] | None:
    """Every blob a manifest of the run refers to, except the manifests of the entries named
    in ``ignore`` (about to be removed). None when one cannot be read: then no blob is
    provably unused.

    Every entry of the run counts, not only committed steps: checkpoints set aside (damaged,
    abandoned), interrupted deletions, and any folder with a manifest, such as a step the user
    renamed or copied (``best/``) to keep it from retention. Only the blob area, the lock and
    interrupted saves (never committed) are skipped.
    """
    skip = {BLOBS_DIR, LOCK_NAME, *ignore}
    skip |= {e.name for e in store.list_extras() if e.kind == INTERRUPTED_SAVE}
    committed = {step_dirname(s) for s in store.list_committed()}
    found: set[str] = set()
    for name in store.list_names():
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
        listed = _listed_blobs(raw, child.join(MANIFEST_NAME))
        if listed is None:
            logger.warning(
                "%s is not JSON or of a newer format; unreferenced blobs are kept", child.join(MANIFEST_NAME)
            )
            return None
        found |= listed
    return found


def collect_blobs(store: Store, *, dry_run: bool = False, ignore: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Remove the blobs no manifest of the run refers to (the writer, lock held); return their locations.

    Args:
        store: the run.
        dry_run: only list them.
        ignore: checkpoints set aside whose references do not count (a dry run of their removal).

    Raises:
        CheckpointWriteError: a removal failed (what was removed before stays removed).
    """
    present = store.list_blobs()
    if not present:
        return []
    referenced = referenced_blobs(store, ignore=ignore)
    if referenced is None:
        return []
    unused = [name for name in present if name not in referenced]
    blob_area = store.child(BLOBS_DIR)
    for name in unused:
        if not dry_run:
            store.delete_blob(name)
    return [blob_area.join(name) for name in unused]
