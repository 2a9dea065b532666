"""The ``tf.data`` position: an iterator's serialized state, and the pipelines it is not exact for.

``tf.raw_ops.SerializeIterator`` returns a variant tensor holding each stage's position,
shuffle buffers and their random state (what ``tf.train.Checkpoint(iterator=it)`` saves);
:func:`iterator_state` stores it as uint8 bytes and :func:`set_iterator_state` puts it back.
Before saving, :func:`_check_exact` refuses the pipelines that would not resume exactly (a
``shuffle`` without a seed, a reshuffling ``shuffle`` inside a ``repeat`` with stages between
them, a random op in a ``map`` whose state lives in its kernel, a parallel ``map`` drawing from
a generator without deterministic ops); :func:`pipeline` fingerprints the stages so that a
dataset rebuilt otherwise is a mismatch. Part of the TensorFlow adapter
(:mod:`runstate.adapters.tensorflow`), imported with it.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import numpy as np
import tensorflow as tf

from runstate.errors import CorruptCheckpointError, StateMismatchError, UnsupportedTypeError

__all__ = [
    "GENERATOR_OPS",
    "iterator_state",
    "pipeline",
    "set_iterator_state",
    "shuffle_seeds",
    "stages",
]

_MAGIC = b"RSTFIT1\0"  # start of a serialized iterator state (format version 1)
_FAIL = tf.data.experimental.ExternalStatePolicy.FAIL.value

# Random ops whose state lives in the kernel, not in a variable: with external state ignored,
# an iterator saved after them resumes with other random numbers.
_KERNEL_RANDOM = ("TruncatedNormal", "Multinomial", "ParameterizedTruncatedNormal")
# Ops by which a function draws from a tf.random.Generator (its state variable).
GENERATOR_OPS = (
    "RngReadAndSkip",
    "RngSkip",
    "StatefulUniform",
    "StatefulUniformInt",
    "StatefulUniformFullInt",
    "StatefulStandardNormal",
    "StatefulStandardNormalV2",
    "StatefulTruncatedNormal",
)


def iterator_state(iterator: Any) -> np.ndarray:
    """The position of a ``tf.data`` iterator (``iter(dataset)``) as uint8 bytes.

    The bytes are the variant tensor ``tf.raw_ops.SerializeIterator`` returns (what
    ``tf.train.Checkpoint(iterator=it)`` saves): the position of every stage, shuffle buffers
    and their random state included. Each slice is stored as a ``TensorProto``
    (``tf.io.serialize_tensor``), length-prefixed, after an 8-byte magic.

    Args:
        iterator: an iterator made with ``iter(dataset)`` (a ``tf.data`` ``OwnedIterator``).

    Returns:
        A 1-D ``numpy.uint8`` array, for :func:`set_iterator_state`.

    Raises:
        UnsupportedTypeError: ``iterator`` is not a tf.data iterator, or its pipeline would not
            resume exactly: a ``shuffle`` without a seed, a reshuffling ``shuffle`` inside a
            ``repeat`` with stages between them, a random op whose state TensorFlow
            cannot save, or a ``map`` that draws from a ``tf.random.Generator`` without
            ``experimental_external_state_policy = IGNORE`` (the message says what to change).
    """
    resource = getattr(iterator, "_iterator_resource", None)
    if resource is None:
        raise UnsupportedTypeError(f"a {type(iterator).__qualname__} is not a tf.data iterator (iter(dataset))")
    policy = _policy(iterator)
    _check_exact(iterator, ignore_external=policy != _FAIL)  # WARN serializes without the state too
    try:
        variant = tf.raw_ops.SerializeIterator(resource_handle=resource, external_state_policy=policy)
    except (tf.errors.FailedPreconditionError, tf.errors.UnimplementedError) as exc:
        raise UnsupportedTypeError(
            f"TensorFlow cannot save the position of this tf.data iterator: {exc.message.strip()}. If a map "
            "function draws from a tf.random.Generator, save the generator as its own item and set "
            "options = tf.data.Options(); options.experimental_external_state_policy = "
            "tf.data.experimental.ExternalStatePolicy.IGNORE; dataset = dataset.with_options(options). "
            "Other random ops in a map (tf.random.uniform, tf.image.random_*) have no state to save: "
            "use a tf.random.Generator or the stateless ops (tf.random.stateless_uniform)"
        ) from exc
    parts = [_MAGIC]
    for piece in tf.unstack(variant):  # one proto per slice: no 2 GB protobuf limit on the whole
        data = tf.io.serialize_tensor(piece).numpy()
        parts.append(struct.pack("<Q", len(data)))
        parts.append(data)
    return np.frombuffer(b"".join(parts), dtype=np.uint8).copy()


def set_iterator_state(iterator: Any, state: np.ndarray) -> None:
    """Move a ``tf.data`` iterator to the position :func:`iterator_state` returned.

    ``iterator`` must iterate over the same pipeline (the same stages, parameters and shuffle
    seeds) as the saved one; its next element is then the one the saved iterator would have
    returned. The state must come from a trusted checkpoint: TensorFlow's deserializer is not
    hardened against crafted input (a crafted state can crash the process); the checksums
    catch accidental corruption, not a crafted file.

    Args:
        iterator: a fresh (or used) iterator over the same dataset: ``iter(dataset)``.
        state: the array returned by :func:`iterator_state`.

    Raises:
        UnsupportedTypeError: ``iterator`` is not a tf.data iterator.
        CorruptCheckpointError: ``state`` is not a serialized iterator state.
        StateMismatchError: the state is of another pipeline than ``iterator``'s.
    """
    resource = getattr(iterator, "_iterator_resource", None)
    if resource is None:
        raise UnsupportedTypeError(f"a {type(iterator).__qualname__} is not a tf.data iterator (iter(dataset))")
    try:
        pieces = [tf.io.parse_tensor(s, tf.variant) for s in _slices(state)]
    except tf.errors.OpError as exc:
        raise CorruptCheckpointError(f"the stored tf.data iterator state cannot be parsed: {exc.message}") from exc
    if not pieces:
        raise CorruptCheckpointError("the stored tf.data iterator state holds no serialized iterator")
    try:
        tf.raw_ops.DeserializeIterator(resource_handle=resource, serialized=tf.stack(pieces))
    except tf.errors.OpError as exc:
        raise StateMismatchError(
            "the stored tf.data iterator state does not fit this iterator's dataset (another pipeline?): "
            f"{exc.message.strip()}; build the same dataset as the saved run"
        ) from exc


def _policy(iterator: Any) -> int:
    """The external state policy ``tf.train.Checkpoint(iterator=...)`` uses (FAIL by default)."""
    dataset = getattr(iterator, "_dataset", None)
    if dataset is not None:
        policy = dataset.options().experimental_external_state_policy
        if policy is not None:
            return int(policy.value)
    return int(_FAIL)


def stages(iterator: Any) -> list[Any]:
    """The stages of ``iterator``'s pipeline, from the last to the source (Python objects:
    serializing the dataset graph would copy every in-memory tensor it was built from)."""
    out: list[Any] = []
    todo = [getattr(iterator, "_dataset", None)]
    while todo:
        ds = todo.pop()
        if ds is None:
            continue
        out.append(ds)
        try:
            todo.extend(reversed(ds._inputs()))
        except (AttributeError, NotImplementedError):
            continue
    return out


def _scalar(value: Any) -> Any:
    """A stage's scalar parameter (a batch size, a seed) as a Python value, else None."""
    if isinstance(value, bool):
        return value
    dtype = getattr(value, "dtype", None)
    if (
        dtype is None
        or dtype in (tf.variant, tf.resource)
        or getattr(value, "shape", None) != ()
        or not hasattr(value, "numpy")
    ):
        return None
    return value.numpy().item()


