"""Typed trees: property-based round trips of nested state through a real checkpoint."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runstate
from runstate.format.tree import Decoder, Encoder


def same(a: object, b: object) -> bool:
    """Equality that also distinguishes types, -0.0, NaN, and compares arrays exactly."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))  # type: ignore[arg-type]
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()  # type: ignore[union-attr]
    if isinstance(a, torch.Tensor):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
        )  # type: ignore[union-attr]
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))  # type: ignore[arg-type]
    if isinstance(a, dict):
        return list(a) == list(b) and all(type(k) is type(j) for k, j in zip(a, b)) and all(same(a[k], b[k]) for k in a)  # type: ignore[union-attr]
    return a == b


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.binary(max_size=20),
)
keys = st.one_of(
    st.text(max_size=5),
    st.integers(),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
    st.tuples(st.integers(), st.text(max_size=3)),
)


def _array(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    n = int(np.prod(shape))
    raw = np.random.default_rng(seed).integers(0, 255, size=n * np.dtype(dtype).itemsize, dtype=np.uint8)
    return (raw % 2 == 1).reshape(shape) if dtype == "bool" else raw.view(dtype).reshape(shape)


def _tensor(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    raw = np.random.default_rng(seed).integers(0, 255, size=(n + 1) * 8, dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype)[:n].clone()


arrays = st.builds(
    _array,
    st.sampled_from(["float64", "float32", "float16", "int64", "int8", "uint16", "bool", "complex64"]),
    st.lists(st.integers(0, 4), max_size=3).map(tuple),
    st.integers(0, 2**32 - 1),
)
tensors = st.builds(
    _tensor,
    st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.float8_e4m3fn]),
    st.integers(0, 6),
    st.integers(0, 2**32 - 1),
)
trees = st.recursive(
    st.one_of(scalars, arrays, tensors),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=trees)
def test_any_nested_state_round_trips_through_a_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, value: object
) -> None:
    path = tmp_path_factory.mktemp("ck") / "ck"
    runstate.save(path, {"item": value})
    got = runstate.load(path)["item"]
    assert same(value, got), (value, got)


@given(
    value=st.recursive(
        scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(keys, c, max_size=3)), max_leaves=15
    )
)
def test_encoder_and_decoder_are_inverse_without_tensors(value: object) -> None:
    node = Encoder("x", lambda _v: None, []).encode(value)
    decoded = Decoder("x", lambda name: pytest.fail(f"unexpected tensor {name}"), []).decode(node)
    assert same(value, decoded)


def test_numpy_scalars_and_byte_order() -> None:
    from runstate.adapters import find_codec

    enc = Encoder("x", find_codec, [])
    enc.encode({"be": np.arange(3, dtype=">i4"), "s": np.float16(2.5)})
    assert enc.blobs["be"].dtype == "I32" and bytes(enc.blobs["be"].read()) == np.arange(3, dtype="<i4").tobytes()
    assert enc.blobs["s"].meta == {"scalar": True}


def test_object_arrays_are_refused() -> None:
    from runstate.adapters import find_codec

    with pytest.raises(runstate.UnsupportedTypeError, match=r"state\['x'\]\['a'\]: a numpy array of dtype object"):
        Encoder("x", find_codec, []).encode({"a": np.array([object()])})


def test_subclasses_are_refused_with_advice() -> None:
    from enum import IntEnum

    class Color(IntEnum):
        RED = 1

    with pytest.raises(runstate.UnsupportedTypeError, match="subclass of int"):
        Encoder("x", lambda _v: None, []).encode({"c": Color.RED})
    with pytest.raises(runstate.UnsupportedTypeError, match="a dict key of type"):
        Encoder("x", lambda _v: None, []).encode({frozenset(): 1})
