"""The state of a Keras 3 model, its optimizer, metrics and seed generators, as a Stateful.

Every value is a Keras variable, read as a NumPy array and assigned back in place, so a
restore works the same on every backend and compiled step functions (``tf.function``,
``torch.compile``) keep the variables they captured.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np

from runstate.errors import StateMismatchError

__all__ = ["State", "global_seed_generator"]


def _numpy(variable: Any) -> np.ndarray:
    """A copy of the variable's value (on CPU a backend may share memory that training changes)."""
    value = variable.value
    if hasattr(value, "detach") and str(value.dtype) != "torch.bfloat16":  # torch backend, directly
        out: np.ndarray = value.detach().cpu().numpy().copy()
        return out
    return np.array(keras.ops.convert_to_numpy(value), copy=True)


def global_seed_generator() -> Any:
    """The ``keras.random.SeedGenerator`` that ``keras.random.*`` calls without a ``seed`` use.

    Keras creates it on first use, seeding it with a draw from Python's ``random``; when it does
    not exist yet it is created here with the same draw, and Python's generator is put back, so
    that saving a run does not change its random streams.
    """
    from keras.src.random import seed_generator  # the global generator has no public accessor

    state = random.getstate()
    try:
        return seed_generator.global_seed_generator()
    finally:
        random.setstate(state)


class State:
    """A Stateful holding a Keras model, its optimizer, metrics and seed generators.

    Args:
        model: a built Keras model (call it on a batch, or ``model.build(...)``, first).
        optimizer: the optimizer; ``model.optimizer`` when None (a compiled model). It is
            built for the model's trainable variables if it has not been yet, so that a
            fresh process can restore into it before its first step.
        metrics: metric objects to save; ``model.metrics`` when None.
        seed_generators: ``keras.random.SeedGenerator`` objects used outside layers (the
            ones inside layers, e.g. for dropout, are part of the model's variables).
        global_seed_generator: also save Keras' global seed generator, the one that
            ``keras.random.*`` calls without a ``seed`` draw from (``keras.random.dropout(x,
            0.5)``). False for checkpoints written before runstate saved it.

    Variables are matched by position within each group (model, optimizer, metrics, seed
    generators), so the same architecture built in another process, whatever its
    auto-generated layer names, restores; a different one is a mismatch.

    Example:
        >>> state = {"model": runstate.keras.State(model, optimizer), "step": step}  # doctest: +SKIP
        >>> step = manager.restore(state) or 0                                      # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        optimizer: Any = None,
        *,
        metrics: Sequence[Any] | None = None,
        seed_generators: Sequence[Any] = (),
        global_seed_generator: bool = True,
    ) -> None:
        self.model = model
        self.optimizer = optimizer if optimizer is not None else getattr(model, "optimizer", None)
        self.metrics = metrics
        self.seed_generators = list(seed_generators)
        self.global_seed_generator = global_seed_generator

    def variables(self) -> dict[str, list[Any]]:
        """The Keras variables saved, by group."""
        groups: dict[str, list[Any]] = {"model": list(self.model.variables)}
        opt = self.optimizer
        if opt is not None:
            if not opt.built and self.model.built:
                opt.build(self.model.trainable_variables)
            groups["optimizer"] = list(opt.variables)
        metrics = self.model.metrics if self.metrics is None else self.metrics
        groups["metrics"] = [v for m in metrics for v in m.variables]
        groups["seed_generators"] = [g.state for g in self.seed_generators]
        if self.global_seed_generator:
            groups["global_seed_generator"] = [global_seed_generator().state]
        return groups

    def _by_key(self) -> dict[str, Any]:
        return {f"{group}.{i}": v for group, vs in self.variables().items() for i, v in enumerate(vs)}

    def state_dict(self) -> dict[str, Any]:
        """Every variable's value as a NumPy array: ``{"model.0": array, "optimizer.0": ...}``."""
        return {key: _numpy(v) for key, v in self._by_key().items()}

    def load_state_dict(self, state_dict: Mapping[str, Any], /) -> None:
        """Assign every stored value to its variable, after checking that all of them fit.

        Raises:
            StateMismatchError: a variable is missing, extra or of another shape (nothing is assigned).
        """
        live = self._by_key()
        if live.keys() != state_dict.keys():
            diff = sorted(live.keys() ^ state_dict.keys())
            hint = (
                "; a checkpoint written without Keras' global seed generator restores with "
                "State(..., global_seed_generator=False)"
                if diff == ["global_seed_generator.0"]
                else ""
            )
            raise StateMismatchError(f"the checkpoint and the live model differ in variables {diff[:8]}{hint}")
        for key, v in live.items():
            if tuple(np.shape(state_dict[key])) != tuple(v.shape):
                raise StateMismatchError(
                    f"{key} ({v.path}): shape {np.shape(state_dict[key])} stored, {tuple(v.shape)} live"
                )
        for key, v in live.items():
            v.assign(state_dict[key])

    def __repr__(self) -> str:
        return f"runstate.keras.State({self.model.name!r})"