def pipeline(iterator: Any) -> tuple[list[int], str]:
    """The seed pairs of every ``shuffle`` in ``iterator``'s pipeline (flattened, last stage
    first), and a fingerprint of its stages: their scalar parameters (batch and buffer
    sizes...), element specs, the ops and constants of their functions (``map``, ``filter``)
    and the shapes and dtypes of the tensors they were built from. TensorFlow restores a
    position into a pipeline of the same stages with other parameters or functions without a
    word. Not covered: the values of source tensors (another array of the same shape).

    Raises:
        UnsupportedTypeError: a ``shuffle`` has no seed (neither ``seed=`` nor
            ``tf.random.set_seed``): its next epochs are shuffled with fresh random seeds.
    """
    seeds: list[int] = []
    parts: list[str] = []
    for ds in stages(iterator):
        params = {k: _scalar(v) for k, v in sorted(vars(ds).items())}
        parts.append(type(ds).__name__ + repr({k: v for k, v in params.items() if v is not None}))
        parts.append(repr(getattr(ds, "element_spec", None)) + repr(_sources(ds)))
        parts.extend(_function_fingerprint(ds))
        if "_seed" in params and "_seed2" in params:
            pair = [params["_seed"], params["_seed2"]]
            if pair == [0, 0]:
                raise UnsupportedTypeError(
                    "a tf.data shuffle without a seed (shuffle(buffer_size) and no tf.random.set_seed) cannot "
                    "resume exactly: the saved position keeps the current shuffle buffer, but TensorFlow draws the "
                    "seeds of the next epochs at random in every process. Fix: pass a seed, "
                    "shuffle(buffer_size, seed=0), or call tf.random.set_seed(...) (keras.utils.set_random_seed(...)) "
                    "before building the dataset"
                )
            seeds.extend(int(x) if x is not None else -1 for x in pair)
    return seeds, hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def shuffle_seeds(iterator: Any) -> list[int]:
    """The seed pairs of every ``shuffle`` in ``iterator``'s pipeline (see :func:`pipeline`).

    Raises:
        UnsupportedTypeError: a ``shuffle`` has no seed.
    """
    return pipeline(iterator)[0]


