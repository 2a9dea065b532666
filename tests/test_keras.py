"""Keras 3: runstate.keras.State and runstate.keras.Checkpoint, on the backend of this process.

pytest runs this file on the torch backend (the default set below);
``tests/test_keras_tensorflow.py`` runs it again in a subprocess with
``KERAS_BACKEND=tensorflow``. The conformance suite's subprocess test trains with
``model.fit`` (``tests/e2e/keras_job.py``), is SIGKILLed mid-epoch and resumed. On TensorFlow,
``tests/keras_tfdata_job.py`` does the same with a reshuffled ``tf.data`` pipeline (the
iterator state path); ``tests/keras_jax_job.py`` checks the JAX-backend recipe.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

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

    def _restore_input(self, iterator: Any, resume: Any) -> None:
        resume.input_state = None  # nor move TensorFlow's iterator to the saved position


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


def test_state_holds_the_global_seed_generator_without_changing_python_random() -> None:
    """``keras.random.*`` calls without a seed draw from Keras' global seed generator (on torch,
    ``keras.random.dropout`` without a seed draws from torch's generator instead, saved by ``RNG``)."""
    from keras.src.backend.common import global_state

    global_state.set_global_attribute("global_seed_generator", None)  # as in a fresh process
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    python_random = random.getstate()
    saved = runstate.keras.State(model).state_dict()  # creates the generator, as Keras would on first use
    assert random.getstate() == python_random and "global_seed_generator.0" in saved
    first = keras.ops.convert_to_numpy(keras.random.normal((64,)))
    runstate.keras.State(model).load_state_dict(saved)
    assert np.array_equal(keras.ops.convert_to_numpy(keras.random.normal((64,))), first)

    # Negative control: without it, the generator is not rewound and draws another mask.
    without = runstate.keras.State(model, global_seed_generator=False)
    assert "global_seed_generator.0" not in without.state_dict()
    without.load_state_dict({k: v for k, v in saved.items() if k != "global_seed_generator.0"})
    assert not np.array_equal(keras.ops.convert_to_numpy(keras.random.normal((64,))), first)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.data iterator state: TensorFlow backend")
