"""Exactly resumable data loading for PyTorch.

Why this exists: a shuffled ``StatefulDataLoader`` restores its position, but a resumed run
still differs from an uninterrupted one. Creating its iterator draws a seed from the global
torch RNG (the uninterrupted run drew it at the epoch start, the resumed run draws it again
at the resume point, so every later dropout mask shifts), and random augmentation inside
worker processes restarts from a fresh worker seed. Three small pieces fix that:

* :class:`ResumableSampler` shuffles each epoch from ``(seed, epoch)`` alone and saves its
  position, so the order never depends on a global RNG.
* :class:`SeededDataset` seeds Python's ``random``, NumPy and torch from
  ``(seed, epoch, index)`` before loading each sample, so augmentation is a pure function of
  the sample, whatever the worker count, prefetching or resume point. In the main process it
  restores the global generators afterwards, so dropout streams are untouched.
* :func:`resumable_loader` builds a ``StatefulDataLoader`` from both, with its own
  generator, so iterating never draws from the global torch RNG.

This module imports torch and torchdata; import it explicitly (``import runstate.torch``).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

__all__ = ["ResumableSampler", "SampleIndex", "SeededDataset", "resumable_loader"]


class SampleIndex(int):
    """A dataset index that also carries the epoch it was drawn in.

    It is an ``int``, so any map-style dataset accepts it; :class:`SeededDataset` reads
    ``epoch`` to derive per-sample seeds.
    """

    epoch: int

    def __new__(cls, index: int, epoch: int) -> SampleIndex:
        obj = super().__new__(cls, index)
        obj.epoch = epoch
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        return (SampleIndex, (int(self), self.epoch))


class ResumableSampler(Sampler[int]):
    """A sampler whose order depends only on ``(seed, epoch)`` and whose position is saved.

    Each full pass advances the epoch by one. ``state_dict()`` holds the epoch and how many
    indices of it were handed out; ``StatefulDataLoader`` saves and restores it for you.

    Args:
        data_source: the dataset (or its length).
        shuffle: permute each epoch (with ``seed + epoch``); otherwise sequential.
        seed: the base seed of every epoch's permutation.
    """

    def __init__(self, data_source: Sized | int, *, shuffle: bool = True, seed: int = 0) -> None:
        self.num_samples = data_source if isinstance(data_source, int) else len(data_source)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return self.num_samples

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order: list[int] = torch.randperm(self.num_samples, generator=gen).tolist()
        return order

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        while self.position < self.num_samples:
            index = SampleIndex(order[self.position], self.epoch)
            self.position += 1
            yield index
        self.epoch += 1
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (as ``DistributedSampler.set_epoch``)."""
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        """The epoch, the position inside it, and the settings that define the order."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a saved position.

        Raises:
            ValueError: the saved order was defined by a different seed, shuffle flag or
                dataset length, so continuing would silently change the data order.
        """
        for key in ("seed", "shuffle", "num_samples"):
            if state_dict[key] != getattr(self, key):
                raise ValueError(
                    f"ResumableSampler: saved {key}={state_dict[key]!r} but this sampler has "
                    f"{key}={getattr(self, key)!r}; build the sampler with the run's settings"
                )
        self.epoch = int(state_dict["epoch"])
        self.position = int(state_dict["position"])


_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """SplitMix64 finalizer: a fast, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _seed_all(seed: int, epoch: int, index: int) -> None:
    """Seed Python's, NumPy's and torch's CPU generators from ``(seed, epoch, index)``."""
    h = _mix(_mix(_mix(seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64))
    random.seed(h)
    np.random.seed(h & 0xFFFFFFFF)
    torch.default_generator.manual_seed(_mix(h))


class SeededDataset(Dataset[Any]):
    """Wraps a map-style dataset so random augmentation is a function of the sample alone.

    Before ``dataset[index]`` it seeds Python's ``random``, NumPy's global RNG and torch's
    CPU RNG from ``(seed, epoch, index)``; ``epoch`` comes from a :class:`SampleIndex`
    (0 for a plain int). In the main process the previous global states are restored
    afterwards (once per batch, through ``__getitems__``); in a worker process the worker's
    own generators are simply reseeded.

    Args:
        dataset: the dataset to wrap.
        seed: the base seed.
    """

    def __init__(self, dataset: Dataset[Any], *, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _load(self, index: int) -> Any:
        _seed_all(self.seed, getattr(index, "epoch", 0), int(index))
        return self.dataset[int(index)]

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        """Load a batch; the DataLoader calls this instead of one ``__getitem__`` per sample."""
        if get_worker_info() is not None:
            return [self._load(i) for i in indices]
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            return [self._load(i) for i in indices]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


def resumable_loader(
    dataset: Dataset[Any],
    *,
    batch_size: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    **kwargs: Any,
) -> Any:
    """A torchdata ``StatefulDataLoader`` that resumes exactly, mid-epoch included.

    Put the loader in the saved state (``{"loader": loader, ...}``); after a restore, the
    remaining batches of the epoch, every later epoch's order, and all random augmentation
    are the same as in an uninterrupted run, for any ``num_workers``.

    Args:
        dataset: a map-style dataset.
        batch_size: samples per batch.
        shuffle: reshuffle every epoch (deterministically from ``seed``).
        seed: seeds the order and the per-sample augmentation RNGs.
        num_workers: worker processes.
        **kwargs: passed to ``StatefulDataLoader`` (``collate_fn``, ``drop_last``...);
            ``sampler``, ``shuffle`` and ``generator`` are set here.

    Returns:
        A ``torchdata.stateful_dataloader.StatefulDataLoader``.
    """
    from torchdata.stateful_dataloader import StatefulDataLoader

    for key in ("sampler", "batch_sampler", "generator"):
        if key in kwargs:
            raise TypeError(f"resumable_loader sets {key} itself; remove it from the arguments")
    with warnings.catch_warnings():
        # torchdata 0.11 calls the deprecated torch.set_vital in __init__; not the user's concern.
        warnings.filterwarnings("ignore", message=".*set_vital.*", category=UserWarning)
        return StatefulDataLoader(
            SeededDataset(dataset, seed=seed),
            batch_size=batch_size,
            sampler=ResumableSampler(dataset, shuffle=shuffle, seed=seed),  # type: ignore[arg-type]
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(seed),
            **kwargs,
        )
