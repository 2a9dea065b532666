"""Exact resume for the data loaders users already write: torchdata's ``StatefulDataLoader``.

Why this exists: a shuffled ``StatefulDataLoader`` saves its position, yet a run resumed from
it differs from an uninterrupted one, for three reasons found by running both side by side:

* **The loader's generator.** Creating an iterator first creates the sampler's iterator (which
  records the generator's state, then draws the epoch's permutation) and *then* draws the
  workers' ``base_seed`` from ``loader.generator``. After ``load_state_dict`` the sampler puts
  the generator back to the recorded state and redraws the permutation, so the ``base_seed``
  draw is lost: with ``generator=g`` every later epoch is shuffled differently.
* **The global torch RNG.** With ``generator=None`` that ``base_seed`` comes from the global
  torch RNG; the resumed run draws it a second time when it re-creates the iterator, so every
  later dropout mask and main-process augmentation shifts by one draw.
* **Worker RNGs.** torchdata keeps no random state of its worker processes: a resumed worker
  starts again from its epoch's seed, so augmentation in workers repeats the start of the
  epoch instead of continuing it.

What runstate does for a ``StatefulDataLoader`` item (installed by
:func:`runstate.adapters.data.prepare`, which
``CheckpointManager.save``/``restore`` and ``runstate.save``/``load`` call, or by
``runstate.torch.exact(loader)``): its saved state also holds the loader generator's state and
the sampler's epoch (``DistributedSampler.set_epoch``); a restore re-creates the iterator
at once, between saving and putting back the global torch RNG, then sets the generator; and a
``worker_init_fn`` wrapping the user's gives each worker's dataset a ``state_dict`` holding
the worker's Python, NumPy and torch RNG states, which torchdata already snapshots with every
batch and hands back to the resumed worker. Nothing global is patched: only the loader object
runstate was given, and the dataset copies inside its workers.

A ``torch.utils.data.DataLoader`` cannot resume; it is flagged (``runstate.adapters.data``).

Imported only when torch has been imported by the program.
"""

from __future__ import annotations

import logging
import random
import sys
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from runstate.adapters.data import HOOK, flag
from runstate.errors import UnsupportedTypeError

__all__ = ["WorkerInit", "exact", "handle"]

logger = logging.getLogger("runstate")

_EXTRA = "_runstate"  # key of runstate's additions in a saved StatefulDataLoader state
_RNG = "_runstate_worker_rng"  # key of a worker's RNG states in its dataset state
_OWN = "_runstate_dataset"  # the dataset's own state, when it has one


def _stateful_loader_class() -> type | None:
    module = sys.modules.get("torchdata.stateful_dataloader")
    if module is None:
        return None
    cls: type = module.StatefulDataLoader
    return cls


def _rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch CPU RNG states, as plain bytes and numbers."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {
        "python": np.asarray(internal, dtype=np.uint32).tobytes(),
        "python_version": int(version),
        "python_gauss": gauss,
        "numpy": np.asarray(keys, dtype=np.uint32).tobytes(),
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_gauss": float(cached),
        "torch": bytes(torch.get_rng_state().numpy().tobytes()),
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    internal = tuple(int(x) for x in np.frombuffer(state["python"], dtype=np.uint32))
    random.setstate((int(state["python_version"]), internal, state["python_gauss"]))
    keys = np.frombuffer(state["numpy"], dtype=np.uint32).copy()
    np.random.set_state(
        ("MT19937", keys, int(state["numpy_pos"]), int(state["numpy_has_gauss"]), float(state["numpy_gauss"]))
    )
    torch.set_rng_state(torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8))


class _WorkerRNG:
    """Installed as a worker's ``dataset.state_dict``/``load_state_dict``: torchdata snapshots a
    worker's dataset state after each batch, so the worker's RNG states travel with it."""

    def __init__(self, dataset: Any) -> None:
        own_save = getattr(dataset, "state_dict", None)
        own_load = getattr(dataset, "load_state_dict", None)
        stateful = callable(own_save) and callable(own_load)
        self.own_save: Callable[[], Any] | None = own_save if stateful else None
        self.own_load: Callable[[Any], Any] | None = own_load if stateful else None

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {_RNG: _rng_state()}
        if self.own_save is not None:
            out[_OWN] = self.own_save()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or _RNG not in state:  # saved before runstate carried worker RNGs
            if self.own_load is not None:
                self.own_load(state)
            return
        if self.own_load is not None and _OWN in state:
            self.own_load(state[_OWN])
        _set_rng_state(state[_RNG])


class WorkerInit:
    """The loader's ``worker_init_fn`` while runstate handles it: the user's, then the RNG carry.

    A module-level class, so a loader with a ``spawn`` or ``forkserver`` context can pickle it.
    """

    def __init__(self, user_fn: Callable[[int], Any] | None) -> None:
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        if self.user_fn is not None:
            self.user_fn(worker_id)
        info = torch.utils.data.get_worker_info()
        if info is None:
            return
        dataset: Any = info.dataset
        carry = _WorkerRNG(dataset)
        if isinstance(dataset, torch.utils.data.IterableDataset) and carry.own_save is None:
            return  # a dataset state would stop torchdata from fast-forwarding it: the resume would replay data
        try:
            dataset.state_dict = carry.state_dict
            dataset.load_state_dict = carry.load_state_dict
        except (AttributeError, TypeError):  # __slots__ or a frozen class: nothing to attach to
            pass


