"""``accelerate_state``: the state of a plain Accelerate loop, as one runstate state dict.

Why this module exists: ``accelerator.prepare`` wraps the optimizer, the scheduler and the data
loader, and the loop's next step also depends on the accelerator's own counter of micro-steps
(``accelerator.step``, which decides when ``accumulate`` syncs and steps). Saving the wrappers'
``state_dict`` misses that counter, and a prepared data loader re-created after a resume draws
its seed again. This module names every piece once: the unwrapped model, the torch optimizer
and scheduler inside accelerate's wrappers, the grad scaler, every RNG, the accelerator's
counters and the data position, so ``mgr.save(step, state)`` / ``mgr.restore(state)`` resume
the loop exactly. No file of accelerate's own format is written, and nothing is pickled.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.data_loader import DataLoaderShard
from torchdata.stateful_dataloader import StatefulDataLoader

import runstate
import runstate.torch
from runstate.errors import CheckpointConfigError


class AcceleratorCounters:
    """The accelerator's micro-step counter (``accelerator.step``), read by ``accumulate``."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def state_dict(self) -> dict[str, Any]:
        """The counter, as the next ``accumulate`` reads it."""
        return {"step": int(self.accelerator.step)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put the counter back."""
        self.accelerator.step = int(state["step"])


class PreparedLoader:
    """The position of a data loader prepared by accelerate with ``use_stateful_dataloader=True``.

    accelerate's ``DataLoaderShard`` wraps a torchdata ``StatefulDataLoader``; runstate makes
    that inner loader exact (worker RNGs, its generator, an iterator re-created without
    shifting the global RNG). This adds the shard's epoch counter (``iteration``, which it
    passes to the sampler's ``set_epoch`` at every new pass), one ahead when the saved pass had
    reached its end (the shard counts the pass only once the loop asks for the next batch).
    """

    def __init__(self, shard: Any, name: str) -> None:
        self.shard = shard
        base = runstate.torch.exact(shard.base_dataloader, name)
        if base.num_workers > 0:
            # accelerate asked the loader for its state when it wrapped it, which started worker
            # processes without runstate's worker hook; drop that iterator (the next pass starts
            # new workers, as the first pass would have).
            base.load_state_dict({})

    def state_dict(self) -> dict[str, Any]:
        """The shard's position and epoch counter."""
        state = dict(self.shard.state_dict())
        return {"iteration": int(self.shard.iteration), "loader": state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put the shard back where it was."""
        loader = dict(state["loader"])
        finished = bool(loader.get("_iterator_finished", False))
        self.shard.iteration = int(state["iteration"]) + (1 if finished else 0)
        self.shard.load_state_dict(loader)
        self.shard.dl_state_dict = loader


def _inner(wrapper: Any, attribute: str) -> Any:
    inner = getattr(wrapper, attribute, None)
    return inner if inner is not None and hasattr(inner, "state_dict") else wrapper


def build_state(accelerator: Any, parts: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """The body of :func:`runstate.hf.accelerate_state` (documented there): ``parts`` holds
    its ``model``, ``optimizer``, ``scheduler`` and ``dataloader`` arguments."""
    model, optimizer, scheduler, dataloader = (parts[k] for k in ("model", "optimizer", "scheduler", "dataloader"))
    state: dict[str, Any] = {
        "model": accelerator.unwrap_model(model),
        "rng": runstate.RNG(),
        "accelerator": AcceleratorCounters(accelerator),
    }
    if optimizer is not None:
        state["optimizer"] = _inner(optimizer, "optimizer")
    if scheduler is not None:
        state["scheduler"] = _inner(scheduler, "scheduler")
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        state["scaler"] = scaler
    if dataloader is not None:
        state["dataloader"] = _loader(dataloader)
    for name, value in extra.items():
        if name in state:
            raise CheckpointConfigError(f"accelerate_state: the item name {name!r} is taken; pick another")
        state[name] = value
    return state


def _loader(dataloader: Any) -> Any:
    if isinstance(dataloader, DataLoaderShard):
        if not getattr(dataloader, "use_stateful_dataloader", False):
            raise CheckpointConfigError(
                "accelerate_state: this data loader was prepared without use_stateful_dataloader, so its "
                "position cannot be saved; create the Accelerator with dataloader_config="
                "DataLoaderConfiguration(use_stateful_dataloader=True, use_seedable_sampler=True)"
            )
        base = dataloader.base_dataloader
        sampler = getattr(getattr(base, "batch_sampler", None), "sampler", None) or base.sampler
        if isinstance(sampler, torch.utils.data.RandomSampler) and not callable(getattr(sampler, "set_epoch", None)):
            raise CheckpointConfigError(
                "accelerate_state: this data loader shuffles with a plain RandomSampler, whose order a resume "
                "cannot reproduce; create the Accelerator with dataloader_config=DataLoaderConfiguration("
                "use_stateful_dataloader=True, use_seedable_sampler=True)"
            )
        return PreparedLoader(dataloader, "dataloader")
    if isinstance(dataloader, StatefulDataLoader):
        return dataloader
    if isinstance(dataloader, torch.utils.data.DataLoader):
        raise CheckpointConfigError(
            "accelerate_state: a torch DataLoader cannot resume its position; use a torchdata "
            "StatefulDataLoader (same arguments), or prepare it with use_stateful_dataloader=True"
        )
    raise CheckpointConfigError(
        f"accelerate_state: dataloader must be a StatefulDataLoader or a prepared one, got {type(dataloader).__qualname__}"
    )
