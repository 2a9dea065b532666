"""Framework adapters, found lazily by module name.

:data:`KNOWN_ADAPTERS` maps a framework's module name to the adapter that knows it (the way
fsspec's ``known_implementations`` maps a protocol to a filesystem class). An adapter is
*active* when its framework module is in ``sys.modules``: if the program has not imported a
framework, none of its values can be in the state, so it is never imported here just to
check. Loading is the exception: a checkpoint that holds torch tensors or a JAX key imports
that framework when it is read (and says which package to install when it is missing).

The functions below are what the core calls; each asks the active adapters in order. A
third-party framework plugs in with :func:`register_adapter`, without touching the core.
See :mod:`runstate.adapters.base` for the protocol.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from runstate.adapters.base import (
    Adapter,
    BlockPlacement,
    RestoreContext,
    StatefulRule,
    Unavailable,
    block_placement,
    without_placement,
)
from runstate.errors import CheckpointConfigError, UnsupportedTypeError
from runstate.format.tensors import TensorBlob, TensorCodec
from runstate.format.tree import CoreObjects, ObjectCodec, StatefulState
from runstate.registry import registry as default_registry

if TYPE_CHECKING:
    from runstate._impl.group import Group
    from runstate._impl.reader import CheckpointReader
    from runstate.registry import Registration

__all__ = [
    "KNOWN_ADAPTERS",
    "REGISTRATIONS",
    "Adapter",
    "AdapterSpec",
    "BlockPlacement",
    "FrameworkRegistrations",
    "Unavailable",
    "active_adapters",
    "adopt_restored",
    "block_placement",
    "check_like",
    "codec_for_lib",
    "copy_bytes",
    "default_group",
    "empty_bytes",
    "find_codec",
    "framework_versions",
    "is_lazy",
    "is_per_rank_value",
    "is_sharded_blob",
    "item_extras",
    "key_prefixes",
    "object_codecs",
    "place_like",
    "preload_sharded",
    "prepare_loaders",
    "register_adapter",
    "registration",
    "rng_states",
    "set_rng_state",
    "stateful_rule",
    "stateful_source",
    "unavailable",
    "without_placement",
]


@dataclass(frozen=True)
class AdapterSpec:
    """Where an adapter lives, and what the registry must know without importing it.

    Attributes:
        target: ``"package.module"`` exposing ``ADAPTER``, or the adapter object itself.
        lib: the tag of the tensors it rebuilds (loading imports it for those).
        objects: the object kinds it rebuilds, each with its description in words.
        install: the package to install when a checkpoint needs it and it is missing.
    """

    target: str | Adapter
    lib: str | None = None
    objects: Mapping[str, str] = field(default_factory=dict)
    install: str = ""


#: Framework module name -> its adapter, in the order the core asks them.
KNOWN_ADAPTERS: dict[str, AdapterSpec] = {
    "numpy": AdapterSpec("runstate.adapters.numpy", lib="numpy"),
    "torch": AdapterSpec(
        "runstate.adapters.torch", lib="torch", objects={"torch.Generator": "a torch.Generator"}, install="torch"
    ),
    "torch.distributed": AdapterSpec("runstate.adapters.torch_dist"),
    "jax": AdapterSpec(
        "runstate.adapters.jax",
        lib="jax",
        objects={"jax.random.key": "a typed JAX PRNG key (jax.random.key)"},
        install="jax",
    ),
    "keras": AdapterSpec("runstate.adapters.keras"),
    "tensorflow": AdapterSpec("runstate.adapters.tensorflow", lib="tensorflow", install="tensorflow"),
}

_loaded: dict[str, Adapter] = {}


def register_adapter(module: str, spec: AdapterSpec | str | Adapter, *, clobber: bool = False) -> None:
    """Register the adapter of the framework whose module is named ``module``.

    Args:
        module: the framework's module name; the adapter is active once it is imported.
        spec: an :class:`AdapterSpec`, or just the adapter (or the name of its module, which
            exposes ``ADAPTER``).
        clobber: replace an adapter already registered for ``module``.

    Raises:
        CheckpointConfigError: ``module`` already has an adapter and ``clobber`` is False.
    """
    if module in KNOWN_ADAPTERS and not clobber:
        raise CheckpointConfigError(
            f"register_adapter({module!r}): an adapter is already registered for it; pass clobber=True to replace it"
        )
    global _active
    KNOWN_ADAPTERS[module] = spec if isinstance(spec, AdapterSpec) else AdapterSpec(spec)
    _loaded.pop(module, None)
    _active = None


def _load(module: str) -> Adapter:
    """The adapter of ``module`` (imports the adapter module, hence its framework)."""
    adapter = _loaded.get(module)
    if adapter is None:
        target = KNOWN_ADAPTERS[module].target
        if isinstance(target, str):
            found: Adapter = importlib.import_module(target).ADAPTER
            adapter = found
        else:
            adapter = target
        _loaded[module] = adapter
    return adapter


class _Active:
    """The active adapters for one state of the registry and of ``sys.modules``.

    The core asks the adapters several times per value (a save of 10,000 tensors asked
    70,000 times), so the answer is kept while what it depends on stays the same. That is
    checked at every call, cheaply: the same :data:`KNOWN_ADAPTERS` and loaded-adapter dicts
    (identity and size: :func:`register_adapter` also drops the answer); the same number of
    entries in ``sys.modules``; the same known modules with an entry there (a framework
    imported or removed); and, for every known module that had an entry, the same object there (one replaced, or marked missing
    with ``sys.modules[name] = None``, makes a new answer) and the same loaded adapter.
    """

    __slots__ = ("adapters", "known", "loaded", "modules", "n_known", "n_modules", "present")

    def __init__(self) -> None:
        self.known: dict[str, AdapterSpec] = KNOWN_ADAPTERS
        self.loaded: dict[str, Adapter] = _loaded
        self.n_known = len(KNOWN_ADAPTERS)
        # the known modules that have an entry in sys.modules: (name, the entry (None: marked
        # missing), its loaded adapter (None when inactive)); a copy of the registry's names,
        # since loading an adapter may register another one
        self.modules = tuple(
            (name, module, None if module is None else _load(name))
            for name in list(KNOWN_ADAPTERS)
            if name in sys.modules
            for module in (sys.modules[name],)
        )
        self.present = frozenset(name for name, _module, _adapter in self.modules)
        self.n_modules = len(sys.modules)  # after the adapters' own imports
        self.adapters = tuple(adapter for _name, _module, adapter in self.modules if adapter is not None)

    def current(self) -> bool:
        """True while nothing the answer depends on has changed."""
        modules, loaded = sys.modules, _loaded
        if (
            len(modules) != self.n_modules
            or self.known is not KNOWN_ADAPTERS
            or self.loaded is not loaded
            or len(KNOWN_ADAPTERS) != self.n_known
        ):
            return False
        for name, module, adapter in self.modules:
            if modules.get(name) is not module or (adapter is not None and loaded.get(name) is not adapter):
                return False
        present = self.present  # a known framework imported while another module left (same count)
        return all((name in modules) == (name in present) for name in KNOWN_ADAPTERS)


_active: _Active | None = None


def _active_tuple() -> tuple[Adapter, ...]:
    global _active
    active = _active
    if active is None or not active.current():
        active = _active = _Active()
    return active.adapters


def active_adapters() -> Iterator[Adapter]:
    """The adapters whose framework the program has imported, in registry order."""
    yield from _active_tuple()


# -- saving ---------------------------------------------------------------------------------


def find_codec(value: Any) -> TensorCodec | None:
    """The codec for a tensor value, or None when ``value`` is not a tensor."""
    for adapter in _active_tuple():
        codec = adapter.tensor_codec(value)
        if codec is not None:
            return codec
    return None


def item_extras(name: str, value: Any, state: Mapping[str, Any]) -> dict[str, Any]:
    """Extra fields for the stored tree of item ``name`` (today: an optimizer's ``param_names``,
    which lets a changed model keep matching its moments)."""
    extras: dict[str, Any] = {}
    for adapter in _active_tuple():
        extras.update(adapter.item_extras(name, value, state))
    return extras


def frozen_tensors(value: Any) -> frozenset[str]:
    """Names of the tensors of an item that its framework says training leaves unchanged."""
    found: frozenset[str] = frozenset()
    for adapter in _active_tuple():
        found |= adapter.frozen_tensors(value)
    return found


def framework_versions() -> dict[str, str]:
    """The versions of the active frameworks recorded in a manifest (``{"torch": ...}``)."""
    versions: dict[str, str] = {}
    for adapter in _active_tuple():
        versions.update(adapter.versions())
    return versions


def is_per_rank_value(value: Any) -> bool:
    """True for a value each process saves for itself because a framework says so (a data loader)."""
    return any(adapter.is_per_rank_value(value) for adapter in _active_tuple())


def default_group(group: Any) -> Group | None:
    """The process group a framework offers: ``group`` (one of its process groups) wrapped, or
    its default group when initialized; None for a single process.

    Raises:
        CheckpointConfigError: ``group`` is given but no imported framework knows it.
    """
    for adapter in _active_tuple():
        found = adapter.default_group(group)
        if found is not None:
            return found
    if group is not None:
        raise CheckpointConfigError(
            f"group={group!r} is neither a runstate Group nor a process group of an imported framework"
        )
    return None


def copy_bytes(dst: np.ndarray, src: memoryview) -> None:
    """Copy ``src`` into the uint8 array ``dst`` of the same size (several threads when a
    framework offers it, e.g. torch for large buffers)."""
    if not dst.nbytes:
        return
    for adapter in _active_tuple():
        if adapter.copy_bytes(dst, src):
            return
    np.copyto(dst, np.frombuffer(src, dtype=np.uint8))


def is_sharded_blob(blob: TensorBlob) -> bool:
    """True for a blob that is one process's block of a sharded tensor (a DTensor)."""
    return block_placement(blob) is not None


