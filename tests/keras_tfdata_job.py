"""``model.fit`` over a shuffled ``tf.data.Dataset`` with ``runstate.keras.Checkpoint``.

    KERAS_BACKEND=tensorflow python tests/keras_tfdata_job.py RUN_DIR OUT_DIR
        [--kill-at STEP] [--control replay]

The dataset is reshuffled every epoch (``shuffle(..., reshuffle_each_iteration=True)``),
mapped in parallel, batched with a partial last batch and prefetched; the model has a dropout
layer (its own seed generator) and a layer calling ``keras.random.dropout`` without a seed
(Keras' global seed generator). Every trained step appends ``{"step", "loss"}`` (the running
epoch mean fit reports, as hex) to ``OUT_DIR/losses.jsonl``; the final model and optimizer
variables go to ``OUT_DIR/final.safetensors``. ``--kill-at`` SIGKILLs the process after that
step. ``--control replay`` is the negative control: the iterator state is not saved, so the
resumed epoch is replayed from a fresh iterator (the old behaviour).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from safetensors.numpy import save_file

import runstate
import runstate.keras

if __package__:
    from tests.e2e.keras_job import KillAt, LogLosses
else:  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.e2e.keras_job import KillAt, LogLosses

N_SAMPLES, BATCH, EPOCHS, SAVE_EVERY = 90, 8, 3, 4
STEPS_PER_EPOCH = -(-N_SAMPLES // BATCH)  # 12, the last one a partial batch of 2
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH

_data = np.random.default_rng(11)
X = _data.standard_normal((N_SAMPLES, 10)).astype("float32")
Y = _data.integers(0, 3, N_SAMPLES).astype("int32")


class GlobalDropout(keras.layers.Layer):  # type: ignore[misc]
    """Dropout drawn from Keras' global seed generator (``keras.random.dropout`` without a seed)."""

    def call(self, x: Any, training: bool = False) -> Any:
        return keras.random.dropout(x, 0.2) if training else x


def dataset() -> Any:
    ds = tf.data.Dataset.from_tensor_slices((X, Y)).shuffle(N_SAMPLES, reshuffle_each_iteration=True)
    ds = ds.map(lambda x, y: (x * 1.5 + 0.1, y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(BATCH).prefetch(tf.data.AUTOTUNE)


def build() -> Any:
    keras.utils.set_random_seed(0)  # also seeds the dataset's shuffle (tf.random.set_seed)
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dropout(0.3),
            GlobalDropout(),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-2, weight_decay=0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


class ReplayCheckpoint(runstate.keras.Checkpoint):
    """Negative control: the iterator state is neither saved nor restored (the old behaviour),
    so the interrupted epoch is replayed from a fresh iterator."""

    def on_train_begin(self, logs: Any = None) -> None:
        load = self._input.load_state_dict
        self._input.load_state_dict = lambda state_dict: load({"iterator": None})
        super().on_train_begin(logs)

    def _input_state(self) -> np.ndarray | None:
        return None


def train(run_dir: str, out_dir: str, kill_at: int | None = None, control: str | None = None) -> Any:
    os.makedirs(out_dir, exist_ok=True)
    model = build()
    data = dataset()
    checkpoint = ReplayCheckpoint if control == "replay" else runstate.keras.Checkpoint
    with runstate.CheckpointManager(run_dir, keep_last=2, save_every_steps=SAVE_EVERY) as mgr:
        callbacks = [checkpoint(mgr), LogLosses(os.path.join(out_dir, "losses.jsonl")), KillAt(kill_at)]
        model.fit(data, epochs=EPOCHS, shuffle=False, callbacks=callbacks, verbose=0)
    arrays = runstate.keras.State(model, metrics=[]).state_dict()
    save_file(arrays, os.path.join(out_dir, "final.safetensors"))
    return arrays


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--kill-at", type=int)
    p.add_argument("--control", choices=["replay"])
    args = p.parse_args()
    train(args.run_dir, args.out_dir, args.kill_at, args.control)


if __name__ == "__main__":
    sys.exit(main())
