"""``runstate.verify``: check every byte of a checkpoint without loading it into anything.

It reports *all* problems it can find (not just the first): the manifest, each file's
presence, type and size, each safetensors header against the manifest, every tensor
checksum, and every tensor the typed trees refer to. Tensors are hashed as a stream, so
memory stays small whatever their size. A failure that is not damage (too many open files,
no memory, an I/O or permission error) is not reported as a problem: it raises
``CheckpointReadError``, since nothing can be said about the checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runstate._impl.reader import CheckpointReader
from runstate.errors import CheckpointError, CheckpointReadError, CorruptCheckpointError
from runstate.format.manifest import MANIFEST_NAME
from runstate.format.tree import Decoder
from runstate.storage import open_store

__all__ = ["Problem", "VerifyReport", "verify", "verify_reader"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint.

    Attributes:
        file: the file inside the checkpoint (``manifest.json``, ``model.safetensors``), or None.
        tensor: the tensor concerned, or None.
        reason: what is wrong, in words.
    """

    file: str | None
    tensor: str | None
    reason: str

    def __str__(self) -> str:
        where = ": ".join(x for x in (self.file, f"tensor {self.tensor!r}" if self.tensor else None) if x)
        return f"{where}: {self.reason}" if where else self.reason


@dataclass(frozen=True)
class VerifyReport:
    """The result of :func:`verify`.

    Attributes:
        path: the checkpoint directory.
        ok: True when no problem was found.
        problems: every problem found.
        tensors_checked: how many tensors had their checksum verified.
        nbytes_checked: how many tensor bytes were read and hashed.
    """

    path: str
    ok: bool
    problems: tuple[Problem, ...]
    tensors_checked: int = 0
    nbytes_checked: int = 0

    def __bool__(self) -> bool:
        return self.ok


def _problem(exc: CheckpointError, path: str, default_file: str | None = None) -> Problem:
    file = getattr(exc, "file", None) or default_file
    reason = str(exc)
    for prefix in (os.path.join(path, file or ""), f"{path}/{file or ''}", path):
        if reason.startswith(prefix + ": "):
            reason = reason[len(prefix) + 2 :]
            break
    return Problem(file, getattr(exc, "tensor", None), reason)


def _tensor_refs(tree: Any) -> set[str]:
    """Every tensor name a tree refers to (a walk with its own stack: any depth)."""
    out: set[str] = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            if node.get("t") == "tensor" and isinstance(node.get("name"), str):
                out.add(node["name"])
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return out


class _Placeholders:
    """Accepts any object node, so a tree's structure is checked without building objects."""

    def get(self, value: Any) -> None:
        return None

    def make(self, kind: str, state: Any, attrs: dict[str, Any]) -> Any:
        return None

    def copy_into(self, target: Any, source: Any) -> bool:
        return False


def verify(
    path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> VerifyReport:
    """Check a checkpoint directory completely.

    Args:
        path: a checkpoint directory (``runs/exp/step-000000001000``) or URL
            (``s3://bucket/exp/step-000000001000``).
        storage_options: fsspec options for a URL (credentials, endpoint...).

    Returns:
        A :class:`VerifyReport`; ``report.ok`` is False when anything is wrong.

    Raises:
        CheckpointReadError: the checkpoint could not be read for a reason that is not damage
            (open-file limit, memory, I/O, network or permissions): no verdict.

    Example:
        >>> report = runstate.verify("runs/exp/step-000000001000")  # doctest: +SKIP
        >>> for problem in report.problems:
        ...     print(problem)
    """
    store = open_store(path, storage_options=storage_options)
    path = store.location
    try:
        reader = CheckpointReader(store)
    except CheckpointReadError:
        raise
    except CheckpointError as exc:
        return VerifyReport(path, False, (_problem(exc, path, MANIFEST_NAME),))
    return verify_reader(reader)


def verify_reader(reader: CheckpointReader) -> VerifyReport:
    """Check every file and tensor of an opened checkpoint (closes the reader).

    Raises:
        CheckpointReadError: a file could not be read for a reason that is not damage.
    """
    path = reader.path
    problems: list[Problem] = []
    checked = nbytes = 0
    with reader:
        bad_files: set[str] = set()
        for fname in reader.manifest.files:
            try:
                reader.open_file(fname)
            except CorruptCheckpointError as exc:
                problems.append(_problem(exc, path, fname))
                bad_files.add(fname)
        for item, entry in reader.manifest.items.items():
            refs = _tensor_refs(entry.tree)
            for name in sorted(refs - set(entry.tensors) - set(entry.chunks)):
                problems.append(
                    Problem(MANIFEST_NAME, name, f"item {item!r} refers to a tensor missing from the index")
                )
            for name, tensor in entry.tensors.items():
                if tensor.file in bad_files:
                    continue
                try:
                    nbytes += reader.verify_tensor(item, name)
                except CorruptCheckpointError as exc:
                    problems.append(_problem(exc, path, tensor.file))
                else:
                    checked += 1
            try:
                Decoder(item, lambda _name: None, [_Placeholders()]).decode(entry.tree)
            except CheckpointError as exc:
                problems.append(_problem(exc, path, MANIFEST_NAME))
    return VerifyReport(path, not problems, tuple(problems), checked, nbytes)
