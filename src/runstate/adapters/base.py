"""What a framework adapter provides to the framework-free core.

The core (format, storage, the save pipeline, restore) never names torch, jax or keras: it
asks the adapters that are *active*, i.e. whose framework module the program has already
imported (``runstate.adapters`` finds them lazily by module name, the way fsspec's
``known_implementations`` finds a filesystem by protocol). An adapter is one object,
``ADAPTER``, in its own module; it subclasses :class:`Adapter` and overrides only what its
framework needs: every method here has a default that does nothing.

What an adapter can provide, by the moment the core asks:

* **saving**: recognise a tensor (:meth:`Adapter.tensor_codec`) or an object with state
  (:meth:`Adapter.object_codec`, e.g. a ``torch.Generator``), extra fields of an item
  (:meth:`Adapter.item_extras`), its version in the manifest (:meth:`Adapter.versions`),
  which values differ on every process (:meth:`Adapter.is_per_rank_value`), the process
  group (:meth:`Adapter.default_group`), a fast host copy (:meth:`Adapter.copy_bytes`), its
  global random state for ``runstate.RNG`` (:meth:`Adapter.rng_state`) and how its classes
  without ``state_dict`` are saved and restored in place (:meth:`Adapter.registration`);
* **loading**: rebuild tensors tagged with its ``lib`` (:meth:`Adapter.codec`), and objects of
  its ``object kinds`` (the registry imports the framework only when a checkpoint holds one);
* **restoring**: how a stateful object of the framework is checked and loaded in place
  (:meth:`Adapter.stateful_rule`, :meth:`Adapter.stateful_source`), lazy values whose shape is
  not known yet (:meth:`Adapter.is_lazy`), putting restored values on the live devices
  (:meth:`Adapter.place_like`), structural checks of replaced values
  (:meth:`Adapter.check_like`), and reading sharded items into the live placement
  (:meth:`Adapter.preload_sharded`).

Values that cannot exist on this machine (a CUDA generator without CUDA) decode to an
:class:`Unavailable`, which the core reports without knowing which framework made it.
Nothing here imports a framework.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from runstate.format.tensors import TensorBlob, TensorCodec
from runstate.format.tree import ObjectCodec, StatefulState

if TYPE_CHECKING:
    from runstate._impl.group import Group
    from runstate._impl.reader import CheckpointReader
    from runstate.registry import Registration

__all__ = [
    "Adapter",
    "BlockPlacement",
    "Problem",
    "RestoreContext",
    "StatefulRule",
    "Unavailable",
    "block_placement",
]

#: ``(path below the item, kind, message)``: one difference an adapter found.
Problem = tuple[tuple[Any, ...], str, str]

_PLACEMENT = "dtensor"  # the TensorBlob.meta key of a block of a sharded tensor


class RestoreContext(Protocol):
    """What a restore in progress offers an adapter that checks a stateful object."""

    @property
    def state(self) -> Mapping[str, Any]:
        """The live state being restored (every item)."""
        ...

    def add(self, path: tuple[Any, ...], kind: str, text: str) -> None:
        """Record a mismatch at ``path`` (starting with the item name)."""

    def rename_param(self, name: str | None) -> str | None:
        """A stored ``"item.key"`` name after the ``rename`` rules of its item."""
        ...


@dataclass(frozen=True)
class StatefulRule:
    """How the core checks and loads a stateful object of a framework.

    Attributes:
        check_class: refuse the state of another class (False: checked by its keys, shapes
            and dtypes instead, e.g. a torch module under a DDP or ``torch.compile`` wrapper).
        compare_kinds: also report a tensor stored where the live object has a non-tensor.
        partial_load: ``load_state_dict(state, strict=...)`` loads what matches: mismatching
            keys are dropped and the rest is loaded (``strict=False``) instead of skipping it.
    """

    check_class: bool = True
    compare_kinds: bool = False
    partial_load: bool = False


@dataclass(frozen=True)
class Unavailable:
    """A stored value this machine cannot rebuild (a CUDA generator on a CPU-only machine).

    Restoring reports it (``strict=True``: an error; ``strict=False``: the live value is kept).

    Attributes:
        what: the value, in words (``"a torch.Generator on cuda:0"``).
        reason: why it cannot be rebuilt here, as a sentence.
    """

    what: str
    reason: str


@dataclass(frozen=True)
class BlockPlacement:
    """Where a block of a sharded tensor lies in the whole tensor.

    Attributes:
        shape: the whole tensor's shape.
        offsets: the block's offsets in it.
        owner: True on the one process that writes this block (of those holding a copy).
    """

    shape: list[int]
    offsets: list[int]
    owner: bool


def block_placement(blob: TensorBlob) -> BlockPlacement | None:
    """The placement of a blob that is one block of a sharded tensor, else None."""
    found = blob.meta.get(_PLACEMENT)
    if not isinstance(found, dict):
        return None
    return BlockPlacement(list(found["shape"]), list(found["offsets"]), bool(found["owner"]))


def without_placement(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A blob's ``meta`` without its block placement (what is stored for the block)."""
    return {k: v for k, v in meta.items() if k != _PLACEMENT}


