"""TensorFlow custom loops: variables, modules, generators and the ``tf.data`` position.

The conformance family runs ``tests/e2e/tf_job.py`` (a ``tf.Module`` trained by a
``tf.function`` step, Keras' Adam on the TensorFlow backend in the subprocess, a tf.data
pipeline that reshuffles every epoch and augments with a ``tf.random.Generator`` inside
``map``, dropout from another generator): SIGKILLed mid-epoch and resumed bit for bit, and not
when the iterator is left out. The tests below measure which ``tf.data`` pipelines resume
exactly and check that the others are refused with the fix.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

# ``import tensorflow`` imports keras: keep the backend the rest of this worker uses (tests/test_keras.py).
os.environ.setdefault("KERAS_BACKEND", "torch")
tf = pytest.importorskip("tensorflow", reason="tensorflow-cpu is installed by make test")

import runstate  # noqa: E402
from runstate.adapters.tensorflow import (  # noqa: E402
    iterator_state,
    module_variables,
    set_iterator_state,
    shuffle_seeds,
)
from tests.conformance import Conformance  # noqa: E402

JOB = Path(__file__).parent / "e2e" / "tf_job.py"
_GEN = tf.random.Generator.from_seed(0)
A = tf.data.AUTOTUNE


def _job() -> Any:
    from tests.e2e import tf_job

    return tf_job


class TestTensorflowConformance(Conformance):
    """A custom TF loop; in-process with a momentum optimizer of tf.Variables (this worker's
    keras is on another backend), in the subprocess with Keras' Adam on TensorFlow."""

    adapter = "tensorflow"
    in_place_items = ("net", "optimizer", "dropout", "augment", "data", "step")
    negative_resume = "no_iterator"
    save_every = 4
    total_steps = 18
    kill_at = 10
    job_timeout = 300
    _full: ClassVar[dict[int, dict[str, Any]]] = {}

    def _items(self, full: dict[str, Any]) -> dict[str, Any]:
        items = _job().saved_items(full)
        items["x_mean"] = tf.constant(_job().X.mean(axis=0))  # a tf.Tensor: replaced on restore
        self._full[id(items)] = full
        return items

    def make_state(self, seed: int) -> dict[str, Any]:
        full = _job().build(seed)
        for _ in range(1 + seed):
            _job().train_one(full)
        return self._items(full)

    def train(self, state: dict[str, Any], steps: int) -> dict[str, Any]:
        for _ in range(steps):
            _job().train_one(self._full[id(state)])
        return state

    def values(self, state: dict[str, Any]) -> dict[str, np.ndarray]:
        out = dict(_job().final_arrays(state))
        out["x_mean"] = state["x_mean"].numpy()
        return out

    def mismatched_state(self) -> dict[str, Any]:
        return self._items(_job().build(0, hidden=8))

    def job_command(self) -> list[str]:
        return [sys.executable, str(JOB), "--optimizer", "keras"]

    def job_env(self) -> dict[str, str]:
        return {"KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}

    def test_a_compiled_step_traced_before_the_restore_trains_the_restored_values(self, tmp_path: Path) -> None:
        saved = self.make_state(0)
        runstate.save(tmp_path / "ck", saved)
        target = self.make_state(1)
        w = target["net"].hidden["w"]
        runstate.load(tmp_path / "ck", target)
        assert target["net"].hidden["w"] is w  # assigned, not replaced: the traced step still holds it
        losses = [_job().train_one(self._full[id(s)]) for s in (saved, target)]
        assert losses[0] == losses[1]
        assert isinstance(target["x_mean"], tf.Tensor)


# -- strict checks ----------------------------------------------------------------------------


class Net(tf.Module):
    def __init__(self, n: int = 3, dtype: Any = tf.float32, extra: bool = False) -> None:
        super().__init__()
        self.w = tf.Variable(tf.ones([n, 2], dtype=dtype))
        self.layers = [tf.Variable(1.0), {"b": tf.Variable([2.0])}]
        if extra:
            self.extra = tf.Variable(0.0)


def test_module_variables_are_stored_by_path(tmp_path: Path) -> None:
    runstate.save(tmp_path / "ck", {"net": Net(), "step": tf.Variable(7, dtype=tf.int64)})
    got = runstate.load(tmp_path / "ck")
    assert sorted(got["net"]) == ["layers/0", "layers/1/b", "w"]
    assert got["step"].dtype == np.int64 and int(got["step"]) == 7
    assert sorted(module_variables(Net())) == ["layers/0", "layers/1/b", "w"]


def test_a_module_holding_a_keras_layer_is_refused(tmp_path: Path) -> None:
    import keras

    net = Net()
    net.dense = keras.layers.Dense(2)
    net.dense.build((None, 3))
    with pytest.raises(runstate.UnsupportedTypeError, match=r"holds a Keras Dense at 'dense'.*runstate.keras.State"):
        runstate.save(tmp_path / "ck", {"net": net})


def test_a_module_with_its_own_state_dict_keeps_it(tmp_path: Path) -> None:
    class Custom(Net):
        def state_dict(self) -> dict[str, Any]:
            return {"w_sum": float(self.w.numpy().sum())}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.w.assign(tf.fill(self.w.shape, state["w_sum"] / 6))

    runstate.save(tmp_path / "ck", {"net": Custom()})
    assert runstate.load(tmp_path / "ck")["net"] == {"w_sum": 6.0}


@pytest.mark.parametrize(
    ("live", "expected"),
    [
        (lambda: Net(4), r"\['net'\]\['w'\]: shape \(3, 2\) in checkpoint, \(4, 2\) live"),
        (lambda: Net(dtype=tf.float64), r"\['net'\]\['w'\]: dtype float32 in checkpoint, float64 live"),
        (lambda: Net(extra=True), r"\['net'\]\['extra'\]: missing from the checkpoint"),
    ],
)
def test_a_mismatch_raises_before_anything_changes(tmp_path: Path, live: Any, expected: str) -> None:
    runstate.save(tmp_path / "ck", {"net": Net(), "gen": tf.random.Generator.from_seed(1)})
    target = {"net": live(), "gen": tf.random.Generator.from_seed(2)}
    target["net"].layers[0].assign(5.0)
    before = target["gen"].state.numpy().copy()
    with pytest.raises(runstate.StateMismatchError, match=expected):
        runstate.load(tmp_path / "ck", target)
    assert float(target["net"].layers[0].numpy()) == 5.0
    np.testing.assert_array_equal(target["gen"].state.numpy(), before)


def test_a_generator_of_another_algorithm_is_a_mismatch(tmp_path: Path) -> None:
    runstate.save(tmp_path / "ck", {"gen": tf.random.Generator.from_seed(1, alg="philox")})
    with pytest.raises(runstate.StateMismatchError, match=r"\['gen'\]\['state'\]: shape \(3,\) in checkpoint"):
        runstate.load(tmp_path / "ck", {"gen": tf.random.Generator.from_seed(1, alg="threefry")})


@pytest.fixture
def global_seed() -> Any:
    tf.random.set_seed(11)
    yield
    tf.random.set_seed(None)  # other tests check what happens without one


@pytest.mark.usefixtures("global_seed")
def test_global_seed_and_generator_are_part_of_rng(tmp_path: Path) -> None:
    tf.random.get_global_generator().normal([2])
    runstate.save(tmp_path / "ck", {"rng": runstate.RNG()})
    seeds = shuffle_seeds(iter(tf.data.Dataset.range(4).shuffle(4)))  # op seed drawn from the global seed
    draw = tf.random.get_global_generator().normal([3]).numpy()
    runstate.load(tmp_path / "ck", {"rng": runstate.RNG()})
    assert shuffle_seeds(iter(tf.data.Dataset.range(4).shuffle(4))) == seeds
    np.testing.assert_array_equal(tf.random.get_global_generator().normal([3]).numpy(), draw)
    # negative control: without the restore, the next op seed differs
    assert shuffle_seeds(iter(tf.data.Dataset.range(4).shuffle(4))) != seeds


# -- tf.data: which pipelines resume exactly ---------------------------------------------------


def _outer() -> Any:  # shuffle outside repeat: reshuffles every epoch
    return tf.data.Dataset.range(10).shuffle(10, seed=1).repeat().map(lambda x: x * 2).batch(3).prefetch(2)


def _inner() -> Any:  # shuffle inside repeat, partial last batch of every epoch
    return tf.data.Dataset.range(10).shuffle(10, seed=1).map(lambda x: x * 2).batch(3).repeat().prefetch(A)


def _inner_same_order() -> Any:  # shuffle inside repeat, one order for every epoch
    ds = tf.data.Dataset.range(10).shuffle(10, seed=1, reshuffle_each_iteration=False)
    return ds.map(lambda x: x * 2).batch(3).repeat().prefetch(A)


def _parallel() -> Any:
    ds = tf.data.Dataset.range(10).shuffle(4, seed=2).repeat()
    return ds.map(lambda x: x + 1, num_parallel_calls=A).batch(3).prefetch(A)


def _take(it: Any, n: int) -> list[list[int]]:
    return [next(it).numpy().tolist() for _ in range(n)]


@pytest.mark.parametrize(
    "make", [_outer, _inner_same_order, _parallel], ids=["outer", "inner-repeat-same-order", "parallel-map"]
)
def test_a_restored_iterator_yields_what_an_uninterrupted_one_would(tmp_path: Path, make: Any) -> None:
    for k in (1, 3, 4, 5):  # 3: prefetch has finished the epoch; 4: right after its partial last batch
        it = iter(make())
        _take(it, k)
        runstate.save(tmp_path / f"ck{k}", {"data": it})
        expected = _take(it, 10)  # through the next three epochs (reshuffled)
        fresh = iter(make())
        runstate.load(tmp_path / f"ck{k}", {"data": fresh})
        assert _take(fresh, 10) == expected, k
    assert _take(iter(make()), 10) != expected  # negative control: a fresh iterator starts over


@pytest.fixture
def op_determinism() -> Any:
    from tensorflow.python.framework import config

    config.enable_op_determinism()
    yield
    config.disable_op_determinism()


@pytest.mark.parametrize("parallel", [None, A], ids=["map", "parallel-map-deterministic-ops"])
def test_a_map_drawing_from_a_generator_resumes_with_the_generator_saved_alongside(
    tmp_path: Path, parallel: Any, request: pytest.FixtureRequest
) -> None:
    if parallel is not None:  # without deterministic ops, threads take the generator's draws in any order
        request.getfixturevalue("op_determinism")

    def make(gen: Any) -> Any:
        ds = tf.data.Dataset.range(12).shuffle(12, seed=5).repeat()
        ds = ds.map(lambda x: tf.cast(x, tf.float32) + gen.uniform([]), num_parallel_calls=parallel)
        return ds.batch(4).prefetch(3).with_options(_ignore())

    gen = tf.random.Generator.from_seed(1)
    it = iter(make(gen))
    _take(it, 2)
    runstate.save(tmp_path / "ck", {"data": it, "gen": gen})
    expected = _take(it, 6)
    gen2 = tf.random.Generator.from_seed(99)
    fresh = iter(make(gen2))
    runstate.load(tmp_path / "ck", {"data": fresh, "gen": gen2})
    assert _take(fresh, 6) == expected
    # negative control: the iterator without its generator draws other numbers
    gen3 = tf.random.Generator.from_seed(99)
    other = iter(make(gen3))
    runstate.load(tmp_path / "ck", {"data": other}, strict=False)
    assert _take(other, 6) != expected


def test_a_generator_restored_before_its_iterator_is_set_again_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runstate.adapters import tensorflow as adapter

    def make(gen: Any) -> Any:
        ds = tf.data.Dataset.range(12).shuffle(12, seed=5).repeat()
        return ds.map(lambda x: tf.cast(x, tf.float32) + gen.uniform([])).batch(4).prefetch(2).with_options(_ignore())

    gen = tf.random.Generator.from_seed(1)
    it = iter(make(gen))
    _take(it, 2)
    runstate.save(tmp_path / "ck", {"gen": gen, "data": it})
    expected = _take(it, 6)
    gen2 = tf.random.Generator.from_seed(99)
    it2 = iter(make(gen2))
    real = adapter.set_iterator_state

    def stale_draw_first(iterator: Any, state: Any) -> None:
        gen2.uniform([])  # the replaced iterator's prefetch thread, still drawing after the generator was set
        real(iterator, state)

    monkeypatch.setattr(adapter, "set_iterator_state", stale_draw_first)
    runstate.load(tmp_path / "ck", {"gen": gen2, "data": it2})  # "gen" is restored first
    assert _take(it2, 6) == expected


def test_a_restore_in_another_thread_does_not_disturb_a_save_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The iterators and generators of a save are read together even when another thread
    restores a checkpoint between the save's preparation and its encoding (each save or
    restore has its own session: no module-level state shared between threads)."""
    import threading

    from runstate.adapters import tensorflow as adapter

    runstate.save(tmp_path / "other", {"v": tf.Variable(1.0)})
    gen = tf.random.Generator.from_seed(1)
    ds = tf.data.Dataset.range(12).shuffle(12, seed=5).repeat()
    it = iter(ds.map(lambda x: tf.cast(x, tf.float32) + gen.uniform([])).batch(4).with_options(_ignore()))
    _take(it, 2)
    read_together: list[int] = []
    real_read, real_snapshot = adapter._read_together, adapter.snapshot

    def spy(session: Any, objs: list[Any], **kwargs: Any) -> None:
        read_together.append(len(objs))
        real_read(session, objs, **kwargs)

    def snapshot_then_restore_elsewhere(leaves: list[Any]) -> None:
        real_snapshot(leaves)
        other = threading.Thread(target=runstate.load, args=(tmp_path / "other", {"v": tf.Variable(0.0)}))
        other.start()
        other.join()

    monkeypatch.setattr(adapter, "_read_together", spy)
    monkeypatch.setattr(adapter, "snapshot", snapshot_then_restore_elsewhere)
    runstate.save(tmp_path / "ck", {"gen": gen, "data": it})
    assert read_together == [2]


def test_the_stored_position_is_serialize_iterator_bytes(tmp_path: Path) -> None:
    it = iter(_outer())
    _take(it, 2)
    state = iterator_state(it)
    assert state.dtype == np.uint8 and state.ndim == 1
    ckpt = tf.train.Checkpoint(iterator=it)  # what TensorFlow itself saves: the same op, the same position
    path = ckpt.write(str(tmp_path / "tf"))
    expected = _take(it, 5)
    a, b = iter(_outer()), iter(_outer())
    set_iterator_state(a, state)
    tf.train.Checkpoint(iterator=b).read(path).assert_consumed()
    assert _take(a, 5) == _take(b, 5) == expected
    with pytest.raises(runstate.CorruptCheckpointError, match="does not start with"):
        set_iterator_state(iter(_outer()), np.zeros(16, np.uint8))
    with pytest.raises(runstate.CorruptCheckpointError, match="holds no serialized iterator"):
        set_iterator_state(iter(_outer()), state[:8])  # the header alone


def test_a_dataset_rebuilt_with_other_shuffle_seeds_is_a_mismatch(tmp_path: Path) -> None:
    it = iter(_outer())
    _take(it, 2)
    runstate.save(tmp_path / "ck", {"data": it, "net": Net()})
    other = iter(tf.data.Dataset.range(10).shuffle(10, seed=2).repeat().map(lambda x: x * 2).batch(3).prefetch(2))
    net = Net(extra=False)
    net.w.assign(tf.zeros([3, 2]))
    with pytest.raises(runstate.StateMismatchError, match=r"shuffle seeds \[\d+, 1\]\)'\]: in the checkpoint but not"):
        runstate.load(tmp_path / "ck", {"data": other, "net": net})
    assert float(net.w.numpy().sum()) == 0.0


def test_a_dataset_rebuilt_with_other_parameters_is_a_mismatch(tmp_path: Path) -> None:
    # TensorFlow itself restores a batch-3 position into a batch-4 pipeline without a word
    it = iter(tf.data.Dataset.range(10).shuffle(10, seed=1).repeat().batch(3))
    _take(it, 1)
    runstate.save(tmp_path / "ck", {"data": it})
    other = iter(tf.data.Dataset.range(10).shuffle(10, seed=1).repeat().batch(4))
    with pytest.raises(runstate.StateMismatchError, match=r"position \(pipeline [0-9a-f]{12}, shuffle seeds"):
        runstate.load(tmp_path / "ck", {"data": other})
    assert _take(other, 1)[0] == _take(iter(tf.data.Dataset.range(10).shuffle(10, seed=1).repeat().batch(4)), 1)[0]


@pytest.mark.parametrize(
    "other",
    [
        lambda: tf.data.Dataset.range(10).map(lambda x: x * 3),
        lambda: tf.data.Dataset.range(10).map(lambda x: tf.cast(x, tf.float64)),
        lambda: tf.data.Dataset.from_tensor_slices(np.arange(20) * 7).map(lambda x: x * 2),
        lambda: tf.data.Dataset.from_tensor_slices(np.arange(10.0)).map(lambda x: x * 2),
    ],
    ids=["other-constant", "other-function", "other-source-shape", "other-source-dtype"],
)
def test_a_pipeline_with_other_functions_or_sources_is_a_mismatch(tmp_path: Path, other: Any) -> None:
    it = iter(tf.data.Dataset.from_tensor_slices(np.arange(10)).map(lambda x: x * 2))
    _take(it, 1)
    runstate.save(tmp_path / "ck", {"data": it})
    live = iter(other())
    with pytest.raises(runstate.StateMismatchError, match=r"position \(pipeline [0-9a-f]{12}"):
        runstate.load(tmp_path / "ck", {"data": live})
    same = iter(tf.data.Dataset.from_tensor_slices(np.arange(10)).map(lambda x: x * 2))  # rebuilt: accepted
    runstate.load(tmp_path / "ck", {"data": same})
    assert _take(same, 1) == [2]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: tf.data.Dataset.range(5).shuffle(5), r"shuffle without a seed.*shuffle\(buffer_size, seed=0\)"),
        (
            lambda: tf.data.Dataset.range(5).map(lambda x: x + tf.cast(tf.random.uniform([], 0, 3, tf.int64), x.dtype)),
            r"RandomUniformInt is stateful.*ExternalStatePolicy.IGNORE",
        ),
        (
            lambda: (
                tf.data.Dataset.range(5)
                .map(lambda x: tf.cast(x, tf.float32) + tf.random.uniform([]))
                .with_options(_ignore())
            ),
            r"random op RandomUniform .*tf.random.Generator",
        ),
        (
            lambda: (
                tf.data.Dataset.range(5)
                .map(lambda x: tf.cast(x, tf.float32) + _GEN.uniform([]), num_parallel_calls=2)
                .with_options(_ignore())
            ),
            r"num_parallel_calls draws from a tf.random.Generator \(RngReadAndSkip\).*enable_op_determinism",
        ),
        (_inner, r"shuffle that reshuffles every epoch sits inside repeat \(shuffle -> map -> batch -> repeat"),
        (
            lambda: tf.data.Dataset.range(10).shuffle(10, seed=1).repeat(2).batch(3).repeat(),
            r"sits inside repeat.*Fix: put repeat\(\) right after shuffle\(\)",
        ),
        (
            lambda: (
                tf.data.Dataset.range(5)
                .map(lambda x: tf.cast(x, tf.float32) + tf.random.uniform([]))
                .with_options(_policy(tf.data.experimental.ExternalStatePolicy.WARN))
            ),
            r"random op RandomUniform .*tf.random.Generator",
        ),
        (
            lambda: (
                tf.data.Dataset.range(5)
                .map(lambda x: tf.cast(x, tf.float32) + _GEN.uniform([]))
                .with_options(_ignore())
            ),
            r"draws from a tf.random.Generator \(RngReadAndSkip .*not in the saved state.*its own item",
        ),
    ],
    ids=[
        "unseeded-shuffle",
        "random-op-fail-policy",
        "random-op-ignore-policy",
        "parallel-map-with-generator",
        "shuffle-inside-repeat",
        "shuffle-repeat-inside-repeat",
        "random-op-warn-policy",
        "generator-left-out",
    ],
)
def test_pipelines_that_cannot_resume_exactly_are_refused_with_the_fix(
    tmp_path: Path, make: Any, expected: str
) -> None:
    it = iter(make())
    next(it)
    with pytest.raises(runstate.UnsupportedTypeError, match=expected):
        runstate.save(tmp_path / "ck", {"data": it})
    assert not (tmp_path / "ck").exists()


def _ignore() -> Any:
    return _policy(tf.data.experimental.ExternalStatePolicy.IGNORE)


def _policy(policy: Any) -> Any:
    options = tf.data.Options()
    options.experimental_external_state_policy = policy
    return options


# -- runstate import of a TensorFlow checkpoint --------------------------------------------------


def test_import_refuses_an_index_describing_more_bytes_than_its_data_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runstate.cli import import_tf

    prefix = tf.train.Checkpoint(w=tf.Variable(tf.ones([4, 3])), step=tf.Variable(2)).write(str(tmp_path / "ck"))
    assert sorted(import_tf.read(prefix).state) == ["step", "w"]  # the real one reads
    real = tf.train.load_checkpoint

    class Crafted:  # the index of a crafted checkpoint: a shape of 4 TB
        def __init__(self, path: str) -> None:
            self.inner = real(path)

        def get_variable_to_dtype_map(self) -> dict[str, Any]:
            return dict(self.inner.get_variable_to_dtype_map())

        def get_variable_to_shape_map(self) -> dict[str, Any]:
            shapes = dict(self.inner.get_variable_to_shape_map())
            return {k: [10**9, 10**3] if k.startswith("w/") else v for k, v in shapes.items()}

        def get_tensor(self, key: str) -> Any:
            raise AssertionError(f"read {key} before checking the sizes")

    monkeypatch.setattr(tf.train, "load_checkpoint", Crafted)
    with pytest.raises(
        runstate.CorruptCheckpointError, match=r"describes 4000000000\d+ bytes of values, but its .data"
    ):
        import_tf.read(prefix)
