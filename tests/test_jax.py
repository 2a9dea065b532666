"""JAX + optax: pytrees of jax arrays, optax NamedTuple states and PRNG keys.

The conformance suite runs on ``tests/e2e/jax_job.py`` (adamw on a warmup-cosine schedule,
killed and resumed, bit-identical on CPU); the tests below cover what is particular to JAX.
"""

from __future__ import annotations

import builtins
import json
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

import runstate  # noqa: E402
from tests.conformance import Conformance  # noqa: E402

JOB = Path(__file__).parent / "e2e" / "jax_job.py"


def _job() -> Any:
    from tests.e2e import jax_job

    return jax_job


class TestJaxConformance(Conformance):
    adapter = "jax"
    in_place_items = ()  # jax values are immutable: every item is replaced
    negative_resume = "fresh_optimizer"
    save_every = 4
    total_steps = 30
    kill_at = 19  # last checkpoint 16: four batches into the second epoch

    def make_state(self, seed: int) -> dict[str, Any]:
        job = _job()
        state = job.build(seed)
        for _ in range(2 + seed):
            job.train_one(state)
        return state

    def train(self, state: dict[str, Any], steps: int) -> dict[str, Any]:
        for _ in range(steps):
            _job().train_one(state)
        return state

    def values(self, state: dict[str, Any]) -> dict[str, np.ndarray]:
        return dict(_job().final_arrays(state))

    def mismatched_state(self) -> dict[str, Any]:
        return _job().build(0, hidden=16)

    def job_command(self) -> list[str]:
        return [sys.executable, str(JOB)]

    def job_env(self) -> dict[str, str]:
        return {"JAX_PLATFORMS": "cpu"}

    def test_restored_values_are_jax_values_of_the_same_kinds(self, tmp_path: Path) -> None:
        saved = self.make_state(0)
        runstate.save(tmp_path / "ck", saved)
        target = self.make_state(1)
        runstate.load(tmp_path / "ck", target)
        assert jax.tree_util.tree_structure(target) == jax.tree_util.tree_structure(saved)
        assert isinstance(target["opt_state"][1][0], optax.ScaleByAdamState)
        assert jax.random.key_impl(target["dropout_key"]) == jax.random.key_impl(saved["dropout_key"])
        assert target["data"]["shuffle_key"].dtype == jnp.uint32
        assert type(target["step"]) is int
        for leaf in jax.tree_util.tree_leaves(target["params"]):
            assert isinstance(leaf, jax.Array)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_typed_keys_keep_their_implementation_and_shape(tmp_path: Path, impl: str) -> None:
    keys = {"one": jax.random.key(5, impl=impl), "many": jax.random.split(jax.random.key(6, impl=impl), 3)}
    runstate.save(tmp_path / "ck", {"keys": keys})
    tree = json.loads((tmp_path / "ck" / "manifest.json").read_text())["items"]["keys"]["tree"]
    assert tree["v"][0][1] == {
        "t": "object",
        "kind": "jax.random.key",
        "attrs": {"impl": impl},
        "v": tree["v"][0][1]["v"],
    }
    got = runstate.load(tmp_path / "ck")["keys"]
    for name, key in keys.items():
        assert str(jax.random.key_impl(got[name])) == impl
        assert got[name].shape == key.shape
        np.testing.assert_array_equal(jax.random.key_data(got[name]), jax.random.key_data(key))
        # the restored key draws the same numbers
        np.testing.assert_array_equal(
            jax.random.uniform(got[name].reshape(-1)[0]), jax.random.uniform(key.reshape(-1)[0])
        )


def test_dtypes_and_weak_types_survive(tmp_path: Path) -> None:
    values = {
        "bf16": jnp.asarray([1.5, -2.25, 3.0], dtype=jnp.bfloat16),
        "f16": jnp.asarray([0.1, 0.2], dtype=jnp.float16),
        "i8": jnp.arange(4, dtype=jnp.int8),
        "bool": jnp.asarray([True, False]),
        "weak": jnp.asarray(0.1),  # from a Python scalar: weakly typed
        "strong": jnp.asarray(np.float32(0.1)),
        "empty": jnp.zeros((0, 3)),
    }
    runstate.save(tmp_path / "ck", {"v": values})
    got = runstate.load(tmp_path / "ck")["v"]
    for k, v in values.items():
        assert isinstance(got[k], jax.Array) and got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert got[k].weak_type == v.weak_type, k
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v))
    # weak vs strong matters: it decides the result dtype of mixed arithmetic
    assert (got["weak"] * values["bf16"]).dtype == jnp.bfloat16
    assert (got["strong"] * values["bf16"]).dtype == jnp.float32