class Adapter(Protocol):
    """One framework's knowledge, behind the methods the core calls (all optional).

    Attributes:
        name: the adapter's name (``"torch"``).
        lib: the tag of the tensors its codec writes (``TensorEntry.lib``), or None.
        key_prefixes: what its wrappers prepend to state_dict keys (``"module."``).
    """

    name: str = ""
    lib: str | None = None
    #: prefixes its wrappers add to state_dict keys (DDP's ``module.``), for a restore's rename hints
    key_prefixes: tuple[str, ...] = ()

    # -- saving -------------------------------------------------------------------------
    def tensor_codec(self, value: Any) -> TensorCodec | None:
        """The codec for ``value`` when it is a tensor of this framework, else None."""
        return None

    def object_codec(self) -> ObjectCodec | None:
        """The codec of this framework's objects with state (generators, keys), if any."""
        return None

    def item_extras(self, name: str, value: Any, state: Mapping[str, Any]) -> dict[str, Any]:
        """Extra fields of item ``name``'s stored tree (e.g. an optimizer's parameter names)."""
        return {}

    def frozen_tensors(self, value: Any) -> frozenset[str]:
        """Names of the tensors of item ``value`` that training does not change (a model's
        parameters with ``requires_grad=False``): incremental saves write them to a file of their
        own and may skip hashing them while their version is unchanged."""
        return frozenset()

    def versions(self) -> dict[str, str]:
        """Versions recorded in the manifest (``{"torch": "2.13.0"}``)."""
        return {}

    def is_per_rank_value(self, value: Any) -> bool:
        """True for a value that differs on every process (a data loader)."""
        return False

    def default_group(self, group: Any) -> Group | None:
        """The process group to save with (``group`` one of this framework's, or None for the
        default one when initialized), or None when this framework has none."""
        return None

    def copy_bytes(self, dst: np.ndarray, src: memoryview) -> bool:
        """Copy ``src`` into ``dst`` (same size) faster than NumPy; False when it does not."""
        return False

    def prepare_leaves(self, leaves: list[Any], *, saving: bool) -> None:
        """Before a save (``saving``) or a restore: see every leaf of the state at once (e.g. to
        read a data iterator and the generators it draws from at one instant)."""
        return None

    def registration(self, cls: type) -> Registration | None:
        """How instances of ``cls``, a framework class without ``state_dict``, are saved and
        restored in place (a ``tf.Variable``, ``tf.Module``), or None (see :mod:`runstate.registry`)."""
        return None

    def rng_state(self) -> Any:
        """This framework's global random state, for :class:`runstate.RNG` (None: it has none)."""
        return None

    def set_rng_state(self, state: Any) -> None:
        """Set this framework's global random state from :meth:`rng_state`'s value."""
        return None

    # -- loading ------------------------------------------------------------------------
    def codec(self) -> TensorCodec | None:
        """The codec that rebuilds tensors tagged :attr:`lib`."""
        return None

    def empty_bytes(self, nbytes: int) -> np.ndarray | None:
        """A new 1-D uint8 array of ``nbytes`` to read a stored tensor of :attr:`lib` into, in memory
        that the tensor :meth:`codec` builds from it owns like any of this framework's tensors
        (None: NumPy's)."""
        return None

    # -- restoring ----------------------------------------------------------------------
    def is_lazy(self, value: Any) -> bool:
        """True for a value whose shape is not known yet (takes the stored shape)."""
        return False

    def stateful_rule(self, obj: Any) -> StatefulRule | None:
        """How a stateful object of this framework is checked and loaded; None: not one."""
        return None

    def stateful_source(self, obj: Any, stored: StatefulState, path: tuple[Any, ...], ctx: RestoreContext) -> Any:
        """The state to load into ``obj`` (e.g. an optimizer's, matched by parameter name);
        problems go to ``ctx``. Returns ``stored.state`` when there is nothing to adapt."""
        return stored.state

    def place_like(self, stored: Any, template: Any) -> Any:
        """``stored`` on the device (or sharding) of the live value it replaces."""
        return stored

    def adopt_restored(self, obj: Any, state: Any, adopted: set[int]) -> None:
        """Phase two, just before ``obj.load_state_dict(state)``: let ``obj``'s live tensors take over
        the memory of the restored (verified) tensors where that cannot be told apart from copying
        into them (saves a copy). ``adopted`` holds the data pointers of the restored buffers taken
        so far in this restore: a buffer is taken once."""
        return None

    def check_like(self, template: Any, restored: Any) -> list[Problem]:
        """Differences a replaced value must not have (structure, shapes, dtypes)."""
        return []

    def preload_sharded(
        self, reader: CheckpointReader, item: str, stored_item: str, value: Any, group: Group
    ) -> dict[str, Any]:
        """Read the sharded tensors of ``stored_item`` into the live placement of ``value``.

        Collective: every process calls it for the same items in the same order.
        """
        return {}
