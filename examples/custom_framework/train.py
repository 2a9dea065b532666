"""Train a tinynn model with runstate: kill it at any moment, run it again, get the same result.

    python examples/custom_framework/train.py RUN_DIR OUT_DIR [--optimizer adam|sgd|rmsprop]
        [--kill-at STEP] [--resume full|reset_moments]

Every step appends ``{"step", "loss"}`` to ``OUT_DIR/losses.jsonl``; a finished run writes
its weights and optimizer moments to ``OUT_DIR/final.safetensors``. ``--kill-at`` SIGKILLs
the process right after that step (and its save, if one was due); running the same command
again resumes from the newest checkpoint. ``--resume reset_moments`` restores everything
but then zeroes the optimizer's moments: the negative control, which must end differently.
See docs/custom-frameworks.md for a walk through this file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

import numpy as np
import resumable
import tinynn
from safetensors.numpy import save_file

import runstate

N_SAMPLES, BATCH = 96, 8
STEPS_PER_EPOCH = N_SAMPLES // BATCH  # 12
TOTAL_STEPS = 30
SAVE_EVERY = 4

_data = np.random.default_rng(7)
X = _data.standard_normal((N_SAMPLES, 10))
Y = _data.integers(0, 3, N_SAMPLES)

OPTIMIZERS: dict[str, Any] = {
    "adam": lambda p: tinynn.Adam(p, lr=1e-2),
    "sgd": lambda p: tinynn.SGD(p, lr=5e-2, momentum=0.9),
    "rmsprop": lambda p: tinynn.RMSprop(p, lr=5e-3),
}


def build(seed: int = 0, optimizer: str = "adam", hidden: int = 32) -> dict[str, Any]:
    """The whole training state: everything a resumed run needs to continue exactly."""
    init = np.random.default_rng(seed)
    dropout_rng = np.random.default_rng(seed + 1)
    model = tinynn.Sequential(
        tinynn.Linear(10, hidden, init), tinynn.ReLU(), tinynn.Dropout(0.2, dropout_rng), tinynn.Linear(hidden, 3, init)
    )
    shuffle_rng = np.random.default_rng(seed + 2)
    return {
        "model": model,  # registered: get_weights / set_weights
        "optimizer": OPTIMIZERS[optimizer](model.parameters()),  # registered: save_state / load_state
        "dropout_rng": dropout_rng,  # a NumPy Generator: restored in place
        "data": {"epoch": 0, "batch": 0, "order": shuffle_rng.permutation(N_SAMPLES), "shuffle_rng": shuffle_rng},
        "step": 0,
    }


def train_one(state: dict[str, Any]) -> float:
    """One optimizer step on the next batch of the epoch's order; returns the loss."""
    model, opt, data = state["model"], state["optimizer"], state["data"]
    idx = data["order"][data["batch"] * BATCH : (data["batch"] + 1) * BATCH]
    loss, grad = tinynn.softmax_cross_entropy(model.forward(X[idx]), Y[idx])
    model.backward(grad)
    opt.step(model.gradients())
    state["step"] += 1
    data["batch"] += 1
    if data["batch"] == STEPS_PER_EPOCH:
        data["epoch"], data["batch"] = data["epoch"] + 1, 0
        data["order"] = data["shuffle_rng"].permutation(N_SAMPLES)
    return loss


def final_arrays(state: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {f"model.{k}": v.copy() for k, v in state["model"].parameters().items()}
    saved = state["optimizer"].save_state()
    for kind, buffers in saved["moments"].items():
        out.update({f"optimizer.{kind}.{k}": v for k, v in buffers.items()})
    out["optimizer.t"] = np.asarray(saved["t"])
    out["dropout_rng"] = _generator_state(state["dropout_rng"])
    out["data.shuffle_rng"] = _generator_state(state["data"]["shuffle_rng"])
    out["data"] = np.asarray([state["step"], state["data"]["epoch"], state["data"]["batch"]])
    out["data.order"] = state["data"]["order"].copy()
    return out


def _generator_state(rng: np.random.Generator) -> np.ndarray:
    s = rng.bit_generator.state  # PCG64: two 128-bit integers
    words = [s["state"]["state"], s["state"]["inc"]]
    return np.asarray([w >> shift & (2**64 - 1) for w in words for shift in (0, 64)], dtype=np.uint64)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--optimizer", default="adam", choices=sorted(OPTIMIZERS))
    p.add_argument("--kill-at", type=int)
    p.add_argument("--resume", default="full", choices=["full", "reset_moments"])
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    resumable.register()
    state = build(optimizer=args.optimizer)
    with (
        runstate.CheckpointManager(args.run_dir, keep_last=2, save_every_steps=SAVE_EVERY) as mgr,
        open(os.path.join(args.out_dir, "losses.jsonl"), "a") as log,
    ):
        mgr.restore(state)
        if args.resume == "reset_moments":
            fresh = OPTIMIZERS[args.optimizer](state["model"].parameters()).save_state()
            state["optimizer"].load_state({**state["optimizer"].save_state(), "moments": fresh["moments"]})
        while state["step"] < TOTAL_STEPS:
            loss = train_one(state)
            log.write(json.dumps({"step": state["step"], "loss": loss.hex()}) + "\n")
            log.flush()
            mgr.save(state["step"], state)
            if state["step"] == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    save_file(final_arrays(state), os.path.join(args.out_dir, "final.safetensors"))


if __name__ == "__main__":
    sys.exit(main())