class FrameworkRegistrations:
    """``runstate.registry`` first, then the imported frameworks' classes without ``state_dict``
    (a ``tf.Variable``, ``tf.Module``): what the save and restore paths look classes up in."""

    def get(self, type_: type, /) -> Registration | None:
        """The registration of ``type_`` (the user's, else its framework adapter's), or None."""
        found = default_registry.get(type_)
        if found is None and type_.__module__ != "builtins":
            found = registration(type_)
        return found


#: The lookup the save and restore paths use (stateless: it reads ``runstate.registry`` and the
#: active adapters at each call).
REGISTRATIONS = FrameworkRegistrations()


def registration(cls: type) -> Registration | None:
    """How an imported framework saves and restores instances of ``cls`` in place (a
    ``tf.Module``), or None; consulted by :meth:`runstate.registry.Registry.get`."""
    for adapter in _active_tuple():
        found = adapter.registration(cls)
        if found is not None:
            return found
    return None


def rng_states() -> dict[str, Any]:
    """The global random states of the imported frameworks, by module name (``runstate.RNG``)."""
    states: dict[str, Any] = {}
    for module in list(KNOWN_ADAPTERS):
        if sys.modules.get(module) is not None:
            state = _load(module).rng_state()
            if state is not None:
                states[module] = state
    return states


