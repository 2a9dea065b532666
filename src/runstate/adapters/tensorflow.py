"""TensorFlow adapter: custom training loops, ``tf.random.Generator`` and the ``tf.data`` position.

A TensorFlow training loop keeps its state in objects that have no ``state_dict``:
``tf.Variable`` step counters, ``tf.Module`` models, a Keras optimizer, ``tf.random.Generator``
and a ``tf.data`` iterator. This adapter tells the core how to save each of them
(:meth:`TensorflowAdapter.registration`, consulted by :mod:`runstate.registry`) and restores
them **in place** with ``assign``, so a ``tf.function`` that captured the variables keeps
working. Values are NumPy arrays in the checkpoint; nothing is pickled.

* ``tf.Variable``: its value. ``tf.Module``: every variable, by attribute path
  (``"layers/0/w"``). Keras optimizer: every variable (iterations, learning rate, moments) by
  position, as :class:`runstate.keras.State` does. ``tf.random.Generator``: state and algorithm.
* a ``tf.data`` iterator (``iter(dataset)``): the variant tensor ``tf.raw_ops.SerializeIterator``
  returns (what ``tf.train.Checkpoint(iterator=it)`` saves: each stage's position, shuffle
  buffers and their random state) as uint8 bytes. Saving refuses the pipelines that would
  not resume exactly (a ``shuffle`` without a seed, a reshuffling ``shuffle`` inside a ``repeat``
  with stages between them, a random op in a ``map`` whose state lives in its kernel, a
  parallel ``map`` drawing from a generator without deterministic ops, a ``map`` drawing from a
  generator the save leaves out), and
  the shuffle seeds and a fingerprint of the stages are part of the stored key, so a dataset
  rebuilt with other seeds or parameters is a mismatch, not a silently different run. An
  iterator and the generators its ``map`` draws from are read at one instant
  (:func:`snapshot`), and restored so that no stale background draw moves them.
* ``tf.Tensor`` values are stored like NumPy arrays (``lib: "tensorflow"``) and replaced on restore.
* ``runstate.RNG()`` includes TensorFlow's global seed (``tf.random.set_seed``), the state that
  derives the seeds of ops created without one, and the global generator if it exists.

Imported only when the program has imported tensorflow (or a checkpoint holds a TF tensor).
"""

from __future__ import annotations

import contextvars
import dataclasses
import sys
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from runstate.adapters.base import Adapter
from runstate.adapters.tf_data import (
    GENERATOR_OPS,
    iterator_state,
    pipeline,
    set_iterator_state,
    shuffle_seeds,
    stages,
)
from runstate.errors import StateMismatchError, UnsupportedTypeError
from runstate.format.tensors import NumpyCodec, TensorBlob, TensorCodec
from runstate.registry import Registration

__all__ = [
    "ADAPTER",
    "TensorflowAdapter",
    "global_rng_state",
    "iterator_state",
    "module_variables",
    "pipeline",
    "prepare",
    "resume_iterator",
    "set_global_rng_state",
    "set_iterator_state",
    "shuffle_seeds",
    "snapshot",
    "snapshot_iterator_state",
]

_NUMPY = NumpyCodec()


# -- state items ----------------------------------------------------------------------------


class _Position(np.ndarray):
    """A live iterator's serialized position: its size changes as it moves, so it takes the
    stored one (:meth:`TensorflowAdapter.is_lazy`) instead of being a shape mismatch."""


def _copy(value: Any) -> np.ndarray:
    return np.array(value.numpy(), copy=True)


@dataclasses.dataclass
class _Session:
    """What one save or restore in progress knows (:func:`prepare` starts a new one).

    ``group``: the iterators and generators of the save, read together when the first of them
    is encoded; ``values``: what was read for them, by object id (with the object, so a reused
    id is not mistaken for it); ``restored``: the generators the restore has set, with their
    states, set again after each iterator, whose old background threads may draw from them
    until it is replaced; ``rng_saved``: whether the save holds ``runstate.RNG()`` (which saves
    TF's global generator).
    """

    group: list[weakref.ref[Any]] = dataclasses.field(default_factory=list)
    values: dict[int, tuple[Any, Any]] = dataclasses.field(default_factory=dict)
    restored: list[tuple[Any, Any]] = dataclasses.field(default_factory=list)
    rng_saved: bool = False


