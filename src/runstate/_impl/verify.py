"""Checking every byte of an opened checkpoint: what ``runstate.verify`` and the manager's
read-back and ``latest_step(verified=True)`` run. The public names (:class:`Problem`,
:class:`VerifyReport`, :func:`runstate.verify`) are re-exported by :mod:`runstate.verify`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runstate._impl.reader import CheckpointReader
from runstate.errors import CheckpointError, CorruptCheckpointError
from runstate.format.manifest import MANIFEST_NAME
from runstate.format.tree import Decoder

__all__ = ["Problem", "VerifyReport", "problem_of", "verify_reader"]


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

    Like :class:`RestoreReport`, ``report.ok`` (a property) and ``bool(report)`` are True when
    nothing is wrong.

    Attributes:
        path: the checkpoint directory.
        problems: every problem found.
        tensors_checked: how many tensors had their checksum verified.
        nbytes_checked: how many tensor bytes were read and hashed.
    """

    path: str
    problems: tuple[Problem, ...] = ()
    tensors_checked: int = 0
    nbytes_checked: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def __bool__(self) -> bool:
        return self.ok


def problem_of(exc: CheckpointError, path: str, default_file: str | None = None) -> Problem:
    file = getattr(exc, "file", None) or default_file
    reason = str(exc)
    for prefix in (f"{path}/{file or ''}", path):
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
        for fname in [*reader.manifest.files, *reader.manifest.blobs]:  # own files, then referenced blobs
            try:
                reader.open_file(fname)
            except CorruptCheckpointError as exc:
                problems.append(problem_of(exc, path, fname))
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
                    problems.append(problem_of(exc, path, tensor.file))
                else:
                    checked += 1
            try:
                Decoder(item, lambda _name: None, [_Placeholders()]).decode(entry.tree)
            except CheckpointError as exc:
                problems.append(problem_of(exc, path, MANIFEST_NAME))
    return VerifyReport(path, tuple(problems), checked, nbytes)
