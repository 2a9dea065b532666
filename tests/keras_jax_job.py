"""Keras on the JAX backend: ``runstate.keras.State`` in a ``train_on_batch`` loop resumes exactly.

    KERAS_BACKEND=jax python tests/keras_jax_job.py RUN_DIR

Trains 5 steps, saves, trains 5 more (the reference); then a model built with other weights
restores the checkpoint and trains the same 5 steps. Prints one JSON line: the keys that differ
from the reference after the resume (``resumed``), after a resume whose optimizer moments were
zeroed (``control``, the negative control), whether ``Checkpoint`` refused the backend, and the
keys saved. Every step also draws from Keras' global seed generator (``keras.random.normal``
without a seed), which the model's input depends on.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import keras
import numpy as np

import runstate
import runstate.keras

if __package__:
    from tests.e2e import keras_job
else:  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.e2e import keras_job


def step(model: Any, i: int) -> None:
    x = keras_job.X[(i * 8) % 96 :][:8]
    noise = keras.ops.convert_to_numpy(keras.random.normal((8, 10)))  # Keras' global seed generator
    model.train_on_batch(x + 0.1 * noise, keras_job.Y[(i * 8) % 96 :][:8])


def fresh(seed: int) -> tuple[Any, dict[str, Any]]:
    model = keras_job.build(seed)
    model.train_on_batch(keras_job.X[:8], keras_job.Y[:8])  # builds the optimizer and metrics
    return model, {"keras": runstate.keras.State(model), "step": 0}


def main() -> None:
    run_dir = sys.argv[1]
    model, state = fresh(0)
    for i in range(5):
        step(model, i)
    runstate.save(os.path.join(run_dir, "ck"), {**state, "step": 5})
    for i in range(5, 10):
        step(model, i)
    reference = state["keras"].state_dict()
    out: dict[str, Any] = {"keys": sorted(reference)}
    for name in ("resumed", "control"):
        model2, state2 = fresh(3)
        runstate.load(os.path.join(run_dir, "ck"), state2)
        if name == "control":
            for v in model2.optimizer.variables:
                if "momentum" in v.path or "velocity" in v.path:
                    v.assign(np.zeros(v.shape, dtype=v.dtype))
        for i in range(5, 10):
            step(model2, i)
        got = state2["keras"].state_dict()
        out[name] = [k for k in reference if not np.array_equal(reference[k], got[k])]
    try:
        runstate.keras.Checkpoint(runstate.CheckpointManager(os.path.join(run_dir, "fit")))
        out["checkpoint_refused"] = False
    except NotImplementedError:
        out["checkpoint_refused"] = True
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