# The session of the save or restore in progress in this thread (a context variable: a save in
# another thread, or an asyncio task, has its own; a new thread starts with none).
_SESSION: contextvars.ContextVar[_Session] = contextvars.ContextVar("runstate_tensorflow_session")


def _session() -> _Session:
    """The session in progress, or an empty one (not kept) outside any save or restore."""
    return _SESSION.get(None) or _Session()


def prepare(leaves: list[Any], *, saving: bool) -> None:
    """Get ready for a save (:func:`snapshot`) or a restore of a state's ``leaves``."""
    if saving:
        snapshot(leaves)
    else:
        _SESSION.set(_Session())


def snapshot(leaves: list[Any]) -> None:
    """Note the tf.data iterators and tf.random.Generators of a state about to be saved.

    A ``map`` that draws from a generator runs ahead in tf.data's background threads
    (``prefetch``, parallel ``map``): an element drawn between reading the iterator and
    reading the generator would be drawn twice, or never, by a resumed run. So when the
    encoder asks for the first of them, all are read at one instant (:func:`_read_together`).
    Called before every ``save`` (``runstate.adapters.data.prepare``), due or not: reading
    waits until a save really encodes them.
    """
    from runstate.rng import RNG

    session = _Session(rng_saved=any(isinstance(x, RNG) for x in leaves))
    group = [x for x in leaves if isinstance(x, (_owned_iterator(), tf.random.Generator))]
    # A Stateful whose state_dict reads an iterator (runstate.keras.Checkpoint's input position)
    # names it, so that it is read with the generators too (:func:`snapshot_iterator_state`).
    hooked = (getattr(x, "runstate_tf_iterator", None) for x in leaves)
    group.extend(x for x in hooked if isinstance(x, _owned_iterator()))
    if any(isinstance(x, _owned_iterator()) for x in group):
        session.group = [weakref.ref(x) for x in group]
    _SESSION.set(session)


def _read_together(session: _Session, objs: list[Any], *, attempts: int = 200) -> None:
    """Serialize the iterators, read the generators, serialize the iterators again, until
    nothing moved in between (background stages stop when their buffers are full).

    Raises:
        UnsupportedTypeError: the iterators kept moving for ``attempts`` tries.
    """
    failed: dict[int, tuple[Any, Any]] = {}
    generators = [x for x in objs if isinstance(x, tf.random.Generator)]
    iterators = []
    for it in (x for x in objs if isinstance(x, _owned_iterator())):
        try:  # an iterator that cannot be saved raises when it is encoded, not when a generator is
            _iterator_value(it)  # its own checks first
            _check_generators_saved(it, generators, rng_saved=session.rng_saved)
            iterators.append(it)
        except UnsupportedTypeError as exc:
            failed[id(it)] = (it, exc)
    after = [_iterator_value(it) for it in iterators]
    gens: list[dict[str, Any]] = []
    if generators:  # without generators, one read is the instant
        for _ in range(attempts):
            before = after
            gens = [_generator_value(g) for g in generators]
            after = [_iterator_value(it) for it in iterators]
            if all(_same(x, y) for x, y in zip(before, after, strict=True)):
                break
        else:
            raise UnsupportedTypeError(
                "the tf.data iterators in the state kept moving while runstate read them together with the "
                "tf.random.Generators; save from the thread that draws from the iterators"
            )
    for obj, value in [*zip(iterators, after, strict=True), *zip(generators, gens, strict=True)]:
        session.values[id(obj)] = (obj, value)
    session.values.update(failed)


