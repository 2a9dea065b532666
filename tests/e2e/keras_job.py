"""A Keras 3 ``model.fit`` job for the conformance suite; run as a subprocess.

    KERAS_BACKEND=torch|tensorflow python keras_job.py RUN_DIR OUT_DIR
        [--kill-at STEP] [--resume full|fresh_optimizer]

A small MLP with dropout and batch normalization, AdamW on a warmup + cosine schedule,
trained by ``model.fit`` on NumPy arrays with ``runstate.keras.Checkpoint``. On the torch
backend the arrays are shuffled every epoch and dropout draws from torch's global generator;
on TensorFlow the order is fixed (tf.data's shuffle cannot be resumed) and dropout draws from
its seed generator. Every trained step appends ``{"step", "loss"}`` (the running epoch mean
that fit reports) to ``OUT_DIR/losses.jsonl``; see ``tests/conformance.py`` for the protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
from typing import Any

import keras
import numpy as np
from safetensors.numpy import save_file

import runstate
import runstate.keras

N_SAMPLES, BATCH = 96, 8
STEPS_PER_EPOCH = N_SAMPLES // BATCH  # 12
EPOCHS = 3
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH  # 36
SAVE_EVERY = 4

_data = np.random.default_rng(7)
X = _data.standard_normal((N_SAMPLES, 10)).astype("float32")
Y = _data.integers(0, 3, N_SAMPLES).astype("int32")


def seed_everything(seed: int) -> None:
    if keras.backend.backend() == "torch":  # keras.utils.set_random_seed would import TensorFlow (4 s)
        import torch

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
    else:
        keras.utils.set_random_seed(seed)


def build(seed: int = 0, hidden: int = 32) -> Any:
    seed_everything(seed)
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dropout(0.3),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3),
        ]
    )
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, TOTAL_STEPS, warmup_target=2e-2, warmup_steps=5)
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def train_arrays(model: Any) -> dict[str, np.ndarray]:
    """Every model and optimizer variable, for the bit-for-bit comparison."""
    return runstate.keras.State(model, metrics=[]).state_dict()


class LogLosses(keras.callbacks.Callback):  # type: ignore[misc]
    def __init__(self, path: str) -> None:
        super().__init__()
        self.log = open(path, "a")  # noqa: SIM115 - closed on train end
        self.last = -1

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if step != self.last:  # batches skipped on resume train nothing
            self.last = step
            self.log.write(json.dumps({"step": step, "loss": float(logs["loss"]).hex()}) + "\n")
            self.log.flush()

    def on_train_end(self, logs: Any = None) -> None:
        self.log.close()


class KillAt(keras.callbacks.Callback):  # type: ignore[misc]
    def __init__(self, step: int | None) -> None:
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class ForgetMoments(keras.callbacks.Callback):  # type: ignore[misc]
    """Negative control: zero the optimizer's moments right after the restore."""

    def on_train_begin(self, logs: Any = None) -> None:
        for v in self.model.optimizer.variables:
            if "momentum" in v.path or "velocity" in v.path:
                v.assign(np.zeros(v.shape, dtype=v.dtype))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--kill-at", type=int)
    p.add_argument("--resume", default="full", choices=["full", "fresh_optimizer"])
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    model = build()
    shuffle = keras.backend.backend() == "torch"
    with runstate.CheckpointManager(args.run_dir, keep_last=2, save_every_steps=SAVE_EVERY) as mgr:
        callbacks = [runstate.keras.Checkpoint(mgr)]
        if args.resume == "fresh_optimizer":
            callbacks.append(ForgetMoments())
        callbacks += [LogLosses(os.path.join(args.out_dir, "losses.jsonl")), KillAt(args.kill_at)]
        model.fit(X, Y, batch_size=BATCH, epochs=EPOCHS, shuffle=shuffle, callbacks=callbacks, verbose=0)
    save_file(train_arrays(model), os.path.join(args.out_dir, "final.safetensors"))


if __name__ == "__main__":
    sys.exit(main())