def test_64_bit_arrays_need_64_bit_mode_to_load(tmp_path: Path) -> None:
    with jax.enable_x64(True):
        runstate.save(tmp_path / "ck", {"x": jnp.arange(3, dtype=jnp.float64)})
        assert runstate.load(tmp_path / "ck")["x"].dtype == jnp.float64
    with pytest.raises(runstate.UnsupportedTypeError, match="jax_enable_x64"):
        runstate.load(tmp_path / "ck")


def test_a_different_pytree_structure_is_a_mismatch(tmp_path: Path) -> None:
    runstate.save(tmp_path / "ck", {"params": {"w": jnp.ones(3), "b": jnp.zeros(1)}})
    live = {"params": {"w": jnp.ones(3), "bias": jnp.zeros(1)}}
    with pytest.raises(runstate.StateMismatchError, match=r"state\['params'\]: pytree structure"):
        runstate.load(tmp_path / "ck", live)
    assert "bias" in live["params"]
    with pytest.raises(runstate.StateMismatchError, match=r"dtype int32 in checkpoint, float32 live"):
        runstate.save(tmp_path / "ck2", {"w": jnp.ones(3, jnp.int32)})
        runstate.load(tmp_path / "ck2", {"w": jnp.ones(3)})
    # strict=False: the mismatching item keeps its live value
    runstate.load(tmp_path / "ck", live, strict=False)
    assert "bias" in live["params"]


class Moments(NamedTuple):
    count: Any
    mu: Any


def test_namedtuples_are_rebuilt_only_from_the_live_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opt = optax.adam(1e-3)
    params = {"w": jnp.ones(2)}
    state = opt.update({"w": jnp.ones(2)}, opt.init(params), params)[1]
    runstate.save(tmp_path / "ck", {"opt": state, "mine": Moments(jnp.asarray(1), {"w": jnp.ones(2)})})

    imported: list[str] = []
    real_import = builtins.__import__

    def spy(name: str, *args: Any, **kwargs: Any) -> Any:
        imported.append(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", spy)
    plain = runstate.load(tmp_path / "ck")
    monkeypatch.undo()
    assert not [n for n in imported if "optax" in n or "tests" in n], imported
    # without a live value: plain tuples, same leaves
    assert type(plain["opt"][0]) is tuple and type(plain["mine"]) is tuple
    assert jax.tree_util.tree_leaves(plain["opt"]) and len(jax.tree_util.tree_leaves(plain["opt"])) == len(
        jax.tree_util.tree_leaves(state)
    )
    # with live values of the same classes: the classes come back
    live = {"opt": opt.init(params), "mine": Moments(jnp.asarray(0), {"w": jnp.zeros(2)})}
    runstate.load(tmp_path / "ck", live)
    assert type(live["opt"][0]) is type(state[0]) and type(live["mine"]) is Moments
    assert int(live["mine"].count) == 1 and int(live["opt"][0].count) == 1


def test_a_namedtuple_of_another_class_is_a_mismatch(tmp_path: Path) -> None:
    class Other(NamedTuple):
        count: Any
        mu: Any

    runstate.save(tmp_path / "ck", {"m": Moments(jnp.asarray(1), jnp.ones(2))})
    live = {"m": Other(jnp.asarray(0), jnp.zeros(2))}
    with pytest.raises(runstate.StateMismatchError, match=r"Moments.* in the checkpoint, a .*Other.* live"):
        runstate.load(tmp_path / "ck", live)
    assert type(live["m"]) is Other


def test_traced_values_are_refused() -> None:
    from runstate.adapters import find_codec

    @jax.jit
    def inside(x: Any) -> Any:
        codec = find_codec(x)
        assert codec is not None
        with pytest.raises(runstate.UnsupportedTypeError, match="traced jax value"):
            codec.to_blob(x, "state['x']")
        return x

    inside(jnp.ones(2))


def test_jax_is_imported_only_for_checkpoints_that_need_it(tmp_path: Path) -> None:
    import subprocess

    runstate.save(tmp_path / "np", {"a": np.ones(2)})
    runstate.save(tmp_path / "jax", {"a": jnp.ones(2), "k": jax.random.key(0)})
    code = (
        "import sys, runstate\n"
        f"runstate.load({str(tmp_path / 'np')!r}); print('jax' in sys.modules)\n"
        f"got = runstate.load({str(tmp_path / 'jax')!r}); print('jax' in sys.modules, type(got['a']).__name__)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["False", "True", "ArrayImpl"]
