"""``runstate.inspect``: what a checkpoint holds, from its manifest alone.

Listing a run or showing a checkpoint must be cheap and safe even for a 100 GB checkpoint
from a stranger: this module reads only ``manifest.json`` (checked against its own
checksum, from a local directory or a URL through the same ``Store``) and never a tensor
byte, never imports an ML framework and never builds an object from the checkpoint. Tensors
appear as :class:`TensorSummary` (name, dtype, shape, size, file, framework) and generators
and typed JAX keys as :class:`ObjectSummary`; everything else is the plain decoded value (the
optimizer's learning rates, the data loader's position...). Tensor checksums are not checked
here: that is :func:`runstate.verify`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from runstate._impl.reader import read_manifest_bytes
from runstate._impl.restore import plain
from runstate.errors import CorruptCheckpointError
from runstate.format.depth import stack_room
from runstate.format.manifest import MANIFEST_NAME, Manifest, TensorEntry
from runstate.format.tree import Decoder
from runstate.storage import Store, open_store

__all__ = ["CheckpointContents", "ItemContents", "ObjectSummary", "TensorSummary", "inspect"]


@dataclass(frozen=True)
class TensorSummary:
    """One stored tensor, described without reading its bytes.

    Attributes:
        item: the top-level item it belongs to.
        name: its name in the item's tensor index (``"0.weight"``, ``"state.0.exp_avg"``).
        dtype: the safetensors dtype code (``"F32"``, ``"BF16"``...), or, for a tensor stored
            as raw bytes, the framework's dtype name (``"complex128"``, ``"<c16"``).
        shape: its shape.
        nbytes: its size in bytes.
        file: the tensor file holding it.
        lib: the framework it is rebuilt as: ``"torch"``, ``"jax"`` or ``"numpy"``.
    """

    item: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str
    lib: str


@dataclass(frozen=True)
class ObjectSummary:
    """A stored generator (``random.Random``, ``numpy.Generator``, ``torch.Generator``...) or
    typed JAX PRNG key (``jax.random.key``).

    Attributes:
        kind: what it is, e.g. ``"torch.Generator"`` or ``"jax.random.key"``.
        attrs: its attributes, e.g. ``{"device": "cpu"}``.
        state: its decoded state, with tensors as :class:`TensorSummary`.
    """

    kind: str
    attrs: dict[str, Any]
    state: Any


@dataclass(frozen=True)
class ItemContents:
    """One top-level item of a checkpoint.

    Attributes:
        name: the item name (``"model"``).
        kind: ``"stateful"`` (an object saved through ``state_dict()``), ``"object"`` (a
            generator), ``"tensor"`` or ``"value"`` (plain Python data).
        type: the class that was saved (``"torch.optim.adamw.AdamW"``) for a stateful item,
            the generator kind for an object, else the value's type (``"int"``, ``"dict"``).
        value: the decoded value: a stateful item's ``state_dict``, with every tensor replaced
            by a :class:`TensorSummary` and every generator by an :class:`ObjectSummary`.
        tensors: its tensors, in the order of its tensor index.
    """

    name: str
    kind: str
    type: str
    value: Any
    tensors: tuple[TensorSummary, ...] = ()

    @property
    def nbytes(self) -> int:
        """Total size of the item's tensors in bytes."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def files(self) -> tuple[str, ...]:
        """The tensor files of the item, in order of first use."""
        return tuple(dict.fromkeys(t.file for t in self.tensors))


@dataclass(frozen=True)
class CheckpointContents:
    """What :func:`inspect` found in a checkpoint's manifest.

    Attributes:
        path: the checkpoint directory or URL.
        step: the training step (None for a save without one).
        created: creation time, ISO 8601 in UTC.
        metrics: the metrics passed to ``save``.
        versions: software that wrote it (``{"runstate": ..., "torch": ...}``).
        nbytes: total size of the checkpoint's files, ``manifest.json`` included.
        files: each tensor file and its size in bytes.
        items: every item by name, in the order of the saved state.
        format_version: the on-disk format version.
        blobs: each file of the run's blob area it refers to (incremental checkpoints), and its size.
        own_blobs: the blobs this checkpoint wrote itself (the others an earlier one wrote).
    """

    path: str
    step: int | None
    created: str
    metrics: dict[str, Any]
    versions: dict[str, str]
    nbytes: int
    files: dict[str, int] = field(default_factory=dict)
    items: dict[str, ItemContents] = field(default_factory=dict)
    format_version: int = 1
    blobs: dict[str, int] = field(default_factory=dict)
    own_blobs: frozenset[str] = frozenset()

    @property
    def referenced_nbytes(self) -> int:
        """Bytes of the blobs it refers to that an earlier checkpoint wrote (0 unless incremental)."""
        return sum(n for name, n in self.blobs.items() if name not in self.own_blobs)

    @property
    def own_nbytes(self) -> int:
        """Bytes it wrote itself: :attr:`nbytes` minus :attr:`referenced_nbytes`."""
        return self.nbytes - self.referenced_nbytes

    @property
    def tensors(self) -> tuple[TensorSummary, ...]:
        """Every tensor of every item."""
        return tuple(t for item in self.items.values() for t in item.tensors)


