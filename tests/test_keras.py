"""Keras 3: runstate.keras.State and runstate.keras.Checkpoint, on the backend of this process.

pytest runs this file on the torch backend (the default set below);
``tests/test_keras_tensorflow.py`` runs it again in a subprocess with
``KERAS_BACKEND=tensorflow``. The conformance suite's subprocess test trains with
``model.fit`` (``tests/e2e/keras_job.py``), is SIGKILLed mid-epoch and resumed.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")

import runstate  # noqa: E402
import runstate.keras  # noqa: E402
from tests.conformance import Conformance, same_values  # noqa: E402
from tests.e2e import keras_job  # noqa: E402

BACKEND = keras.backend.backend()
# Keras' torch backend converts tensors with np.array(tensor), which NumPy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")
JOB = Path(__file__).parent / "e2e" / "keras_job.py"


def build(seed: int, hidden: int = 16) -> Any:
    """A compiled model whose dropout has a seed generator (in-process runs must not share RNGs)."""
    keras_job.seed_everything(seed)
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dropout(0.3, seed=seed + 1),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-2, weight_decay=0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    i = (step * 8) % keras_job.N_SAMPLES
    return keras_job.X[i : i + 8], keras_job.Y[i : i + 8]


class TestKerasConformance(Conformance):
    adapter = "keras"
    in_place_items = ("keras",)
    negative_resume = "fresh_optimizer"
    save_every = keras_job.SAVE_EVERY
    total_steps = keras_job.TOTAL_STEPS
    kill_at = 19  # last checkpoint 16: four batches into the second epoch

    def make_state(self, seed: int, hidden: int = 16) -> dict[str, Any]:
        model = build(seed, hidden)
        state = {"keras": runstate.keras.State(model), "step": 0}
        return self.train(state, 2 + seed)

    def train(self, state: dict[str, Any], steps: int) -> dict[str, Any]:
        for _ in range(steps):
            state["keras"].model.train_on_batch(*batch(state["step"]))
            state["step"] += 1
        return state

    def values(self, state: dict[str, Any]) -> dict[str, np.ndarray]:
        return {**state["keras"].state_dict(), "step": np.asarray(state["step"])}

    def mismatched_state(self) -> dict[str, Any]:
        return self.make_state(0, hidden=8)

    def job_command(self) -> list[str]:
        return [sys.executable, str(JOB)]

    def job_env(self) -> dict[str, str]:
        return {"KERAS_BACKEND": BACKEND, "TF_CPP_MIN_LOG_LEVEL": "3"}


def test_state_holds_weights_optimizer_metrics_and_seed_generators() -> None:
    model = build(0)
    model.train_on_batch(*batch(0))
    extra = keras.random.SeedGenerator(5)
    groups = runstate.keras.State(model, seed_generators=[extra]).variables()
    paths = {g: [v.path for v in vs] for g, vs in groups.items()}
    assert any("seed_generator" in p for p in paths["model"])  # dropout's
    assert any("moving_mean" in p for p in paths["model"])
    assert any("iteration" in p for p in paths["optimizer"]) and any("momentum" in p for p in paths["optimizer"])
    assert len(paths["metrics"]) >= 4 and len(paths["seed_generators"]) == 1


def _custom_step(model: Any, opt: Any, x: np.ndarray, y: np.ndarray) -> None:
    """One step of a custom training loop, written the way each backend's users write it."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
    else:
        model.zero_grad()
        loss = loss_fn(y, model(x, training=True))
        loss.backward()
        grads = [v.value.grad for v in model.trainable_variables]
    opt.apply(grads, model.trainable_variables)