def _function_ops(ds: Any) -> list[tuple[str, str]]:
    """``(op, node name)`` of every node of the functions a stage runs (map, filter...)."""
    ops: list[tuple[str, str]] = []
    for value in vars(ds).values():
        fn = getattr(getattr(value, "function", None), "graph", None)
        if fn is None:
            continue
        graph = fn.as_graph_def()
        ops.extend((node.op, node.name) for node in graph.node)
        ops.extend((node.op, node.name) for lib in graph.library.function for node in lib.node_def)
    return ops


def _sources(ds: Any) -> list[str]:
    """Shape and dtype of every non-scalar tensor a stage holds (``from_tensor_slices`` data)."""
    out: list[str] = []
    for key, value in sorted(vars(ds).items()):
        for item in value if isinstance(value, (list, tuple)) else [value]:
            dtype, shape = getattr(item, "dtype", None), getattr(item, "shape", None)
            if isinstance(dtype, tf.dtypes.DType) and shape is not None and shape != () and dtype != tf.resource:
                out.append(f"{key}:{dtype.name}{list(shape)}")
    return out


def _function_fingerprint(ds: Any) -> list[str]:
    """The op types and constants of the functions a stage runs (names carry per-process ids)."""
    out: list[str] = []
    for value in vars(ds).values():
        fn = getattr(getattr(value, "function", None), "graph", None)
        if fn is None:
            continue
        graph = fn.as_graph_def()
        nodes = [*graph.node, *(node for lib in graph.library.function for node in lib.node_def)]
        for node in nodes:
            const = node.attr["value"].tensor.SerializeToString(deterministic=True) if node.op == "Const" else b""
            out.append(node.op + hashlib.sha256(const).hexdigest()[:8] if const else node.op)
    return out


def _deterministic() -> bool:
    from tensorflow.python.framework import config

    return bool(config.is_op_determinism_enabled())