def set_rng_state(module: str, state: Any) -> None:
    """Set the global random state of framework ``module`` (imports it: the run that saved used it).

    A name no adapter knows is ignored (a newer runstate's framework).
    """
    if module in KNOWN_ADAPTERS:
        _load(module).set_rng_state(state)


# -- loading --------------------------------------------------------------------------------


def codec_for_lib(lib: str) -> TensorCodec | None:
    """The codec that rebuilds tensors tagged ``lib``; None when its framework is missing
    (imports the framework: the checkpoint holds its tensors)."""
    for module, spec in KNOWN_ADAPTERS.items():
        if spec.lib == lib:
            try:
                return _load(module).codec()
            except ImportError:
                return None
    return None


def empty_bytes(lib: str, nbytes: int) -> np.ndarray:
    """A new uint8 array of ``nbytes`` to read a stored tensor tagged ``lib`` into (its framework's
    memory when it offers it: see :meth:`Adapter.empty_bytes`)."""
    for module, spec in KNOWN_ADAPTERS.items():
        if spec.lib == lib:
            try:
                found = _load(module).empty_bytes(nbytes)
            except ImportError:
                found = None
            if found is not None:
                return found
            break
    return np.empty(nbytes, dtype=np.uint8)


class _WhenLoaded:
    """Rebuilds one adapter's objects, importing its framework only when a checkpoint holds one."""

    def __init__(self, module: str, spec: AdapterSpec) -> None:
        self.module = module
        self.spec = spec

    def get(self, value: Any) -> tuple[str, Any, dict[str, Any]] | None:
        return None

    def make(self, kind: str, state: Any, attrs: dict[str, Any]) -> Any:
        what = self.spec.objects.get(kind)
        if what is None:
            raise KeyError(kind)
        try:
            objects = _load(self.module).object_codec()
        except ImportError:
            raise UnsupportedTypeError(
                f"this checkpoint holds {what}; install {self.spec.install or self.module} to load it"
            ) from None
        if objects is None:
            raise KeyError(kind)
        return objects.make(kind, state, attrs)

    def copy_into(self, target: Any, source: Any) -> bool:
        return False