class _Summaries:
    """Object codec that describes generators instead of constructing them."""

    def get(self, value: Any) -> None:
        return None

    def make(self, kind: str, state: Any, attrs: dict[str, Any]) -> ObjectSummary:
        return ObjectSummary(str(kind), dict(attrs) if isinstance(attrs, dict) else {}, state)

    def copy_into(self, target: Any, source: Any) -> bool:
        return False


def _summary(item: str, name: str, entry: TensorEntry) -> TensorSummary:
    stored, entry = entry, entry.decoded()  # a compressed tensor: its real dtype and shape
    dtype, shape = entry.dtype, entry.shape
    if "lib_dtype" in entry.meta:
        dtype = str(entry.meta["lib_dtype"])
        shape = tuple(entry.meta.get("lib_shape", shape))
    return TensorSummary(item, name, dtype, shape, stored.end - stored.begin, entry.file, entry.lib)


def _describe(tree: dict[str, Any], value: Any) -> tuple[str, str]:
    t = tree.get("t")
    if t == "stateful":
        return "stateful", str(tree.get("type"))
    if t == "object":
        return "object", str(tree.get("kind"))
    if t == "tensor":
        return "tensor", "tensor"
    return "value", type(value).__name__


def _read_manifest(store: Store) -> tuple[Manifest, int]:
    """Read and check ``manifest.json`` exactly as ``CheckpointReader`` does.

    ``CheckpointReader`` itself is not used: it also prepares to load tensors (codecs,
    object builders, open-file bookkeeping) where only the manifest is needed.
    """
    raw = read_manifest_bytes(store)
    return Manifest.from_json_bytes(raw, store.join(MANIFEST_NAME)), len(raw)


def _no_tensor(name: str) -> Any:
    raise CorruptCheckpointError(f"{MANIFEST_NAME}: metrics refer to tensor {name!r}", file=MANIFEST_NAME)


def inspect(
    path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> CheckpointContents:
    """Describe a checkpoint from its manifest, without reading any tensor data.

    Args:
        path: a checkpoint directory (``runs/exp/step-000000001000``) or URL
            (``s3://bucket/exp/step-000000001000``).
        storage_options: fsspec options for a URL (credentials, endpoint...).

    Returns:
        A :class:`CheckpointContents`: step, creation time, metrics, versions, sizes, and
        for each item its type, decoded value (tensors as :class:`TensorSummary`) and tensors.

    Raises:
        CheckpointNotFoundError: ``path`` is not a checkpoint.
        CorruptCheckpointError: the manifest is damaged or malformed.
        FormatVersionError: the checkpoint needs a newer runstate.

    Example:
        >>> contents = runstate.inspect("runs/exp/step-000000001000")  # doctest: +SKIP
        >>> contents.items["optimizer"].value["param_groups"][0]["lr"]
        0.001
    """
    store = open_store(path, storage_options=storage_options)
    with stack_room():  # decoding and plain() recurse once per level of the deepest tree
        return _contents(store)


def _contents(store: Store) -> CheckpointContents:
    path = store.location
    manifest, manifest_nbytes = _read_manifest(store)
    metrics = Decoder("metrics", _no_tensor, []).decode(manifest.metrics)
    if not isinstance(metrics, dict):
        raise CorruptCheckpointError(f"{path}/{MANIFEST_NAME}: metrics is not a dict", file=MANIFEST_NAME)
    items: dict[str, ItemContents] = {}
    for name, entry in manifest.items.items():
        summaries = {tname: _summary(name, tname, e) for tname, e in entry.tensors.items()}
        wholes = {
            tname: TensorSummary(
                name,
                tname,
                c.dtype,
                c.shape,
                sum(summaries[part].nbytes for _, part in c.parts),
                entry.tensors[c.parts[0][1]].file if c.parts else "",
                c.lib,
            )
            for tname, c in entry.chunks.items()
        }
        referable = {**summaries, **wholes}

        def tensor(tname: str, item: str = name, known: dict[str, TensorSummary] = referable) -> TensorSummary:
            if tname not in known:
                raise CorruptCheckpointError(
                    f"{path}/{MANIFEST_NAME}: item {item!r} refers to unknown tensor {tname!r}",
                    file=MANIFEST_NAME,
                    tensor=tname,
                )
            return known[tname]

        decoded = Decoder(name, tensor, [_Summaries()]).decode(entry.tree)
        kind, type_name = _describe(entry.tree, decoded)
        items[name] = ItemContents(name, kind, type_name, plain(decoded), tuple(summaries.values()))
    return CheckpointContents(
        path=path,
        step=manifest.step,
        created=manifest.created,
        metrics=dict(metrics),
        versions=dict(manifest.versions),
        nbytes=manifest.nbytes + manifest_nbytes,
        files=dict(manifest.files),
        items=items,
        format_version=manifest.format_version,
        blobs=dict(manifest.blobs),
        own_blobs=manifest.own_blobs,
    )