def test_custom_training_loop_resumes_bit_exactly(tmp_path: Path) -> None:
    def fresh(seed: int) -> tuple[Any, Any, dict[str, Any]]:
        keras_job.seed_everything(seed)
        layers = keras.layers
        model = keras.Sequential(
            [keras.Input((10,)), layers.Dense(16, activation="relu"), layers.Dropout(0.3, seed=seed), layers.Dense(3)]
        )
        opt = keras.optimizers.Adam(1e-2)
        return model, opt, {"keras": runstate.keras.State(model, opt), "step": 0}

    model, opt, state = fresh(0)
    for step in range(5):
        _custom_step(model, opt, *batch(step))
    runstate.save(tmp_path / "ck", {**state, "step": 5})
    for step in range(5, 10):
        _custom_step(model, opt, *batch(step))
    expected = state["keras"].state_dict()

    model2, opt2, state2 = fresh(3)  # other weights, optimizer never stepped
    runstate.load(tmp_path / "ck", state2)
    assert state2["step"] == 5 and int(keras.ops.convert_to_numpy(opt2.iterations)) == 5
    for step in range(5, 10):
        _custom_step(model2, opt2, *batch(step))
    assert same_values(expected, state2["keras"].state_dict()) == []

    # Negative control: the same restore without the optimizer's moments does not match.
    model3, opt3, state3 = fresh(3)
    runstate.load(tmp_path / "ck", state3)
    for v in opt3.variables:
        if "momentum" in v.path or "velocity" in v.path:
            v.assign(np.zeros(v.shape, dtype=v.dtype))
    for step in range(5, 10):
        _custom_step(model3, opt3, *batch(step))
    assert same_values(expected, state3["keras"].state_dict())


class StopAt(keras.callbacks.Callback):  # type: ignore[misc]
    """Interrupts fit() after an optimizer step, as a crash would (without killing pytest)."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) == self.step:
            self.model.stop_training = True


def _fit(run_dir: Path, *callbacks: Any, checkpoint: type = runstate.keras.Checkpoint) -> Any:
    model = keras_job.build()
    with runstate.CheckpointManager(run_dir, save_every_steps=keras_job.SAVE_EVERY) as mgr:
        model.fit(
            keras_job.X,
            keras_job.Y,
            batch_size=keras_job.BATCH,
            epochs=keras_job.EPOCHS,
            shuffle=BACKEND == "torch",
            callbacks=[checkpoint(mgr), *callbacks],
            verbose=0,
        )
    return model


class NoSkipping(runstate.keras.Checkpoint):
    """Negative control: restore everything but retrain the interrupted epoch from its start."""

    def _install_skipping(self, batches: int) -> None:
        pass


def test_resumed_fit_takes_the_same_steps_and_ends_identical(tmp_path: Path) -> None:
    reference = keras_job.train_arrays(_fit(tmp_path / "ref"))
    _fit(tmp_path / "run", StopAt(13))  # saved at 12, the end of the first epoch; step 13 is lost
    fit = runstate.load(tmp_path / "run" / "step-000000000012")["fit"]
    assert (fit["epoch"], fit["batch"]) == (0, 12) and len(fit["metrics"]) >= 4
    assert {"python", "numpy"} <= set(fit["epoch_rng"])
    shutil.copytree(tmp_path / "run", tmp_path / "control")

    resumed = keras_job.train_arrays(_fit(tmp_path / "run"))
    assert same_values(reference, resumed) == []
    assert int(resumed["optimizer.0"]) == keras_job.TOTAL_STEPS

    # Negative control: everything restored, but the interrupted epoch retrained from its start.
    retrained = keras_job.train_arrays(_fit(tmp_path / "control", checkpoint=NoSkipping))
    assert int(retrained["optimizer.0"]) == keras_job.TOTAL_STEPS + 12
    assert same_values(reference, retrained)


def test_preemption_saves_then_stops(tmp_path: Path) -> None:
    class Preempt(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) == 6:
                os.kill(os.getpid(), signal.SIGUSR1)

    model = keras_job.build()
    with runstate.CheckpointManager(tmp_path, save_every_steps=100, save_on_signals=[signal.SIGUSR1]) as mgr:
        model.fit(
            keras_job.X, keras_job.Y, batch_size=8, epochs=3, callbacks=[Preempt(), runstate.keras.Checkpoint(mgr)]
        )
        assert mgr.preempted and mgr.steps() == [6]
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 6