def _taken(obj: Any) -> Any:
    """The value of ``obj`` read with the rest of its group, or None when it is in none."""
    session = _session()
    if session.group and any(ref() is obj for ref in session.group):
        objs = [x for x in (ref() for ref in session.group) if x is not None]
        session.group = []
        _read_together(session, objs)
    found = session.values.pop(id(obj), None)
    if found is None or found[0] is not obj:
        return None
    if isinstance(found[1], UnsupportedTypeError):
        raise found[1]
    return found[1]


def _drawn_handles(iterator: Any) -> list[tuple[Any, str]]:
    """The resource handles a pipeline's functions draw random numbers from (the state
    variables of ``tf.random.Generator``), with the drawing op's name."""
    out: list[tuple[Any, str]] = []
    for ds in stages(iterator):
        for value in vars(ds).values():
            fn = getattr(value, "function", None)
            graph = getattr(fn, "graph", None)
            if graph is None:
                continue
            external = {internal.op.name: ext for ext, internal in graph.captures}
            for node in graph.as_graph_def().node:
                if node.op in GENERATOR_OPS and node.input:
                    handle = external.get(node.input[0].lstrip("^").split(":")[0])
                    if handle is not None:
                        out.append((handle, f"{node.op} ({node.name})"))
    return out


def _check_generators_saved(iterator: Any, generators: list[Any], *, rng_saved: bool) -> None:
    """Refuse an iterator whose ``map`` draws from a ``tf.random.Generator`` the save leaves out.

    Raises:
        UnsupportedTypeError: naming the op; the fix is to save that generator as an item.
    """
    from tensorflow.python.ops import stateful_random_ops

    saved = [g.state.handle for g in generators]
    glob = stateful_random_ops.global_generator
    if rng_saved and glob is not None:
        saved.append(glob.state.handle)
    for handle, op in _drawn_handles(iterator):
        if not any(handle is h for h in saved):
            raise UnsupportedTypeError(
                f"a tf.data map draws from a tf.random.Generator ({op}) that is not in the saved state: the "
                "iterator's position is saved without the generator's, so a resumed run would draw other "
                "numbers. Fix: save the generator as its own item next to the iterator "
                '({"data": iterator, "augment": generator}; the global one: runstate.RNG())'
            )


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _owned_iterator() -> type:
    from tensorflow.python.data.ops.iterator_ops import OwnedIterator

    cls: type = OwnedIterator
    return cls


def _iterator_value(iterator: Any) -> dict[str, Any]:
    # The shuffle seeds and the pipeline's fingerprint name the key: a dataset rebuilt with other
    # seeds (only a global seed, and other random ops created before it) or parameters is a key
    # mismatch, found before anything changes.
    seeds, fingerprint = pipeline(iterator)
    return {_position_key(seeds, fingerprint): iterator_state(iterator).view(_Position)}


def _iterator_get(iterator: Any) -> dict[str, Any]:
    found = _taken(iterator)
    return found if found is not None else _iterator_value(iterator)


def _position_key(seeds: list[int], fingerprint: str) -> str:
    return f"position (pipeline {fingerprint}, shuffle seeds {seeds})"


def snapshot_iterator_state(iterator: Any) -> np.ndarray:
    """:func:`iterator_state` of ``iterator``, read at one instant with the ``tf.random.Generator``
    items of the save in progress when a Stateful of that save names it (``runstate_tf_iterator``).

    Raises:
        UnsupportedTypeError: as :func:`iterator_state`.
    """
    found = _taken(iterator)
    if found is None:
        return iterator_state(iterator)
    (value,) = found.values()
    return np.asarray(value).view(np.ndarray)


def resume_iterator(iterator: Any, state: np.ndarray) -> None:
    """:func:`set_iterator_state`, then set again the ``tf.random.Generator`` items the last
    restore set: until now the iterator's background threads (or a batch drawn from it) may
    have drawn from them.

    Raises:
        as :func:`set_iterator_state`.
    """
    set_iterator_state(iterator, state)
    # The restored iterator starts its threads at its first element.
    for gen, gen_state in _session().restored:
        gen.state.assign(gen_state)


def _iterator_set(iterator: Any, state: dict[str, Any]) -> None:
    (value,) = state.values()
    resume_iterator(iterator, np.asarray(value))


