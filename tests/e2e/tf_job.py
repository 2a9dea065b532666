"""A pure TensorFlow training job for the conformance suite; run as a subprocess (on CPU).

    python tf_job.py [--optimizer keras|momentum] RUN_DIR OUT_DIR [--kill-at STEP]
                     [--resume full|no_iterator]

A custom loop, the way TensorFlow users write one: a ``tf.Module`` MLP with dropout (drawn
from a ``tf.random.Generator``) trained by a ``tf.function`` step; a ``tf.Variable`` step
counter; a ``tf.data`` pipeline that reshuffles every epoch and augments each example with
noise from a second generator, inside ``map``; the optimizer is Keras' Adam on the
TensorFlow backend (``--optimizer keras``) or a momentum optimizer made of ``tf.Variable``s.
The state holds the objects themselves, like ``tf.train.Checkpoint(step=..., net=...,
optimizer=..., iterator=...)``. The negative control restores everything but the iterator.
See ``tests/conformance.py`` for the protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

import numpy as np
import tensorflow as tf
from safetensors.numpy import save_file

import runstate

N_SAMPLES = 56
BATCH = 8  # 7 steps per epoch: the resume point (step 8) is in the middle of the second epoch
TOTAL_STEPS = 18
SAVE_EVERY = 4
DROPOUT = 0.2

_data = np.random.default_rng(7)
X = _data.standard_normal((N_SAMPLES, 10)).astype(np.float32)
Y = _data.integers(0, 3, N_SAMPLES).astype(np.int32)


class MLP(tf.Module):
    def __init__(self, seed: int, hidden: int = 16) -> None:
        super().__init__()
        self.hidden = {
            "w": tf.Variable(tf.random.stateless_normal((10, hidden), seed=[seed, 1]) * 0.3),
            "b": tf.Variable(tf.zeros(hidden)),
        }
        self.out = [
            tf.Variable(tf.random.stateless_normal((hidden, 3), seed=[seed, 2]) * 0.3),
            tf.Variable(tf.zeros(3)),
        ]

    def __call__(self, x: tf.Tensor, keep: tf.Tensor) -> tf.Tensor:
        h = tf.nn.relu(x @ self.hidden["w"] + self.hidden["b"])
        h = tf.where(keep, h / (1.0 - DROPOUT), 0.0)
        return h @ self.out[0] + self.out[1]


class Momentum(tf.Module):
    """SGD with momentum, its state in variables (a stand-in for a Keras optimizer in-process)."""

    def __init__(self, variables: list[tf.Variable], lr: float = 0.05) -> None:
        super().__init__()
        self.iterations = tf.Variable(0, dtype=tf.int64)
        self.velocity = [tf.Variable(tf.zeros_like(v)) for v in variables]
        self.lr = lr

    def apply_gradients(self, pairs: Any) -> None:
        for (g, v), m in zip(pairs, self.velocity, strict=True):
            m.assign(0.9 * m + g)
            v.assign_sub(self.lr * m)
        self.iterations.assign_add(1)


def dataset(aug: tf.random.Generator) -> tf.data.Dataset:
    def augment(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return x + 0.05 * aug.normal(tf.shape(x)), y

    options = tf.data.Options()
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    ds = tf.data.Dataset.from_tensor_slices((X, Y)).shuffle(N_SAMPLES, seed=3, reshuffle_each_iteration=True)
    return ds.repeat().map(augment).batch(BATCH).prefetch(2).with_options(options)


def build(seed: int = 0, hidden: int = 16, optimizer: str = "momentum") -> dict[str, Any]:
    net = MLP(seed, hidden)
    if optimizer == "keras":
        import keras

        opt: Any = keras.optimizers.Adam(learning_rate=keras.optimizers.schedules.ExponentialDecay(0.02, 5, 0.8))
        opt.build(net.trainable_variables)
    else:
        opt = Momentum(list(net.trainable_variables))
    aug = tf.random.Generator.from_seed(seed + 10)
    state: dict[str, Any] = {
        "net": net,
        "optimizer": opt,
        "dropout": tf.random.Generator.from_seed(seed + 20),
        "augment": aug,
        "data": iter(dataset(aug)),
        "step": tf.Variable(0, dtype=tf.int64),
    }
    state["train_step"] = _train_step(state)
    return state


def _train_step(state: dict[str, Any]) -> Any:
    net, opt, dropout, step = state["net"], state["optimizer"], state["dropout"], state["step"]

    @tf.function
    def train_step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            keep = dropout.uniform((tf.shape(x)[0], net.hidden["b"].shape[0])) >= DROPOUT
            logits = net(x, keep)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
        variables = list(net.trainable_variables)
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        step.assign_add(1)
        return loss

    return train_step


def saved_items(state: dict[str, Any]) -> dict[str, Any]:
    """The items runstate saves (not the compiled step)."""
    return {k: v for k, v in state.items() if k != "train_step"}


def train_one(state: dict[str, Any]) -> float:
    x, y = next(state["data"])
    return float(state["train_step"](x, y).numpy())


def final_arrays(state: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {f"net/{k}": np.asarray(v.numpy()) for k, v in runstate_module_variables(state["net"]).items()}
    for i, v in enumerate(state["optimizer"].variables):
        out[f"optimizer/{i}"] = np.asarray(v.numpy())
    for name in ("dropout", "augment"):
        out[name] = state[name].state.numpy()
    out["step"] = np.asarray(state["step"].numpy())
    return out


def runstate_module_variables(module: tf.Module) -> dict[str, tf.Variable]:
    from runstate.adapters.tensorflow import module_variables

    return module_variables(module)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--kill-at", type=int)
    p.add_argument("--resume", default="full", choices=["full", "no_iterator"])
    p.add_argument("--optimizer", default="keras", choices=["keras", "momentum"])
    args = p.parse_args()
    tf.config.experimental.enable_op_determinism()
    os.makedirs(args.out_dir, exist_ok=True)
    state = build(optimizer=args.optimizer)
    items = saved_items(state)
    with (
        runstate.CheckpointManager(args.run_dir, keep_last=2, save_every_steps=SAVE_EVERY) as mgr,
        open(os.path.join(args.out_dir, "losses.jsonl"), "a") as log,
    ):
        if args.resume == "full":
            mgr.restore(items)
        else:  # negative control: everything but the tf.data position (a fresh iterator)
            mgr.restore({k: v for k, v in items.items() if k != "data"}, strict=False)
        while int(state["step"].numpy()) < TOTAL_STEPS:
            loss = train_one(state)
            step = int(state["step"].numpy())
            log.write(json.dumps({"step": step, "loss": loss.hex()}) + "\n")
            log.flush()
            mgr.save(step, items)
            if step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    save_file(final_arrays(state), os.path.join(args.out_dir, "final.safetensors"))


if __name__ == "__main__":
    sys.exit(main())