def test_fit_warns_and_replays_when_the_input_position_cannot_be_saved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """NumPy arrays with shuffle=True on TensorFlow: Keras shuffles with a stateful op."""
    model = keras_job.build()
    with runstate.CheckpointManager(tmp_path, save_every_steps=4) as mgr:
        model.fit(
            keras_job.X,
            keras_job.Y,
            batch_size=8,
            epochs=1,
            shuffle=True,
            callbacks=[runstate.keras.Checkpoint(mgr)],
            verbose=0,
        )
    assert runstate.load(tmp_path / "step-000000000004")["fit_input"] == {
        "iterator": None,
        "shuffle_seeds": None,
        "pipeline": None,
    }
    warned = [r.getMessage() for r in caplog.records if "cannot be saved" in r.getMessage()]
    assert len(warned) == 1 and "replays the interrupted epoch" in warned[0], warned


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.data iterator state: TensorFlow backend")
def test_fit_refuses_to_resume_a_dataset_shuffled_with_other_seeds(tmp_path: Path) -> None:
    import tensorflow as tf

    from tests import keras_tfdata_job as job

    def fit(seed: int, *callbacks: Any, scale: float = 1.0) -> None:
        model = job.build()
        data = tf.data.Dataset.from_tensor_slices((job.X, job.Y)).shuffle(90, seed=seed)
        data = data.map(lambda x, y: (x * scale, y)).batch(8)
        with runstate.CheckpointManager(tmp_path, save_every_steps=4) as mgr:
            model.fit(data, epochs=2, shuffle=False, callbacks=[runstate.keras.Checkpoint(mgr), *callbacks], verbose=0)

    fit(1, StopAt(5))
    with pytest.raises(runstate.StateMismatchError, match=r"shuffles with the seeds \[\d+, 2\], the checkpoint's with"):
        fit(2)
    with pytest.raises(runstate.StateMismatchError, match=r"fit\(\) is another pipeline \(fingerprint [0-9a-f]{12}\)"):
        fit(1, scale=2.0)  # TensorFlow would resume it without a word


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.data iterator state: TensorFlow backend")
def test_fit_resumes_a_map_drawing_from_a_generator_with_unbuilt_metrics(tmp_path: Path) -> None:
    """The resumed fit builds its compile metrics before the first step without drawing a batch
    (whose map would draw from the restored generator), and the iterator is read with it."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    x = np.random.default_rng(0).normal(size=(40, 4)).astype("float32")

    def fit(run: str, *callbacks: Any) -> list[np.ndarray]:
        keras.utils.set_random_seed(0)
        gen = tf.random.Generator.from_seed(7)
        ds = tf.data.Dataset.from_tensor_slices((x, x.sum(1, keepdims=True))).shuffle(40, seed=1)
        ds = ds.map(lambda a, b: (a + gen.normal([4]) * 0.1, b)).batch(4).prefetch(2).with_options(options)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile("sgd", "mse", metrics=["mae"])
        with runstate.CheckpointManager(tmp_path / run, save_every_steps=3) as mgr:
            checkpoint = runstate.keras.Checkpoint(mgr, extra={"gen": gen})
            model.fit(ds, epochs=2, verbose=0, callbacks=[checkpoint, *callbacks])
        return [w.numpy() for w in model.weights]

    reference = fit("full")
    fit("cut", StopAt(4))
    assert (
        same_values({str(i): w for i, w in enumerate(reference)}, {str(i): w for i, w in enumerate(fit("cut"))}) == []
    )


def test_extra_items_may_not_take_the_callbacks_own_names(tmp_path: Path) -> None:
    with pytest.raises(runstate.CheckpointConfigError, match=r"uses the names \['fit'\]"):
        runstate.keras.Checkpoint(runstate.CheckpointManager(tmp_path), extra={"fit": 1, "mine": 2})


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


def _start(*args: str | Path) -> Any:
    """Start ``tests/keras_tfdata_job.py`` (TensorFlow backend) in a subprocess."""
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(Path(__file__).parent / "keras_tfdata_job.py"), *map(str, args)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(*procs: Any, rc: int = 0) -> None:
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == rc, out[-4000:]


def _losses(out_dir: Path) -> dict[int, str]:
    """The loss fit reported at each step; a resumed run overwrites the steps it retrained."""
    return {r["step"]: r["loss"] for r in map(json.loads, (out_dir / "losses.jsonl").read_text().splitlines())}


@pytest.mark.e2e
@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.data iterator state: TensorFlow backend")
def test_fit_over_a_reshuffled_tf_data_dataset_resumes_bit_exactly_after_sigkill(tmp_path: Path) -> None:
    from tests import keras_tfdata_job as job

    run = tmp_path / "run"
    killed = _start(run, tmp_path / "killed", "--kill-at", "19")
    reference = job.train(str(tmp_path / "ref-run"), str(tmp_path / "ref"))  # meanwhile, uninterrupted in-process
    _finish(killed, rc=-signal.SIGKILL)
    # Checkpoint 16 is 4 batches into epoch 1; checkpoint 12 is the end of epoch 0 (a partial
    # last batch, the prefetch already at the end of the epoch): resume from each.
    stored = runstate.load(run / "step-000000000012")
    assert (stored["fit"]["epoch"], stored["fit"]["batch"]) == (0, 12)
    assert stored["fit_input"]["iterator"].dtype == np.uint8 and stored["fit_input"]["iterator"].size > 100
    for name in ("at16", "at12", "control"):
        shutil.copytree(run, tmp_path / f"{name}-run")
        shutil.copytree(tmp_path / "killed", tmp_path / name)
    shutil.rmtree(tmp_path / "at12-run" / "step-000000000016")
    # The negative control resumes checkpoint 16 without the iterator state (the old replay).
    control = _start(tmp_path / "control-run", tmp_path / "control", "--control", "replay")
    _finish(_start(tmp_path / "at16-run", tmp_path / "at16"), _start(tmp_path / "at12-run", tmp_path / "at12"), control)

    losses = _losses(tmp_path / "ref")
    assert sorted(losses) == list(range(1, job.TOTAL_STEPS + 1))
    for name in ("at16", "at12"):
        assert _losses(tmp_path / name) == losses, name  # every step, those after the resume included
        assert same_values(reference, load_file(tmp_path / name / "final.safetensors")) == [], name
    control_losses = _losses(tmp_path / "control")
    assert [s for s in losses if control_losses[s] != losses[s]][:1] == [17]  # the first step after the resume
    assert same_values(reference, load_file(tmp_path / "control" / "final.safetensors"))


@pytest.mark.e2e
@pytest.mark.skipif(BACKEND != "torch", reason="runs its own JAX-backend process once, from the torch run")
def test_state_in_a_train_on_batch_loop_resumes_exactly_on_the_jax_backend(tmp_path: Path) -> None:
    """``Checkpoint`` refuses JAX; the documented recipe there (``State`` + ``train_on_batch``) is exact."""
    pytest.importorskip("jax")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "PYTHONWARNINGS": "ignore"}
    job = Path(__file__).parent / "keras_jax_job.py"
    proc = subprocess.run(
        [sys.executable, str(job), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "global_seed_generator.0" in result["keys"] and result["checkpoint_refused"]
    assert result["resumed"] == []
    assert result["control"]  # negative control: the optimizer's moments left out