def _generator_value(gen: Any) -> dict[str, Any]:
    return {"state": _copy(gen.state), "algorithm": int(gen.algorithm)}


def _generator_get(gen: Any) -> dict[str, Any]:
    found = _taken(gen)
    return found if found is not None else _generator_value(gen)


def _generator_set(gen: Any, state: dict[str, Any]) -> None:
    if int(state["algorithm"]) != int(gen.algorithm):
        raise StateMismatchError(
            f"a tf.random.Generator of algorithm {state['algorithm']} is stored, the live one uses {int(gen.algorithm)}"
        )
    gen.state.assign(state["state"])
    _session().restored.append((gen, state["state"]))


def _variable_set(var: Any, state: Any) -> None:
    var.assign(state)


def module_variables(module: Any) -> dict[str, Any]:
    """The variables of a ``tf.Module``, by attribute path (``"layers/0/w"``).

    Raises:
        UnsupportedTypeError: the module holds a Keras 3 layer or variable, which
            ``tf.Module`` does not walk into (its weights would be silently left out).
    """
    keras = sys.modules.get("keras")
    kinds: tuple[type, ...] = (tf.Variable,)
    if keras is not None:
        kinds = (tf.Variable, keras.Layer, keras.Variable, keras.optimizers.Optimizer)
    found = module._flatten(predicate=lambda v: isinstance(v, kinds), with_path=True)
    out = {"/".join(str(p) for p in path): v for path, v in found}
    for key, value in out.items():
        if not isinstance(value, tf.Variable):
            raise UnsupportedTypeError(
                f"the tf.Module {type(module).__qualname__} holds a Keras {type(value).__qualname__} at {key!r}: "
                "tf.Module does not see Keras 3 weights, so they would be left out. Fix: save the Keras part "
                "as its own item, runstate.keras.State(layer_or_model) (an optimizer: the optimizer itself)"
            )
    return out


def _module_get(module: Any) -> dict[str, Any]:
    return {k: _copy(v) for k, v in module_variables(module).items()}


def _assign_all(variables: dict[str, Any], state: dict[str, Any]) -> None:
    for key, var in variables.items():
        var.assign(state[key])


def _optimizer_variables(opt: Any) -> dict[str, Any]:
    # By position, as runstate.keras.State matches them: the names Keras derives from the
    # model's variables differ between processes that build layers in another order.
    return {str(i): v for i, v in enumerate(opt.variables)}


def _keras_numpy(variable: Any) -> np.ndarray:
    import keras

    return np.array(keras.ops.convert_to_numpy(variable.value), copy=True)


def _optimizer_get(opt: Any) -> dict[str, Any]:
    return {k: _keras_numpy(v) for k, v in _optimizer_variables(opt).items()}


def _registrations() -> list[tuple[type, Registration]]:
    def reg(cls: type, get: Callable[[Any], Any], put: Callable[[Any, Any], Any]) -> tuple[type, Registration]:
        return cls, Registration(cls, get, put)

    return [
        reg(tf.Variable, _copy, _variable_set),
        reg(tf.random.Generator, _generator_get, _generator_set),
        reg(_owned_iterator(), _iterator_get, _iterator_set),
        reg(tf.Module, _module_get, lambda m, s: _assign_all(module_variables(m), s)),
    ]


class TensorflowCodec:
    """Codec for ``tf.Tensor`` values (eager tensors), stored like NumPy arrays."""

    lib = "tensorflow"

    def to_blob(self, value: Any, where: str) -> TensorBlob:
        if not hasattr(value, "numpy"):
            raise UnsupportedTypeError(
                f"{where}: a symbolic tf.Tensor (inside tf.function) has no value; save outside it"
            )
        blob = _NUMPY.to_blob(np.array(value.numpy(), copy=True), where)
        return TensorBlob(blob.dtype, blob.shape, blob.nbytes, self.lib, blob.read, blob.meta)

    def from_bytes(self, data: np.ndarray, dtype: str, shape: tuple[int, ...], meta: dict[str, Any]) -> Any:
        return tf.constant(np.asarray(_NUMPY.from_bytes(data, dtype, shape, meta)))


