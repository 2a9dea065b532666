"""``runstate.lightning.ExactResume``: what Lightning leaves out of a checkpoint for an exact resume.

Why this exists: resuming with ``trainer.fit(..., ckpt_path="last")`` restores the model,
the optimizers, the schedulers, the loop counters and (for a torchdata ``StatefulDataLoader``)
the position in the data, but not the random number generators: from the first step after the
resume, every dropout mask and every random augmentation differs from the run that was never
stopped. This callback stores the generators with each checkpoint and puts them back at the
point of the loop where the uninterrupted run was when it saved. It also corrects Lightning's
(2.6) restore of a checkpoint saved after an epoch's last batch, which counts that epoch twice.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from runstate.adapters import torch as _torch_adapter

__all__ = ["ExactResume"]

logger = logging.getLogger("runstate")


class ExactResume(Callback):  # type: ignore[misc]
    """A Lightning callback that makes ``fit(..., ckpt_path=...)`` continue bit-identically.

    Add it next to ``ModelCheckpoint``::

        trainer = pl.Trainer(plugins=[runstate.lightning.CheckpointIO()],
                             callbacks=[ModelCheckpoint(...), runstate.lightning.ExactResume()])

    Each checkpoint then also holds the Python, NumPy and torch (CPU and CUDA) random
    generators of the process, and the state of each training data loader's own
    ``torch.Generator``; resuming puts them back right before the first batch after the
    checkpoint is fetched. The position in the data is Lightning's own (it saves a
    ``StatefulDataLoader``'s ``state_dict``); a training loader without ``state_dict`` is
    reported with a WARNING, since a resume from the middle of an epoch then repeats or skips
    batches. A checkpoint saved after an epoch's last batch resumes with the right
    ``current_epoch`` (Lightning alone counts that epoch twice).

    It works with Lightning's own checkpoint IO too: its state is plain values and tensors.
    """

    def __init__(self) -> None:
        self._trainer: Any = None
        self._pending: dict[str, Any] | None = None
        self._warned: set[str] = set()

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Remember the trainer: ``state_dict`` reads its data loaders."""
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        """The random generators of this process and of the training data loaders."""
        state: dict[str, Any] = {"rng": _rng_state()}
        state["loader_generators"] = [
            loader.generator.get_state() if isinstance(getattr(loader, "generator", None), torch.Generator) else None
            for loader in self._train_loaders()
        ]
        return state

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Correct the loop state of a checkpoint saved after the last batch of an epoch.

        Lightning (2.6) restores such a checkpoint by counting the epoch as finished, and then
        finishes it a second time when the empty rest of the epoch runs: ``current_epoch``
        ends one too high. Marking the batch as not the last lets the epoch finish once, where
        the uninterrupted run finished it (with its ``on_train_epoch_end`` hooks).
        """
        fit_loop = (checkpoint.get("loops") or {}).get("fit_loop")
        if not isinstance(fit_loop, dict):
            return
        batches = fit_loop.get("epoch_loop.batch_progress")
        epochs = (fit_loop.get("epoch_progress") or {}).get("current")
        if not (isinstance(batches, dict) and isinstance(epochs, dict)):
            return
        mid_epoch = (
            epochs.get("started") == epochs.get("ready") and epochs.get("processed") == epochs.get("started", 0) - 1
        )
        if batches.get("is_last_batch") is True and mid_epoch:
            batches["is_last_batch"] = False

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved generators; they are set when training starts (``on_train_start``)."""
        self._pending = dict(state_dict)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Put the saved generators back, after Lightning re-created the data iterators."""
        self._warn_unresumable(trainer)
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if trainer.world_size > 1 and trainer.global_rank != 0:
            logger.warning(
                "runstate.lightning.ExactResume: the checkpoint holds the random generators of global rank 0 "
                "only; rank %d keeps its own, so its random numbers after this resume differ from an "
                "uninterrupted run",
                trainer.global_rank,
            )
        else:
            _set_rng_state(pending["rng"])
        saved = pending.get("loader_generators") or []
        loaders = self._train_loaders()
        for loader, generator_state in zip(loaders, saved, strict=False):
            if generator_state is not None and isinstance(getattr(loader, "generator", None), torch.Generator):
                loader.generator.set_state(generator_state)

    def _train_loaders(self) -> list[Any]:
        trainer = self._trainer
        if trainer is None:
            return []
        return _flatten(trainer.train_dataloader)

    def _warn_unresumable(self, trainer: Any) -> None:
        for i, loader in enumerate(_flatten(trainer.train_dataloader)):
            name = f"training data loader {i} ({type(loader).__qualname__})"
            if name in self._warned:
                continue
            if not (
                callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))
            ):
                self._warned.add(name)
                logger.warning(
                    "runstate.lightning.ExactResume: the %s has no state_dict/load_state_dict, so Lightning "
                    "cannot save its position: a resume from a checkpoint in the middle of an epoch starts the "
                    "epoch's data again. Use torchdata's StatefulDataLoader (same arguments as DataLoader)",
                    name,
                )


def _rng_state() -> dict[str, Any]:
    """The global generators, as the plain values and tensors ``torch.load(weights_only=True)`` reads.

    (``runstate.RNG`` holds NumPy arrays, which Lightning's default checkpoint IO could save but
    not load back; the callback also works with it.)
    """
    version, internal, gauss_next = random.getstate()
    legacy = np.random.get_state(legacy=True)
    assert isinstance(legacy, tuple)  # legacy=True: ("MT19937", key, pos, has_gauss, cached_gaussian)
    _, key, pos, has_gauss, cached = legacy
    torch_state = _torch_adapter.ADAPTER.rng_state()  # runstate.RNG's: {"cpu": tensor, "cuda": [tensor per device]}
    return {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch_state["cpu"],
        "cuda": torch_state["cuda"],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    key = np.asarray(npy["key"].numpy(), dtype=np.uint32)
    np.random.set_state(("MT19937", key, int(npy["pos"]), int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    # runstate.RNG's: CUDA states beyond this machine's devices are skipped with a WARNING
    _torch_adapter.ADAPTER.set_rng_state({"cpu": state["torch"], "cuda": state.get("cuda")})


def _flatten(loaders: Any) -> list[Any]:
    """The data loaders in what ``trainer.train_dataloader`` returns (one, or a list/dict of them)."""
    if loaders is None:
        return []
    if isinstance(loaders, dict):
        return [x for v in loaders.values() for x in _flatten(v)]
    if isinstance(loaders, (list, tuple)):
        return [x for v in loaders for x in _flatten(v)]
    return [loaders]