def object_codecs(*, for_loading: bool = False) -> list[ObjectCodec]:
    """Codecs for objects with state: the core's (Python and NumPy generators) and those of the
    active adapters; when loading, a stand-in for each other adapter imports its framework
    only if the checkpoint holds one of its objects."""
    from runstate.adapters.data import GeneratorObjects

    codecs: list[ObjectCodec] = [CoreObjects(), GeneratorObjects()]
    for module, spec in list(KNOWN_ADAPTERS.items()):
        if sys.modules.get(module) is not None:  # None: marked missing (sys.modules[name] = None)
            with contextlib.suppress(ImportError):
                objects = _load(module).object_codec()
                if objects is not None:
                    codecs.append(objects)
        elif for_loading and spec.objects:
            codecs.append(_WhenLoaded(module, spec))
    return codecs


def prepare_loaders(state: Any, *, saving: bool, require_exact: bool = False) -> None:
    """Make the data loaders of ``state`` resume exactly, or flag those that cannot (see
    ``runstate.adapters.data``)."""
    if isinstance(state, Mapping):
        from runstate.adapters import data

        data.prepare(state, saving=saving, require_exact=require_exact)


# -- restoring ------------------------------------------------------------------------------


def is_lazy(value: Any) -> bool:
    """True for a live value whose shape is not known yet (an uninitialized lazy parameter)."""
    return any(adapter.is_lazy(value) for adapter in _active_tuple())


def key_prefixes() -> tuple[str, ...]:
    """Prefixes the frameworks' wrappers add to state_dict keys (``"module."`` for DDP)."""
    return tuple(prefix for adapter in _active_tuple() for prefix in adapter.key_prefixes)


def unavailable(value: Any) -> Unavailable | None:
    """``value`` when it stands for a stored value this machine cannot rebuild, else None."""
    return value if isinstance(value, Unavailable) else None


def place_like(stored: Any, template: Any) -> Any:
    """A restored value on the device (or sharding) of the live value it replaces."""
    for adapter in _active_tuple():
        stored = adapter.place_like(stored, template)
    return stored


def adopt_restored(obj: Any, state: Any, adopted: set[int]) -> None:
    """Phase two, just before ``obj.load_state_dict(state)``: the frameworks' zero-copy step
    (see :meth:`Adapter.adopt_restored`)."""
    for adapter in _active_tuple():
        adapter.adopt_restored(obj, state, adopted)


def check_like(template: Any, restored: Any) -> list[tuple[tuple[Any, ...], str, str]]:
    """Differences between a live value and the value that replaces it, from every adapter."""
    problems: list[tuple[tuple[Any, ...], str, str]] = []
    for adapter in _active_tuple():
        problems.extend(adapter.check_like(template, restored))
    return problems


def preload_sharded(reader: CheckpointReader, item: str, stored_item: str, value: Any, group: Group) -> dict[str, Any]:
    """Sharded tensors of ``stored_item`` read into the live placement, by tensor name.

    Collective: every process calls it for the same items in the same order.
    """
    out: dict[str, Any] = {}
    for adapter in _active_tuple():
        out.update(adapter.preload_sharded(reader, item, stored_item, value, group))
    return out


def stateful_rule(obj: Any) -> StatefulRule:
    """How a stateful object is checked and loaded: its framework's rule, else the default
    (its class must match the stored one; loaded only when everything matches)."""
    for adapter in _active_tuple():
        rule = adapter.stateful_rule(obj)
        if rule is not None:
            return rule
    return StatefulRule()


def stateful_source(obj: Any, stored: StatefulState, path: tuple[Any, ...], ctx: RestoreContext) -> Any:
    """The state to load into ``obj``: adapted by its framework (an optimizer's, matched by
    parameter name), else ``stored.state``; problems go to ``ctx``."""
    for adapter in _active_tuple():
        source = adapter.stateful_source(obj, stored, path, ctx)
        if source is not stored.state:
            return source
    return stored.state
