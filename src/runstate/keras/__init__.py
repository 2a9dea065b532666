"""Keras 3: the state of a model, its optimizer and metrics, and a ``fit`` callback that
resumes mid-epoch exactly.

Why this exists: Keras' own ``BackupAndRestore`` restarts an interrupted epoch from its first
batch, so a resumed ``fit`` trains some batches twice and ends with other weights than an
uninterrupted one. :class:`Checkpoint` records the position inside the epoch and, on resume,
skips exactly the batches already trained on, with the random state each of them saw.

* :class:`State` is a Stateful: every variable of the model (weights, non-trainable
  statistics, the states of the seed generators that drive dropout), of its optimizer
  (iteration count, moments, learning rate) and of its metrics, as NumPy arrays, restored in
  place with ``assign``. Use it in custom training loops (``GradientTape`` or torch backend).
* :class:`Checkpoint` is a ``keras.callbacks.Callback`` for ``model.fit``.

Works on the TensorFlow and torch backends (``Checkpoint`` is not available on the JAX
backend, whose ``fit`` keeps the variables outside the model between steps). This module
imports keras, on first use of ``runstate.keras`` (``import runstate`` imports no framework).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from runstate.errors import StateMismatchError
from runstate.manager import CheckpointManager
from runstate.rng import RNG

__all__ = ["Checkpoint", "State"]

logger = logging.getLogger("runstate")


def _numpy(variable: Any) -> np.ndarray:
    """A copy of the variable's value (on CPU a backend may share memory that training changes)."""
    value = variable.value
    if hasattr(value, "detach") and str(value.dtype) != "torch.bfloat16":  # torch backend, directly
        out: np.ndarray = value.detach().cpu().numpy().copy()
        return out
    return np.array(keras.ops.convert_to_numpy(value), copy=True)


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
    ) -> None:
        self.model = model
        self.optimizer = optimizer if optimizer is not None else getattr(model, "optimizer", None)
        self.metrics = metrics
        self.seed_generators = list(seed_generators)

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
            raise StateMismatchError(f"the checkpoint and the live model differ in variables {diff[:8]}")
        for key, v in live.items():
            if tuple(np.shape(state_dict[key])) != tuple(v.shape):
                raise StateMismatchError(
                    f"{key} ({v.path}): shape {np.shape(state_dict[key])} stored, {tuple(v.shape)} live"
                )
        for key, v in live.items():
            v.assign(state_dict[key])

    def __repr__(self) -> str:
        return f"runstate.keras.State({self.model.name!r})"


@dataclass
class _Resume:
    """Where the interrupted fit() was, and the random state it had there."""

    epoch: int
    batch: int  # batches of ``epoch`` already trained on
    epoch_rng: dict[str, Any]  # the global generators when ``epoch`` began
    checkpoint_rng: dict[str, Any]  # ... and at the checkpoint
    metrics: list[Any] | None  # the epoch's running metrics, until put back


