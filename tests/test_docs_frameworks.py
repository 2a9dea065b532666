"""The examples of docs/frameworks.md run as written, and a second run resumes.

Each example gets a tiny model and data defined first (its "prelude"); it then runs twice in
a fresh namespace, as a script would after a crash, and the second run must resume from the
first's checkpoints instead of starting over.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import runstate

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")


def examples() -> dict[str, str]:
    text = (ROOT / "docs" / "frameworks.md").read_text()
    found = re.findall(r"<!-- example: (\w+) -->\n```python\n(.*?)```", text, re.S)
    return dict(found)


def test_every_family_has_a_short_example() -> None:
    found = examples()
    assert set(found) == {"keras_fit", "keras_loop", "jax", "custom"}
    assert all(len(code.strip().splitlines()) <= 6 for code in found.values())


def run_twice(code: str, prelude: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    monkeypatch.chdir(tmp_path)
    spaces = []
    for _ in range(2):
        ns = prelude()
        exec(compile(code, "docs/frameworks.md", "exec"), ns)
        spaces.append(ns)
    return spaces


def test_keras_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keras = pytest.importorskip("keras")
    from tests.e2e import keras_job

    def prelude() -> dict[str, Any]:
        return {"model": keras_job.build(), "x": keras_job.X, "y": keras_job.Y}

    first, second = run_twice(examples()["keras_fit"], prelude, tmp_path, monkeypatch)
    assert keras.ops.convert_to_numpy(second["model"].optimizer.iterations) == keras_job.TOTAL_STEPS
    a, b = (keras_job.train_arrays(ns["model"]) for ns in (first, second))
    assert all(np.array_equal(a[k], b[k]) for k in a)  # the second run resumed at the end: nothing retrained


def test_keras_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keras = pytest.importorskip("keras")
    from tests import test_keras

    def prelude() -> dict[str, Any]:
        model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(3)])
        optimizer = keras.optimizers.Adam(1e-2)
        return {
            "runstate": runstate,
            "model": model,
            "optimizer": optimizer,
            "batch": test_keras.batch,
            "train_step": lambda x, y: test_keras._custom_step(model, optimizer, x, y),
        }

    _, second = run_twice(examples()["keras_loop"], prelude, tmp_path, monkeypatch)
    assert second["state"]["step"] == 10 and sorted(second["mgr"].steps()) == [4, 8]
    assert int(keras.ops.convert_to_numpy(second["optimizer"].iterations)) == 10


def test_jax(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    optax = pytest.importorskip("optax")
    tx = optax.adamw(1e-2)

    @jax.jit
    def train_step(params: Any, opt_state: Any, key: Any) -> Any:
        key, sub = jax.random.split(key)
        x = jax.random.normal(sub, (8, 3))
        grads = jax.grad(lambda p: jnp.mean((x @ p["w"]) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key

    def prelude() -> dict[str, Any]:
        return {"runstate": runstate, "jax": jax, "tx": tx, "params": {"w": jnp.ones((3, 2))}, "train_step": train_step}

    first, second = run_twice(examples()["jax"], prelude, tmp_path, monkeypatch)
    assert second["state"]["step"] == 10
    assert np.array_equal(first["state"]["params"]["w"], second["state"]["params"]["w"])
    assert type(second["state"]["opt_state"][0]) is type(first["state"]["opt_state"][0])


def test_custom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(ROOT / "examples" / "custom_framework"))
    import tinynn

    def prelude() -> dict[str, Any]:
        rng = np.random.default_rng(0)
        model = tinynn.Sequential(tinynn.Linear(3, 2, rng))
        return {"runstate": runstate, "Adam": tinynn.Adam, "model": model}

    try:
        run_twice(examples()["custom"], prelude, tmp_path, monkeypatch)
        with pytest.raises(ValueError, match="already registered"):
            runstate.register(tinynn.Adam, get_state=lambda o: 0, set_state=lambda o, s: None)
    finally:
        if tinynn.Adam in runstate.registry:
            runstate.registry.unregister(tinynn.Adam)