class _ExactLoader:
    """runstate's ``state_dict``/``load_state_dict`` for one ``StatefulDataLoader``.

    It holds the loader weakly: the loader holds it (as its ``state_dict``), and a cycle would
    keep a dropped loader's worker processes alive until the garbage collector ran.
    """

    def __init__(self, loader: Any, name: str) -> None:
        self._loader = weakref.ref(loader)
        self.name = name
        self.warned = False
        self.require_exact = False  # set before each save by handle()

    @property
    def loader(self) -> Any:
        loader = self._loader()
        if loader is None:
            raise ReferenceError(f"{self.name}: the data loader no longer exists")
        return loader

    def state_dict(self) -> dict[str, Any]:
        loader = self.loader
        state: dict[str, Any] = dict(type(loader).state_dict(loader))
        extra: dict[str, Any] = {}
        if isinstance(loader.generator, torch.Generator):
            extra["generator"] = loader.generator.get_state()
        epoch = getattr(loader.sampler, "epoch", None)
        if callable(getattr(loader.sampler, "set_epoch", None)) and type(epoch) is int:
            extra["sampler_epoch"] = epoch
        state[_EXTRA] = extra
        if (self.require_exact or not self.warned) and loader.num_workers > 0 and not _workers_carry_rng(state):
            message = (
                f"{self.name}: the random state of this loader's worker processes is not in the checkpoint "
                "(they were started before runstate saw the loader, its dataset takes no attributes, or it "
                "is an IterableDataset without state_dict/load_state_dict), so a resume from it repeats "
                "worker-side augmentation until the next epoch (with persistent workers, to the end). "
                "Fix: call mgr.restore(state) (or runstate.torch.exact(loader)) before the first "
                "iteration; give an IterableDataset state_dict/load_state_dict"
            )
            if self.require_exact:
                raise UnsupportedTypeError(f"{message}; require_exact=True refuses to save it")
            self.warned = True
            logger.warning("%s", message)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        loader = self.loader
        state = dict(state)
        extra = state.pop(_EXTRA, None) or {}
        if "sampler_epoch" in extra and callable(getattr(loader.sampler, "set_epoch", None)):
            loader.sampler.set_epoch(int(extra["sampler_epoch"]))
        saved_rng = torch.get_rng_state()
        try:
            type(loader).load_state_dict(loader, state)
            if state:
                # Re-create the iterator now, as the uninterrupted run did at the epoch start:
                # its draws must not shift the global RNG, and the generator is set after it.
                type(loader).state_dict(loader)
        finally:
            torch.set_rng_state(saved_rng)
        generator = extra.get("generator")
        if generator is not None and isinstance(loader.generator, torch.Generator):
            loader.generator.set_state(generator)


def _workers_carry_rng(state: Mapping[str, Any]) -> bool:
    snapshot = state.get("_snapshot")
    if not isinstance(snapshot, dict):
        return True
    workers = snapshot.get("_worker_snapshots") or {}
    for worker in workers.values():
        dataset_state = worker.get("dataset_state") if isinstance(worker, dict) else None
        if not (isinstance(dataset_state, dict) and _RNG in dataset_state):
            return False
    return True


def exact(loader: Any, name: str = "loader") -> Any:
    """Make a torchdata ``StatefulDataLoader`` resume exactly through runstate; returns it.

    runstate does this by itself for every loader in the state at ``mgr.restore(state)`` (also
    when there is nothing to restore) and at the first save; call it explicitly only when the
    loader is iterated before either. Idempotent.

    Args:
        loader: a ``torchdata.stateful_dataloader.StatefulDataLoader``.
        name: the item name used in log messages.

    Returns:
        ``loader`` itself.

    Raises:
        TypeError: ``loader`` is not a ``StatefulDataLoader``.
    """
    cls = _stateful_loader_class()
    if cls is None or not isinstance(loader, cls):
        raise TypeError(f"exact() needs a torchdata StatefulDataLoader, got {type(loader).__qualname__}")
    return _install(loader, name)


def _install(loader: Any, name: str) -> Any:
    if isinstance(loader.__dict__.get(HOOK), _ExactLoader):
        return loader
    hook = _ExactLoader(loader, name)
    loader.__dict__[HOOK] = hook
    loader.state_dict = hook.state_dict
    loader.load_state_dict = hook.load_state_dict
    if loader.num_workers > 0 and not isinstance(loader.worker_init_fn, WorkerInit):
        loader.worker_init_fn = WorkerInit(loader.worker_init_fn)
    return loader


def handle(value: Any, name: str, *, saving: bool, require_exact: bool) -> bool:
    """Handle ``value`` if it is a torch data loader; False when it is not one.

    A ``StatefulDataLoader`` gets :func:`exact`; a ``torch.utils.data.DataLoader`` is flagged
    (:func:`runstate.adapters.data.flag`).
    """
    stateful_cls = _stateful_loader_class()
    if stateful_cls is not None and isinstance(value, stateful_cls):
        exact(value, name)
        if saving:
            value.__dict__[HOOK].require_exact = require_exact
        return True
    if isinstance(value, torch.utils.data.DataLoader):
        flag(value, name, "torch.utils.data.DataLoader", saving=saving, require_exact=require_exact)
        return True
    return False
