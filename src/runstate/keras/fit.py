"""``runstate.keras.Checkpoint``: save ``model.fit`` and resume it mid-epoch exactly.

Why this exists: Keras' own ``BackupAndRestore`` restarts an interrupted epoch from its first
batch, so a resumed ``fit`` trains some batches twice. This callback records the position
inside the epoch and resumes there. Where the input is a ``tf.data`` pipeline on the
TensorFlow backend it saves the iterator's own state (shuffle buffers and their random state
included), taken right after a step, so the resumed epoch continues with the batches an
uninterrupted run would get. Elsewhere it replays the interrupted epoch's order and skips the
batches already trained on, which needs an order that depends only on the epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from runstate.errors import CheckpointConfigError, StateMismatchError, UnsupportedTypeError
from runstate.keras.state import State, _numpy
from runstate.manager import CheckpointManager
from runstate.rng import RNG

__all__ = ["Checkpoint"]

logger = logging.getLogger("runstate")

_OWN_ITEMS = ("keras", "rng", "fit", "fit_input")


@dataclass
class _Resume:
    """Where the interrupted fit() was, and the random state it had there."""

    epoch: int
    batch: int  # batches of ``epoch`` already trained on
    epoch_rng: dict[str, Any]  # the global generators when ``epoch`` began
    checkpoint_rng: dict[str, Any]  # ... and at the checkpoint
    metrics: list[Any] | None  # the epoch's running metrics, until put back
    input_state: np.ndarray | None  # the tf.data iterator's state, until put back
    from_iterator: bool  # True: the skipped batches are not drawn again


class _InputPosition:
    """The ``fit_input`` item: the tf.data iterator's state, or None when the epoch is replayed.

    A Stateful, so that the iterator is serialized only when the manager writes (a shuffle
    buffer can be large), right after the step that preceded the save.
    """

    def __init__(self, checkpoint: Checkpoint) -> None:
        self._checkpoint = checkpoint
        self.loaded: np.ndarray | None = None
        self.loaded_seeds: list[int] | None = None
        self.loaded_pipeline: str | None = None

    @property
    def runstate_tf_iterator(self) -> Any:
        """The iterator :meth:`state_dict` reads: the adapter reads it at one instant with the
        ``tf.random.Generator`` items of the save (its ``map`` may draw from them)."""
        checkpoint = self._checkpoint
        return checkpoint._iterator if checkpoint._iterator_saveable else None

    def state_dict(self) -> dict[str, Any]:
        state = self._checkpoint._input_state()
        if state is None:
            return {"iterator": None, "shuffle_seeds": None, "pipeline": None}
        from runstate.adapters.tensorflow import pipeline

        seeds, fingerprint = pipeline(self._checkpoint._iterator)
        return {"iterator": state, "shuffle_seeds": np.asarray(seeds, np.int64), "pipeline": fingerprint}

    def load_state_dict(self, state_dict: Mapping[str, Any], /) -> None:
        value, seeds = state_dict.get("iterator"), state_dict.get("shuffle_seeds")
        self.loaded = None if value is None else np.asarray(value, dtype=np.uint8)
        self.loaded_seeds = None if seeds is None else [int(x) for x in np.asarray(seeds).ravel()]
        fingerprint = state_dict.get("pipeline")
        self.loaded_pipeline = None if fingerprint is None else str(fingerprint)


class Checkpoint(keras.callbacks.Callback):  # type: ignore[misc]
    """Save and exactly resume ``model.fit`` with a :class:`runstate.CheckpointManager`.

    On train begin it restores the newest checkpoint of ``manager``: model and optimizer
    variables, seed generators (Keras' global one included), the epoch's running metrics, the
    global random generators, the epoch and the position inside it. ``fit`` then starts at
    that epoch and does not train again the batches of it already trained on (callbacks still
    see their ``batch_begin`` and ``batch_end``, with the restored metrics as logs). After every
    trained batch it calls ``manager.save``, which writes when the manager's cadence says so;
    when the manager was preempted by a signal, training stops after that save.

    How the rest of the interrupted epoch gets the same batches as an uninterrupted run:

    * A ``tf.data.Dataset`` on the TensorFlow backend (``shuffle(...,
      reshuffle_each_iteration=True)``, ``map``, ``batch``, ``prefetch``, a ``repeat`` right
      after the ``shuffle``...): the
      state of the iterator ``fit`` reads from is saved with the checkpoint and put back
      into the resumed epoch's iterator, which also gives the next epochs their shuffle
      order. Shuffles need a seed (``keras.utils.set_random_seed``, ``tf.random.set_seed`` or
      ``shuffle(seed=...)``) for the epochs after the resumed one to be shuffled as in an
      uninterrupted run.
    * Anything else (NumPy arrays, ``keras.utils.PyDataset``, a pipeline TensorFlow cannot
      serialize): the interrupted epoch's order is drawn again and its trained batches are
      skipped, which is exact when that order depends only on the epoch: NumPy arrays,
      shuffled or not, on the torch backend; ``shuffle=False`` or a ``PyDataset`` whose order
      is a function of the epoch on TensorFlow. The global generators (Python, NumPy, torch)
      are set to their state at the start of the interrupted epoch while its order is drawn,
      then to their state at the checkpoint. On TensorFlow a warning says when this is used.

    Args:
        manager: where and how often to save (``save_every_steps``, retention, signals).
        extra: more items to save and restore with the model (objects with
            ``state_dict``/``load_state_dict``, arrays, numbers).

    Attributes:
        restored_step: the step restored on train begin, None when training started fresh.

    Raises:
        CheckpointConfigError: ``extra`` uses a name the callback saves its own items under.
        StateMismatchError: (from ``fit``, at the resumed epoch's first step, after the model's
            variables were restored) the ``tf.data`` dataset shuffles with other seeds than the
            checkpoint's, or is another pipeline (stages, parameters, map functions, element
            specs or source shapes).

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
        clash = sorted(set(extra or {}) & set(_OWN_ITEMS))
        if clash:
            raise CheckpointConfigError(
                f"runstate.keras.Checkpoint(extra=...) uses the names {clash}, which the callback saves "
                f"its own items under ({', '.join(_OWN_ITEMS)}); rename those items"
            )
        self.manager = manager
        self.extra = dict(extra or {})
        self.restored_step: int | None = None
        self._tensorflow = keras.backend.backend() == "tensorflow"
        self._step = 0  # batches trained since the run began
        self._epoch = 0
        self._batch = 0  # batches of the current epoch trained (or skipped)
        self._first_batch = 0
        self._epoch_rng: dict[str, Any] = {}
        self._resume: _Resume | None = None
        self._input = _InputPosition(self)
        self._iterator: Any = None  # the tf.data iterator the step function reads from
        self._iterator_saveable = True
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
        state = {"keras": State(self.model, metrics=[]), "rng": RNG(), "fit": fit, **self.extra}
        if self._tensorflow:
            state["fit_input"] = self._input
        return state

    def _input_state(self) -> np.ndarray | None:
        """The state of the tf.data iterator after the last step; None when it cannot be saved."""
        if self._iterator is None or not self._iterator_saveable:
            return None
        from runstate.adapters.tensorflow import snapshot_iterator_state

        try:
            return snapshot_iterator_state(self._iterator)
        except UnsupportedTypeError as exc:
            self._iterator_saveable = False
            logger.warning(
                "runstate.keras.Checkpoint: the position of fit()'s input pipeline cannot be saved (%s). "
                "A resumed fit() replays the interrupted epoch instead, which is exact only when the data "
                "order depends only on the epoch (shuffle=False, or a PyDataset); for a tf.data.Dataset, "
                "use ops TensorFlow can serialize",
                exc,
            )
            return None

    # -- callbacks -------------------------------------------------------------------------
    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        self._epoch_rng = RNG().state_dict()
        self._iterator, self._iterator_saveable, self._skip_left = None, True, 0
        self._input.loaded = self._input.loaded_seeds = None
        state = self._state()
        step = self.manager.restore(state)
        self.restored_step = step
        self._install_step()
        if step is None:
            return
        fit = state["fit"]
        self._step = step
        self._resume = _Resume(
            int(fit["epoch"]),
            int(fit["batch"]),
            fit["epoch_rng"],
            RNG().state_dict(),
            list(fit["metrics"]),
            self._input.loaded,
            self._input.loaded is not None,
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
        self._uninstall_step()
        self.model._initial_epoch = None
        self._resume = None
        self._iterator = None

    # -- the step function: which iterator it reads, and the batches already trained on -----
    def _install_step(self) -> None:
        """Wrap ``model.train_function`` (built by fit() before ``on_train_begin``)."""
        original = self.model.train_function
        per_call = max(1, int(self.model.steps_per_execution))
        self._original_train_function = original

        def step(data: Any) -> Any:
            if self._tensorflow:
                self._iterator = data  # TensorFlow's step function pulls its batches from the iterator itself
            resume = self._resume
            if resume is not None and resume.input_state is not None:
                self._restore_input(data, resume)
            if self._skip_left == 0:
                return original(data)
            assert resume is not None
            # Replaying, the skipped batches are drawn (not trained on); after a restored
            # iterator state they are simply not drawn.
            batches = [] if resume.from_iterator else self._draw(data, per_call)
            if resume.metrics is not None:
                self._restore_metrics(batches[0] if batches else None, resume.metrics)
                resume.metrics = None
            self._skipped = True
            self._skip_left -= 1
            if self._skip_left == 0:
                RNG().load_state_dict(resume.checkpoint_rng)  # as they were at the checkpoint
                self._resume = None
            return self.model.get_metrics_result()

        self.model.train_function = step

    def _draw(self, data: Any, per_call: int) -> list[Any]:
        if self._tensorflow:
            return [next(data) for _ in range(per_call)]
        return [data[0] if per_call > 1 else data]

    def _restore_input(self, iterator: Any, resume: _Resume) -> None:
        """Put the saved tf.data state into the resumed epoch's fresh iterator (on its first step)."""
        from runstate.adapters.tensorflow import pipeline, resume_iterator

        state, resume.input_state = resume.input_state, None
        assert state is not None
        seeds, loaded_pipeline = self._input.loaded_seeds, self._input.loaded_pipeline
        live_seeds, live_pipeline = pipeline(iterator)
        if seeds is not None and live_seeds != seeds:
            raise StateMismatchError(
                f"the tf.data dataset given to fit() shuffles with the seeds {live_seeds}, the "
                f"checkpoint's with {seeds}: its next epochs would be shuffled differently. Build the dataset "
                "as the interrupted run did: the same shuffle(..., seed=...), or the same "
                "keras.utils.set_random_seed(...) and random ops created before the dataset"
            )
        if loaded_pipeline is not None and live_pipeline != loaded_pipeline:
            raise StateMismatchError(
                f"the tf.data dataset given to fit() is another pipeline (fingerprint {live_pipeline}) than the "
                f"checkpoint's ({loaded_pipeline}): its stages, their parameters, map functions, element specs "
                "or source shapes differ. Build the dataset as the interrupted run did"
            )
        if resume.metrics is not None:
            # Compile metrics are built on a batch: a batch of zeros shaped like the input's,
            # not one drawn from it (its map may draw from a restored tf.random.Generator).
            built = len(self._metric_variables()) == len(resume.metrics)
            self._restore_metrics(None if built else _zeros_batch(iterator), resume.metrics)
            resume.metrics = None
        resume_iterator(iterator, state)  # then sets the restored generators again

    def _install_skipping(self, batches: int) -> None:
        """Skip the first ``batches`` batches of the resumed epoch (already trained on)."""
        per_call = max(1, int(self.model.steps_per_execution))
        self._skip_left = -(-batches // per_call)

    def _restore_metrics(self, batch: Any, values: list[Any]) -> None:
        """Put the epoch's running metrics back (fit() reset them when the epoch began)."""
        live = self._metric_variables()
        if len(live) != len(values) and batch is not None:  # compile metrics not built yet: build them on this batch
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
            self.model.compute_metrics(x, y, self.model(x, training=False), sample_weight=sample_weight)
            live = self._metric_variables()
        if len(live) != len(values) or any(tuple(v.shape) != np.shape(a) for v, a in zip(live, values, strict=True)):
            logger.warning("runstate.keras.Checkpoint: the metrics differ from the checkpoint's; they restart")
            return
        for v, value in zip(live, values, strict=True):
            v.assign(value)

    def _uninstall_step(self) -> None:
        if self._original_train_function is not None:
            self.model.train_function = self._original_train_function
            self._original_train_function = None


def _zeros_batch(iterator: Any) -> Any:
    """A batch of zeros of ``iterator``'s element structure (unknown sizes: 1); a drawn batch
    when the elements are not all dense tensors."""
    import tensorflow as tf

    spec = iterator.element_spec
    if not all(isinstance(s, tf.TensorSpec) for s in tf.nest.flatten(spec)):
        return next(iterator)  # resume_iterator sets the generators again after it
    return tf.nest.map_structure(lambda s: tf.zeros([1 if d is None else d for d in s.shape], s.dtype), spec)


def _numbers(logs: Mapping[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in (logs or {}).items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out
