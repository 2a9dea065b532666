"""A JAX + optax training job for the conformance suite; run as a subprocess (on CPU).

    python jax_job.py RUN_DIR OUT_DIR [--kill-at STEP] [--resume full|fresh_optimizer]

An MLP with dropout trained by ``optax.adamw`` on a warmup-cosine schedule (chained after
gradient clipping, so the optimizer state is a tuple of optax NamedTuples). Dropout draws
from a typed key (``jax.random.key``) split every step; each epoch's shuffle comes from a raw
uint32 key (``jax.random.PRNGKey``). The whole state is one dict of pytrees; runstate
replaces its values on restore. See ``tests/conformance.py`` for the protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import save_file

import runstate

N_SAMPLES = 96
BATCH = 8
STEPS_PER_EPOCH = N_SAMPLES // BATCH  # 12
TOTAL_STEPS = 30
SAVE_EVERY = 4
DROPOUT = 0.2

data_rng = np.random.default_rng(7)
X = jnp.asarray(data_rng.standard_normal((N_SAMPLES, 10)).astype(np.float32))
Y = jnp.asarray(data_rng.integers(0, 3, N_SAMPLES).astype(np.int32))

OPTIMIZER = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 5e-2, 5, TOTAL_STEPS), weight_decay=0.05),
)


def init_params(key: jax.Array, hidden: int) -> dict[str, Any]:
    k1, k2 = jax.random.split(key)
    return {
        "hidden": {"w": jax.random.normal(k1, (10, hidden)) * 0.3, "b": jnp.zeros(hidden)},
        "out": {"w": jax.random.normal(k2, (hidden, 3)) * 0.3, "b": jnp.zeros(3)},
    }


def build(seed: int = 0, hidden: int = 32) -> dict[str, Any]:
    params = init_params(jax.random.key(seed), hidden)
    return {
        "params": params,
        "opt_state": OPTIMIZER.init(params),
        "dropout_key": jax.random.key(seed + 1),
        "data": {"epoch": 0, "batch": 0, "shuffle_key": jax.random.PRNGKey(seed + 2)},
        "step": 0,
    }


def loss_fn(params: dict[str, Any], x: jax.Array, y: jax.Array, key: jax.Array) -> jax.Array:
    h = jax.nn.relu(x @ params["hidden"]["w"] + params["hidden"]["b"])
    keep = jax.random.bernoulli(key, 1.0 - DROPOUT, h.shape)
    h = jnp.where(keep, h / (1.0 - DROPOUT), 0.0)
    logits = h @ params["out"]["w"] + params["out"]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@jax.jit
def train_step(
    params: Any, opt_state: Any, dropout_key: jax.Array, shuffle_key: jax.Array, epoch: jax.Array, batch: jax.Array
) -> Any:
    """The batch is a slice of the epoch's permutation, a pure function of (shuffle_key, epoch)."""
    order = jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), N_SAMPLES)
    idx = jax.lax.dynamic_slice(order, (batch * BATCH,), (BATCH,))
    dropout_key, key = jax.random.split(dropout_key)
    loss, grads = jax.value_and_grad(loss_fn)(params, X[idx], Y[idx], key)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, dropout_key, loss


def train_one(state: dict[str, Any]) -> float:
    """One optimizer step on the next batch; updates ``state`` and returns the loss."""
    data = state["data"]
    epoch, batch = np.int32(data["epoch"]), np.int32(data["batch"])
    state["params"], state["opt_state"], state["dropout_key"], loss = train_step(
        state["params"], state["opt_state"], state["dropout_key"], data["shuffle_key"], epoch, batch
    )
    state["step"] += 1
    data["batch"] += 1
    if data["batch"] == STEPS_PER_EPOCH:
        data["epoch"], data["batch"] = data["epoch"] + 1, 0
    return float(loss)


def final_arrays(state: dict[str, Any]) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path((state["params"], state["opt_state"]))[0]
    out = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}
    out["dropout_key"] = np.asarray(jax.random.key_data(state["dropout_key"]))
    out["shuffle_key"] = np.asarray(state["data"]["shuffle_key"])
    out["position"] = np.asarray([state["step"], state["data"]["epoch"], state["data"]["batch"]], dtype=np.int64)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--kill-at", type=int)
    p.add_argument("--resume", default="full", choices=["full", "fresh_optimizer"])
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    state = build()
    with (
        runstate.CheckpointManager(args.run_dir, keep_last=2, save_every_steps=SAVE_EVERY) as mgr,
        open(os.path.join(args.out_dir, "losses.jsonl"), "a") as log,
    ):
        if args.resume == "full":
            mgr.restore(state)
        else:  # negative control: everything but the optimizer's moments and counts
            partial = {k: v for k, v in state.items() if k != "opt_state"}
            mgr.restore(partial, strict=False)
            state.update(partial)
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
