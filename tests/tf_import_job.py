"""Writes real TensorFlow checkpoints and runs ``runstate import`` on them, in one process.

Run by tests/test_import_tf.py as ``python tests/tf_import_job.py DIR`` with
``KERAS_BACKEND=tensorflow`` (importing TensorFlow costs seconds: everything that needs it
happens here, once). It writes, under DIR:

* ``tfrun/``: a seed-style custom loop (Keras model and Adam, a ``tf.Variable`` step, a
  shuffled ``tf.data`` iterator, a ``tf.random.Generator``, a ``tf.Module`` holding strings)
  saved 5 times by ``tf.train.CheckpointManager(max_to_keep=3)``;
* ``slots/``: a checkpoint whose keys continue a variable's path (a TF1 optimizer's slots);
* ``bad/``: an ``.index`` alone, a truncated ``.data`` file, garbage, a ``checkpoint`` file
  naming nothing;
* ``expected.npz`` + ``report.json``: every value TensorFlow reads back for each checkpoint
  key, the live values at the last save, and each CLI call's exit code, stdout and stderr.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf

from runstate.cli import main


class Strings(tf.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tag = tf.Variable(b"run-\x00\xff")
        self.vocab = tf.Variable([b"a", b"bc", b""])
        self.scale = tf.Variable(2.5, dtype=tf.float64)


def train_run(root: Path) -> dict[str, Any]:
    """The seed-style loop: restore latest or start fresh, 8 steps, save every 2, keep 3."""
    tf.random.set_seed(0)
    step = tf.Variable(0, dtype=tf.int64)
    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu"), keras.layers.Dense(1)])
    optimizer = keras.optimizers.Adam(1e-2)
    data = tf.data.Dataset.range(64).map(lambda i: tf.cast(i, tf.float32)).shuffle(16, seed=1).batch(4).repeat()
    iterator = iter(data)
    gen = tf.random.Generator.from_seed(3)
    extra = Strings()
    ckpt = tf.train.Checkpoint(step=step, optimizer=optimizer, net=net, iterator=iterator, gen=gen, extra=extra)
    manager = tf.train.CheckpointManager(ckpt, str(root / "tfrun"), max_to_keep=3)
    ckpt.restore(manager.latest_checkpoint)
    while int(step) < 10:
        x = tf.reshape(next(iterator), (4, 1)) * gen.normal((1, 4))
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(net(x) ** 2)
        grads = tape.gradient(loss, net.trainable_variables)
        optimizer.apply_gradients(zip(grads, net.trainable_variables, strict=True))
        step.assign_add(1)
        if int(step) % 2 == 0:
            manager.save()
    return {
        "step": step.numpy(),
        "iterations": optimizer.iterations.numpy(),
        "weights": [w.numpy() for w in net.weights],
        "gen_state": gen.state.numpy(),
        "scale": extra.scale.numpy(),
        "tag": extra.tag.numpy(),
        "vocab": extra.vocab.numpy().tolist(),
        "checkpoints": [os.path.basename(p) for p in manager.checkpoints],
    }


def slot_checkpoint(root: Path) -> None:
    """Keys that continue a variable's path: ``v/.OPTIMIZER_SLOT/opt/m/...`` next to ``v``."""
    v = tf.Variable([1.0, -2.0])
    opt = tf.compat.v1.train.AdamOptimizer(0.1)
    opt.minimize(lambda: tf.reduce_sum(v**2), var_list=[v])
    tf.train.Checkpoint(v=v, opt=opt).write(str(root / "slots" / "ckpt"))


def bad_checkpoints(root: Path) -> None:
    bad = root / "bad"
    bad.mkdir()
    src = root / "tfrun" / "ckpt-5"
    shutil.copy(f"{src}.index", bad / "alone.index")
    shutil.copy(f"{src}.index", bad / "truncated.index")
    data = Path(f"{src}.data-00000-of-00001").read_bytes()
    (bad / "truncated.data-00000-of-00001").write_bytes(data[: len(data) // 2])
    (bad / "junk.index").write_bytes(b"not an sstable" * 8)
    (bad / "junk.data-00000-of-00001").write_bytes(b"x")
    (bad / "stale").mkdir()
    (bad / "stale" / "checkpoint").write_text('model_checkpoint_path: "ckpt-9"\n')


def cli(*args: str) -> dict[str, Any]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["import", *args])
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def read_every_key(prefix: str) -> dict[str, Any]:
    reader = tf.train.load_checkpoint(prefix)
    dtypes = reader.get_variable_to_dtype_map()
    return {k: reader.get_tensor(k) for k in sorted(dtypes) if dtypes[k] != tf.variant}


def main_job(root: Path) -> None:
    live = train_run(root)
    slot_checkpoint(root)
    bad_checkpoints(root)
    calls = {
        "dir": cli(str(root / "tfrun"), "-o", str(root / "out" / "from_dir")),
        "prefix": cli(str(root / "tfrun" / "ckpt-4"), "-o", str(root / "out" / "from_prefix")),
        "index_file": cli(str(root / "tfrun" / "ckpt-3.index"), "-o", str(root / "out" / "from_index")),
        "slots": cli(str(root / "slots" / "ckpt"), "-o", str(root / "out" / "slots"), "--step", "1"),
    }
    for name in ("alone", "truncated", "junk"):
        calls[name] = cli(str(root / "bad" / name), "-o", str(root / "out" / name))
    calls["stale"] = cli(str(root / "bad" / "stale"), "-o", str(root / "out" / "stale"))
    expected: dict[str, Any] = {}
    strings: dict[str, Any] = {}
    for label, prefix in (("ckpt-5", "tfrun/ckpt-5"), ("ckpt-4", "tfrun/ckpt-4"), ("slots", "slots/ckpt")):
        for key, value in read_every_key(str(root / prefix)).items():
            if isinstance(value, bytes) or (isinstance(value, np.ndarray) and value.dtype == object):
                strings[f"{label}|{key}"] = [v.hex() for v in np.asarray(value, dtype=object).ravel()]
            else:
                expected[f"{label}|{key}"] = np.asarray(value)
    for i, w in enumerate(live.pop("weights")):
        expected[f"live|weight{i}"] = w
    for name in ("step", "iterations", "gen_state", "scale"):
        expected[f"live|{name}"] = np.asarray(live.pop(name))
    live["tag"] = live["tag"].hex()
    live["vocab"] = [v.hex() for v in live["vocab"]]
    np.savez(root / "expected.npz", allow_pickle=False, **expected)
    report = {"calls": calls, "strings": strings, "live": live, "tensorflow_in_cli": "tensorflow" in sys.modules}
    (root / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main_job(Path(sys.argv[1]))