CODEC = TensorflowCodec()


class TensorflowAdapter(Adapter):
    """TensorFlow: tensors, variables, modules, generators, tf.data iterators, Keras optimizers."""

    name = "tensorflow"
    lib = "tensorflow"

    def __init__(self) -> None:
        self._registrations = _registrations()

    def tensor_codec(self, value: Any) -> TensorCodec | None:
        return CODEC if isinstance(value, tf.Tensor) else None

    def prepare_leaves(self, leaves: list[Any], *, saving: bool) -> None:
        prepare(leaves, saving=saving)

    def codec(self) -> TensorCodec | None:
        return CODEC

    def versions(self) -> dict[str, str]:
        return {"tensorflow": str(tf.__version__)}

    def registration(self, cls: type) -> Registration | None:
        if callable(getattr(cls, "state_dict", None)) and callable(getattr(cls, "load_state_dict", None)):
            return None  # a Stateful (a tf.Module with its own state_dict) keeps its own convention
        for base, found in self._registrations:
            if issubclass(cls, base):
                return Registration(cls, found.get_state, found.set_state)
        keras = sys.modules.get("keras")
        if keras is not None and issubclass(cls, keras.optimizers.Optimizer):
            return Registration(cls, _optimizer_get, lambda o, s: _assign_all(_optimizer_variables(o), s))
        return None

    def is_lazy(self, value: Any) -> bool:
        return isinstance(value, _Position)

    def rng_state(self) -> Any:
        return global_rng_state()

    def set_rng_state(self, state: Any) -> None:
        set_global_rng_state(state)


# -- global random state --------------------------------------------------------------------


def global_rng_state() -> dict[str, Any]:
    """TensorFlow's global random state (parts nothing has set yet are None).

    ``tf.random.set_seed(s)`` seeds a Python ``random.Random`` from which every op created
    without a seed draws its op seed (``shuffle()``, ``tf.random.uniform(...)``, layer
    initializers), so the seeds of the ops a resumed run creates follow the saved run's. The
    global ``tf.random.Generator`` (``tf.random.get_global_generator()``) is included once it
    exists. Not included, because TensorFlow keeps it inside op kernels: how far each stateful
    random op (``tf.random.uniform`` and the like) has advanced; use a ``tf.random.Generator``
    item or the stateless ops for randomness that must resume exactly.
    """
    from tensorflow.python.eager import context
    from tensorflow.python.ops import stateful_random_ops

    ctx = context.context()
    seed, rng = ctx._seed, getattr(ctx, "_rng", None)
    gen = stateful_random_ops.global_generator
    state: dict[str, Any] = {"seed": None, "op_seeds": None, "global_generator": None}
    if seed is not None and rng is not None:
        version, internal, gauss = rng.getstate()
        state["seed"] = int(np.asarray(seed))
        state["op_seeds"] = [version, np.asarray(internal, dtype=np.uint32), gauss]
    if gen is not None:
        state["global_generator"] = _generator_value(gen)
    return state


def set_global_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`global_rng_state` returned (the global generator in place)."""
    from tensorflow.python.eager import context

    seed = state.get("seed")
    if seed is not None:
        ctx = context.context()
        ctx._set_global_seed(int(seed))  # also clears the kernel cache, as tf.random.set_seed does
        op_seeds = state.get("op_seeds")
        if op_seeds is not None:
            version, internal, gauss = op_seeds
            ctx._rng.setstate((int(version), tuple(int(x) for x in np.asarray(internal)), gauss))
    stored = state.get("global_generator")
    if stored is not None:
        gen = tf.random.get_global_generator()
        if int(stored["algorithm"]) == int(gen.algorithm):
            gen.state.assign(np.asarray(stored["state"]))
        else:
            tf.random.set_global_generator(
                tf.random.Generator.from_state(np.asarray(stored["state"]), int(stored["algorithm"]))
            )


ADAPTER = TensorflowAdapter()
