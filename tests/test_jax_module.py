"""runstate.jax: the public JAX helpers (issue 16: one public module per framework)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

import runstate.jax  # noqa: E402


def test_runstate_jax_is_reached_lazily_and_imports_jax_only_then() -> None:
    code = (
        "import sys, runstate\n"
        "assert 'jax' not in sys.modules and 'runstate.jax' not in sys.modules\n"
        "helpers = runstate.jax\n"
        "assert 'jax' in sys.modules and helpers.__name__ == 'runstate.jax'\n"
        "print(sorted(helpers.__all__))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['is_key', 'mismatches', 'place_like']"


def test_is_key_tells_typed_keys_from_raw_ones() -> None:
    assert runstate.jax.is_key(jax.random.key(0))
    assert runstate.jax.is_key(jax.random.split(jax.random.key(0), 3))
    assert not runstate.jax.is_key(jax.random.PRNGKey(0))  # raw uint32: an ordinary array
    assert not runstate.jax.is_key(np.zeros(2, np.uint32))


def test_mismatches_and_place_like_on_a_tree_loaded_without_a_live_state(tmp_path: Path) -> None:
    params = {"w": jnp.ones(3), "b": jnp.zeros(1)}
    opt_state = optax.adam(1e-3).init(params)
    runstate.save(tmp_path / "ck", {"opt_state": opt_state})
    loaded = runstate.load(tmp_path / "ck")["opt_state"]  # NamedTuples come back as plain tuples
    assert type(loaded[0]) is tuple
    assert (
        runstate.jax.mismatches(opt_state, loaded)
        and "pytree structure" in runstate.jax.mismatches(opt_state, loaded)[0]
    )
    placed = runstate.jax.place_like(loaded, opt_state)
    for got, live in zip(jax.tree_util.tree_leaves(placed), jax.tree_util.tree_leaves(opt_state), strict=True):
        assert isinstance(got, jax.Array) and got.sharding == live.sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(live))
    # negative controls: a matching tree has no mismatch; a wrong shape or leaf count is reported
    assert runstate.jax.mismatches(params, {"w": jnp.ones(3), "b": jnp.zeros(1)}) == []
    assert runstate.jax.mismatches(params, {"w": jnp.ones(4), "b": jnp.zeros(1)}) == [
        "tree['w']: shape (4,) in checkpoint, (3,) live"
    ]
    with pytest.raises(runstate.StateMismatchError, match="2 leaves restored, 1 live"):
        runstate.jax.place_like(params, {"w": jnp.ones(3)})
