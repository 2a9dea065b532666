"""runstate.register: classes with their own state conventions, restored in place."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import runstate


class Scaler:
    """A framework object with ``get_config``/``set_config`` instead of ``state_dict``."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale
        self.history = np.zeros(3)

    def get_config(self) -> dict[str, Any]:
        return {"scale": self.scale, "history": self.history.copy()}

    def set_config(self, config: dict[str, Any]) -> None:
        self.scale = config["scale"]
        self.history[...] = config["history"]


class SubScaler(Scaler):
    pass


class Both(Scaler):
    """Has state_dict too: a registration wins over it."""

    def state_dict(self) -> dict[str, Any]:
        return {"never": 1}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        raise AssertionError("the registration must be used")


@pytest.fixture
def registered() -> Iterator[None]:
    for cls in (Scaler, Both):
        runstate.register(cls, get_state=lambda s: s.get_config(), set_state=lambda s, c: s.set_config(c))
    yield
    for cls in (Scaler, Both):
        runstate.registry.unregister(cls)


def test_registered_objects_are_saved_as_stateful_and_restored_in_place(tmp_path: Path, registered: None) -> None:
    saved = Scaler(2.5)
    saved.history[:] = [1, 2, 3]
    runstate.save(tmp_path / "ck", {"scaler": saved, "both": Both(4.0)})
    tree = json.loads((tmp_path / "ck" / "manifest.json").read_text())["items"]["scaler"]["tree"]
    assert tree["t"] == "stateful" and tree["type"] == f"{__name__}.Scaler"

    live, both = Scaler(), Both()
    state = {"scaler": live, "both": both}
    runstate.load(tmp_path / "ck", state)
    assert state["scaler"] is live and live.scale == 2.5 and live.history.tolist() == [1, 2, 3]
    assert state["both"] is both and both.scale == 4.0
    # without a live object: the plain state
    assert runstate.load(tmp_path / "ck")["scaler"]["scale"] == 2.5


def test_registration_is_by_exact_class(tmp_path: Path, registered: None) -> None:
    with pytest.raises(runstate.UnsupportedTypeError, match=r"state\['s'\]: a value of type .*SubScaler"):
        runstate.save(tmp_path / "ck", {"s": SubScaler()})
    assert not (tmp_path / "ck").exists()


def test_a_mismatching_registered_state_raises_and_changes_nothing(tmp_path: Path, registered: None) -> None:
    runstate.save(tmp_path / "ck", {"s": Scaler(3.0)})
    live = Scaler()
    live.history = np.zeros(5)
    with pytest.raises(runstate.StateMismatchError, match=r"state\['s'\]\['history'\]: shape \(3,\) in checkpoint"):
        runstate.load(tmp_path / "ck", {"s": live})
    assert live.scale == 1.0


def test_get_state_errors_name_the_path(tmp_path: Path) -> None:
    class Broken:
        pass

    def boom(_obj: Any) -> Any:
        raise RuntimeError("no state")

    runstate.register(Broken, get_state=boom, set_state=lambda o, s: None)
    try:
        with pytest.raises(runstate.UnsupportedTypeError, match=r"state\['b'\]\[0\]: the get_state .*RuntimeError"):
            runstate.save(tmp_path / "ck", {"b": [Broken()]})
    finally:
        runstate.registry.unregister(Broken)


def test_a_runstate_refusal_from_get_state_keeps_its_kind_and_says_where(tmp_path: Path) -> None:
    """A get_state that refuses with runstate's own error (the TensorFlow adapter refusing a
    tf.data pipeline that would not resume exactly) reaches the user as that error, with the
    path in front, not wrapped in "the get_state registered for ... raised ...". """

    class Refusing:
        pass

    def refuse(_obj: Any) -> Any:
        raise runstate.StateMismatchError("this pipeline cannot resume exactly; fix: shuffle().repeat()")

    runstate.register(Refusing, get_state=refuse, set_state=lambda o, s: None)
    try:
        with pytest.raises(runstate.StateMismatchError) as info:
            runstate.save(tmp_path / "ck", {"it": Refusing()})
        assert str(info.value).startswith("state['it']: this pipeline cannot resume exactly")
        assert "registered for" not in str(info.value)
        assert not (tmp_path / "ck").exists()
    finally:
        runstate.registry.unregister(Refusing)


def test_register_refuses_bad_input() -> None:
    noop = {"get_state": lambda o: None, "set_state": lambda o, s: None}
    with pytest.raises(TypeError, match="stored natively"):
        runstate.register(dict, **noop)
    with pytest.raises(TypeError, match="needs a class"):
        runstate.register(Scaler(), **noop)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        runstate.register(Scaler, get_state=None, set_state=lambda o, s: None)  # type: ignore[arg-type]
    runstate.register(Scaler, **noop)
    try:
        assert Scaler in runstate.registry and Scaler in list(runstate.registry) and len(runstate.registry) >= 1
        assert runstate.register(Scaler, **noop) is runstate.registry.get(Scaler)  # same functions: a no-op
        with pytest.raises(ValueError, match="already registered with other functions"):
            runstate.register(Scaler, get_state=lambda o: 1, set_state=lambda o, s: None)
    finally:
        runstate.registry.unregister(Scaler)
    assert Scaler not in runstate.registry
    with pytest.raises(KeyError):
        runstate.registry.unregister(Scaler)


def test_an_explicit_registry_can_be_given_to_the_encoder() -> None:
    from runstate.adapters import find_codec
    from runstate.format.tree import Encoder

    mine = runstate.Registry()
    mine.register(Scaler, get_state=lambda s: {"scale": s.scale}, set_state=lambda s, c: None)
    node = Encoder("x", find_codec, [], registry=mine).encode(Scaler(2.0))
    assert node["t"] == "stateful" and node["v"]["v"] == [["scale", {"t": "float", "v": "2.0"}]]
    assert Scaler not in runstate.registry