def _check_reshuffle_in_repeat(iterator: Any) -> None:
    """Refuse a reshuffling ``shuffle`` with a ``repeat`` downstream that is not right after it.

    ``shuffle().batch().repeat()``: each epoch's shuffle iterator draws its seeds from the
    dataset's seed generator, and only that iterator saves how far the generator went. When it
    has finished at save time (a partial last batch, a ``prefetch`` that ran ahead to the end
    of the epoch), the saved position has lost the next epoch's seeds. ``shuffle().repeat()``
    (fused by tf.data, or a repeat that makes the next shuffle iterator in the same call) and
    ``reshuffle_each_iteration=False`` (the same seeds every epoch) resume exactly.
    """
    todo: list[tuple[Any, tuple[Any, ...]]] = [(getattr(iterator, "_dataset", None), ())]
    while todo:
        ds, down = todo.pop()  # down: the stages after ``ds``, nearest first
        if ds is None:
            continue
        if (
            type(ds).__name__ == "_ShuffleDataset"
            and _scalar(getattr(ds, "_reshuffle_each_iteration", True)) is not False
        ):
            repeats = [d for d in down if type(d).__name__ == "_RepeatDataset"]
            direct = bool(repeats) and down[0] is repeats[0]
            if repeats and not (direct and (len(repeats) == 1 or _scalar(repeats[0]._count) == -1)):
                between = " -> ".join(type(d).__name__.strip("_").removesuffix("Dataset").lower() for d in down)
                raise UnsupportedTypeError(
                    f"a tf.data shuffle that reshuffles every epoch sits inside repeat (shuffle -> {between}): when "
                    "the epoch's shuffle iterator has finished at save time (a partial last batch, or prefetch "
                    "that ran ahead to the end of the epoch), TensorFlow's saved position loses the next epoch's "
                    "reshuffle seeds and a resumed run would shuffle the next epochs differently. Fix: put repeat() "
                    "right after shuffle(): dataset.shuffle(n, seed=...).repeat().map(...).batch(...) (batches "
                    "then span epochs), or shuffle(..., reshuffle_each_iteration=False) for one order every epoch"
                )
        try:
            inputs = ds._inputs()
        except (AttributeError, NotImplementedError):
            continue
        todo.extend((x, (ds, *down)) for x in inputs)


def _check_exact(iterator: Any, *, ignore_external: bool) -> None:
    """Refuse a pipeline whose saved position would not resume exactly (see :func:`iterator_state`)."""
    pipeline(iterator)
    _check_reshuffle_in_repeat(iterator)
    for ds in stages(iterator):
        ops = _function_ops(ds)
        parallel = _scalar(getattr(ds, "_num_parallel_calls", None)) not in (None, 1)
        draws = sorted({op for op, _ in ops if op in GENERATOR_OPS})
        if parallel and draws and not _deterministic():
            raise UnsupportedTypeError(
                f"a tf.data map with num_parallel_calls draws from a tf.random.Generator ({', '.join(draws)}): "
                "its calls take the generator's numbers in whatever order the threads run, so even an "
                "uninterrupted run is not reproducible. Fix: call tf.config.experimental.enable_op_determinism() "
                "(tf.data then runs such a map in order), or drop num_parallel_calls from that map"
            )
        if not ignore_external:
            continue  # TensorFlow refuses stateful ops itself (FAIL policy)
        for op, name in ops:
            if op.startswith("Random") or op in _KERNEL_RANDOM:
                raise UnsupportedTypeError(
                    f"a tf.data pipeline runs the random op {op} ({name}), whose state lives in the op's "
                    "kernel: with experimental_external_state_policy=IGNORE its position is saved without it and "
                    "a resumed run would draw other numbers. Fix: draw from a tf.random.Generator saved as its "
                    "own item (g.uniform(...)), or use the stateless ops (tf.random.stateless_uniform, "
                    "tf.image.stateless_random_*) with seeds derived from the element"
                )


def _slices(state: np.ndarray) -> list[bytes]:
    raw = np.ascontiguousarray(state, dtype=np.uint8).tobytes()
    if not raw.startswith(_MAGIC):
        raise CorruptCheckpointError("the stored tf.data iterator state does not start with runstate's header")
    out: list[bytes] = []
    at = len(_MAGIC)
    while at < len(raw):
        if at + 8 > len(raw):
            raise CorruptCheckpointError("the stored tf.data iterator state is truncated")
        (size,) = struct.unpack_from("<Q", raw, at)
        at += 8
        if at + size > len(raw):
            raise CorruptCheckpointError("the stored tf.data iterator state is truncated")
        out.append(raw[at : at + size])
        at += size
    return out
