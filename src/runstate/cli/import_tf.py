"""Reading a TensorFlow checkpoint for ``runstate import``: values only, never code.

Why this exists: a run trained with ``tf.train.Checkpoint`` and ``tf.train.CheckpointManager``
has its state in TensorFlow's own bundle format, and moving to runstate should not mean
throwing it away. A TensorFlow checkpoint is a *prefix* (``ckpts/ckpt-5``) naming two or more
files: ``ckpt-5.index`` (a table of keys, dtypes and shapes) and ``ckpt-5.data-00000-of-00001``
(the raw bytes); ``CheckpointManager`` also writes a ``checkpoint`` text file in its directory
naming the latest prefix. TensorFlow's ``CheckpointReader`` (``tf.train.load_checkpoint``)
reads that bundle as tensors: nothing in it is executed and nothing is unpickled.

The invariant: every value is read into memory before anything is written, so a checkpoint
that cannot be read completely (a missing or truncated ``.data`` file, a damaged index) is
refused with :class:`~runstate.CorruptCheckpointError` and no output exists.

How keys become items (:func:`item_tree`): a key is split at ``/``; the first name is the
item, the others nested dict keys; the suffix ``/.ATTRIBUTES/VARIABLE_VALUE`` that
``tf.train.Checkpoint`` appends to every variable is dropped, so
``optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE`` is ``state["optimizer"]["_iterations"]``.
A value whose path another key continues (a Keras 2 slot ``kernel/.OPTIMIZER_SLOT/...``, a
TF1 ``kernel/Adam``) is stored under ``VARIABLE_VALUE`` next to those entries. Numbers stay
NumPy arrays of the checkpoint's dtype and shape (0-d for scalars); strings become ``bytes``
(lists of them for string tensors). ``_CHECKPOINTABLE_OBJECT_GRAPH`` (TensorFlow's record of
the Python objects) and variant values (a ``tf.data`` iterator's state, which TensorFlow
cannot export as values) are skipped, each with a note.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

from runstate.errors import CorruptCheckpointError
from runstate.storage import LocalStore, split_path

__all__ = ["TFCheckpoint", "find", "item_tree", "read"]

#: The suffix ``tf.train.Checkpoint`` gives every variable's key.
VALUE_SUFFIX = (".ATTRIBUTES", "VARIABLE_VALUE")

#: Where a value goes when its path is also the start of other keys.
VALUE_KEY = "VARIABLE_VALUE"

#: TensorFlow's serialized object graph: Python structure, not training state.
OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"

#: A file of a checkpoint: ``PREFIX.index`` or ``PREFIX.data-00000-of-00001``.
_BUNDLE_FILE = re.compile(r"^(.+)\.(?:index|data-[0-9]+-of-[0-9]+)\Z")


@dataclasses.dataclass(frozen=True)
class TFCheckpoint:
    """A TensorFlow checkpoint read into memory.

    Attributes:
        prefix: the checkpoint's prefix (``ckpts/ckpt-5``), the latest one for a directory.
        state: the items, ready for ``runstate.save`` (see the module docstring for the layout).
        notes: one line per key that was skipped, saying why.
    """

    prefix: str
    state: dict[str, Any]
    notes: tuple[str, ...]


def find(src: str) -> str | None:
    """What to hand to TensorFlow when ``src`` names a TensorFlow checkpoint, else None.

    Recognized without importing TensorFlow: a directory holding a ``checkpoint`` file (as
    ``tf.train.CheckpointManager`` writes; the directory is returned and TensorFlow picks its
    latest checkpoint), a prefix whose ``PREFIX.index`` exists, and a file named
    ``PREFIX.index`` or ``PREFIX.data-NNNNN-of-NNNNN`` (the prefix is returned).

    Args:
        src: the path given on the command line.

    Returns:
        The directory or prefix, or None when ``src`` is something else (a ``.pt`` file).
    """
    store = LocalStore(src)
    kind = store.kind()
    if kind == "directory":
        return src if store.kind("checkpoint") == "file" else None
    parent, name = split_path(src)
    m = _BUNDLE_FILE.match(name)
    if kind == "file" and m is not None:
        return LocalStore(parent).join(m.group(1))
    if kind is None and LocalStore(parent).kind(f"{name}.index") == "file":
        return src
    return None


def item_tree(values: Mapping[str, Any]) -> dict[str, Any]:
    """Nest flat TensorFlow keys into items (see the module docstring).

    Args:
        values: checkpoint key -> value.

    Returns:
        item name -> value or nested dict, keys sorted.

    Raises:
        CorruptCheckpointError: two keys map to the same place (``a`` and
            ``a/.ATTRIBUTES/VARIABLE_VALUE``), or a key has an empty name (``a//b``).

    Example:
        >>> item_tree({"net/w/.ATTRIBUTES/VARIABLE_VALUE": 1, "step/.ATTRIBUTES/VARIABLE_VALUE": 2})
        {'net': {'w': 1}, 'step': 2}
    """
    paths: dict[tuple[str, ...], str] = {}
    for key in sorted(values):
        parts = tuple(key.split("/"))
        if parts[-2:] == VALUE_SUFFIX and len(parts) > 2:
            parts = parts[:-2]
        if "" in parts:
            raise CorruptCheckpointError(f"TensorFlow key {key!r} has an empty name between '/'; cannot nest it")
        if parts in paths:
            raise CorruptCheckpointError(
                f"TensorFlow keys {paths[parts]!r} and {key!r} would both be {'/'.join(parts)}"
            )
        paths[parts] = key
    continued = {parts[:i] for parts in paths for i in range(1, len(parts))}
    tree: dict[str, Any] = {}
    for parts, key in paths.items():
        where = (*parts, VALUE_KEY) if parts in continued else parts
        node = tree
        for name in where[:-1]:
            node = node.setdefault(name, {})
        if where[-1] in node:
            raise CorruptCheckpointError(f"TensorFlow key {key!r} would replace another value at {'/'.join(where)}")
        node[where[-1]] = values[key]
    return tree


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def read(location: str) -> TFCheckpoint:
    """Read every value of a TensorFlow checkpoint into memory (needs ``tensorflow``).

    Args:
        location: what :func:`find` returned: a prefix, or a directory with a ``checkpoint`` file.

    Returns:
        The checkpoint's prefix, its items and the notes on what was skipped.

    Raises:
        CorruptCheckpointError: TensorFlow cannot read the checkpoint (a missing or truncated
            ``.data`` file, a damaged ``.index``, a ``checkpoint`` file naming no checkpoint).
        ImportError: tensorflow is not installed.
    """
    if "tensorflow" not in sys.modules:  # a command's stderr is one line: no C++ start-up banners
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    prefix = location
    if LocalStore(location).kind() == "directory":
        logger = tf.get_logger()
        level = logger.level
        logger.setLevel(logging.CRITICAL)  # it logs a missing checkpoint as an ERROR: our message says it
        try:
            latest = tf.train.latest_checkpoint(location)
        except Exception as exc:  # a damaged text proto: protobuf's ParseError, or an OpError
            raise CorruptCheckpointError(
                f"cannot read {location}/checkpoint: {_first_line(exc)}; give the prefix of a checkpoint (ckpts/ckpt-5)"
            ) from exc
        finally:
            logger.setLevel(level)
        if latest is None:
            raise CorruptCheckpointError(
                f"{location}/checkpoint names no checkpoint whose .index exists; "
                "give the prefix of one (ckpts/ckpt-5) instead of the directory"
            )
        prefix = latest
    values: dict[str, Any] = {}
    notes: list[str] = []
    try:
        reader = tf.train.load_checkpoint(prefix)
        dtypes = reader.get_variable_to_dtype_map()
        _check_sizes(prefix, reader.get_variable_to_shape_map(), dtypes)
        for key in sorted(dtypes):
            dtype = dtypes[key]
            if key == OBJECT_GRAPH:
                continue  # the Python object structure; restoring it is TensorFlow's business
            if dtype == tf.variant:
                what = "a tf.data iterator's position" if key.endswith("/ITERATOR_STATE") else "a variant value"
                notes.append(f"skipped {key}: {what} (variant), which TensorFlow cannot read as values")
                continue
            value = reader.get_tensor(key)
            if dtype == tf.string:
                values[key] = value if isinstance(value, bytes) else value.tolist()
            else:
                values[key] = _array(value)
    except (tf.errors.OpError, ValueError, IndexError, RuntimeError, TypeError) as exc:
        raise CorruptCheckpointError(
            f"cannot read {prefix} as a TensorFlow checkpoint: {_first_line(exc)}; "
            "a checkpoint needs its .index and every .data-* file, complete, next to each other"
        ) from exc
    return TFCheckpoint(prefix=prefix, state=item_tree(values), notes=tuple(notes))


def _check_sizes(prefix: str, shapes: Mapping[str, Any], dtypes: Mapping[str, Any]) -> None:
    """Refuse an index whose values would take more bytes than its ``.data`` files hold, before
    TensorFlow allocates them (a damaged or crafted shape would exhaust memory)."""
    import tensorflow as tf

    need = 0
    for key, dtype in dtypes.items():
        if dtype in (tf.string, tf.variant, tf.resource):
            continue  # no fixed size per element; TensorFlow checks their bytes against the file
        count = 1
        for dim in shapes.get(key) or []:
            count *= max(int(dim), 0)
        need += count * int(dtype.size)
    parent, name = split_path(prefix)
    folder = LocalStore(parent)
    files = [f for f in folder.list_names() if f.startswith(f"{name}.data-")]
    if need and not files:
        raise CorruptCheckpointError(
            f"cannot read {prefix}: {name}.data-00000-of-00001; No such file or directory (the .index lists "
            "values, and no .data-* file is next to it)"
        )
    have = sum(folder.size(f) for f in files)
    if need > have:
        raise CorruptCheckpointError(
            f"{prefix}.index describes {need} bytes of values, but its .data files hold {have}: a damaged or "
            "crafted index; nothing was read (a checkpoint needs its .index and every .data-* file, complete)"
        )


def _array(value: Any) -> Any:
    import numpy as np

    return np.asarray(value)  # scalars come back as NumPy scalars: keep them 0-d arrays of their dtype