class Checkpoint(keras.callbacks.Callback):  # type: ignore[misc]
    """Save and exactly resume ``model.fit`` with a :class:`runstate.CheckpointManager`.

    On train begin it restores the newest checkpoint of ``manager``: model and optimizer
    variables, seed generators, the epoch's running metrics, the global random generators,
    the epoch and the position inside it. ``fit`` then starts at that epoch and skips the
    batches of it that were already trained on: they are still drawn from the data, so the
    order stays the same, but not trained on (callbacks still see their ``batch_begin`` and
    ``batch_end``, with the restored metrics as logs). After every trained batch it calls
    ``manager.save``, which writes when the manager's cadence says so; when the manager was
    preempted by a signal, training stops after that save.

    The resumed ``fit`` performs the same optimizer steps on the same batches as an
    uninterrupted one. This needs a data order that depends only on the epoch: NumPy arrays
    (shuffled or not) on the torch backend; ``shuffle=False`` or a ``keras.utils.PyDataset``
    whose order is a function of the epoch on TensorFlow (tf.data's shuffle draws from
    state that cannot be saved). The global generators (Python, NumPy, torch) are set to
    their state at the start of the interrupted epoch while its order is drawn, then to their
    state at the checkpoint, so unseeded dropout on the torch backend draws the same masks.

    Args:
        manager: where and how often to save (``save_every_steps``, retention, signals).
        extra: more items to save and restore with the model (objects with
            ``state_dict``/``load_state_dict``, arrays, numbers).

    Attributes:
        restored_step: the step restored on train begin, None when training started fresh.

    Example:
        >>> with runstate.CheckpointManager("runs/exp", save_every_steps=100) as mgr:  # doctest: +SKIP
        ...     model.fit(x, y, epochs=10, callbacks=[runstate.keras.Checkpoint(mgr)])
    """

    def __init__(self, manager: CheckpointManager, *, extra: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if keras.backend.backend() not in ("tensorflow", "torch"):
            raise NotImplementedError(
                f"runstate.keras.Checkpoint supports the tensorflow and torch backends, not "
                f"{keras.backend.backend()!r}; use runstate.keras.State in a custom training loop"
            )
        self.manager = manager
        self.extra = dict(extra or {})
        self.restored_step: int | None = None
        self._step = 0  # batches trained since the run began
        self._epoch = 0
        self._batch = 0  # batches of the current epoch trained (or skipped)
        self._first_batch = 0
        self._epoch_rng: dict[str, Any] = {}
        self._resume: _Resume | None = None
        self._original_train_function: Callable[..., Any] | None = None
        self._skip_left = 0
        self._skipped = False

    # -- what is saved ---------------------------------------------------------------------
    def _metric_variables(self) -> list[Any]:
        return [v for m in self.model.metrics for v in m.variables]

    def _state(self) -> dict[str, Any]:
        fit = {
            "epoch": self._epoch,
            "batch": self._batch,
            "epoch_rng": self._epoch_rng,
            # A list, not part of State: compile metrics may not be built yet when a resumed
            # fit() begins (TensorFlow builds them when the step function is first traced).
            "metrics": [_numpy(v) for v in self._metric_variables()],
        }
        return {"keras": State(self.model, metrics=[]), "rng": RNG(), "fit": fit, **self.extra}

    # -- callbacks -------------------------------------------------------------------------
    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        self._epoch_rng = RNG().state_dict()
        state = self._state()
        step = self.manager.restore(state)
        self.restored_step = step
        if step is None:
            return
        fit = state["fit"]
        self._step = step
        self._resume = _Resume(
            int(fit["epoch"]), int(fit["batch"]), fit["epoch_rng"], RNG().state_dict(), list(fit["metrics"])
        )
        self.model._initial_epoch = self._resume.epoch  # read by fit() right after, as for BackupAndRestore
        if self._resume.batch > 0:
            self._install_skipping(self._resume.batch)

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._epoch, self._batch = epoch, 0
        resume = self._resume
        if resume is not None and epoch == resume.epoch:
            RNG().load_state_dict(resume.epoch_rng)  # this epoch's data order is drawn from it
            self._epoch_rng = resume.epoch_rng
        else:
            self._epoch_rng = RNG().state_dict()

    def on_train_batch_begin(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._first_batch = batch

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._batch = batch + 1
        if self._skipped:  # nothing was trained
            self._skipped = False
            return
        self._step += batch - self._first_batch + 1
        self.manager.save(self._step, self._state(), metrics=_numbers(logs))
        if self.manager.preempted:
            self.model.stop_training = True

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        self._uninstall_skipping()
        self.model._initial_epoch = None
        self._resume = None

    # -- skipping the batches already trained on -------------------------------------------
    def _install_skipping(self, batches: int) -> None:
        original = self.model.train_function
        per_call = max(1, int(self.model.steps_per_execution))
        tensorflow = keras.backend.backend() == "tensorflow"
        self._original_train_function = original
        self._skip_left = -(-batches // per_call)

        def skipping(data: Any) -> Any:
            if self._skip_left == 0:
                return original(data)
            # TensorFlow's step function pulls its batches from the iterator itself.
            batches = [next(data) for _ in range(per_call)] if tensorflow else [data[0] if per_call > 1 else data]
            assert self._resume is not None
            if self._resume.metrics is not None:
                self._restore_metrics(batches[0], self._resume.metrics)
                self._resume.metrics = None
            self._skipped = True
            self._skip_left -= 1
            if self._skip_left == 0:
                RNG().load_state_dict(self._resume.checkpoint_rng)  # as they were at the checkpoint
                self._resume = None
                self._uninstall_skipping()
            return self.model.get_metrics_result()

        self.model.train_function = skipping

    def _restore_metrics(self, batch: Any, values: list[Any]) -> None:
        """Put the epoch's running metrics back (fit() reset them when the epoch began)."""
        live = self._metric_variables()
        if len(live) != len(values):  # compile metrics not built yet: build them on this batch
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
            self.model.compute_metrics(x, y, self.model(x, training=False), sample_weight=sample_weight)
            live = self._metric_variables()
        if len(live) != len(values) or any(tuple(v.shape) != np.shape(a) for v, a in zip(live, values, strict=True)):
            logger.warning("runstate.keras.Checkpoint: the metrics differ from the checkpoint's; they restart")
            return
        for v, value in zip(live, values, strict=True):
            v.assign(value)

    def _uninstall_skipping(self) -> None:
        if self._original_train_function is not None:
            self.model.train_function = self._original_train_function
            self._original_train_function = None


def _numbers(logs: Mapping[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in (logs or {}).items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out
