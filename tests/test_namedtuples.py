"""Namedtuples in the typed tree: stored with their fields, rebuilt only from a live value."""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

import runstate
from runstate.format.tree import Decoder, Encoder, NamedTupleState

Point = namedtuple("Point", "x y")


class Moments(NamedTuple):
    count: int
    mu: Any
    nu: Any = None


class Holder:
    """A Stateful whose state_dict holds a namedtuple."""

    def __init__(self, m: Moments) -> None:
        self.m = m

    def state_dict(self) -> dict[str, Any]:
        return {"m": self.m}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        assert type(sd["m"]) is Moments
        self.m = sd["m"]


def test_node_layout_and_tensor_names(tmp_path: Path) -> None:
    runstate.save(tmp_path / "ck", {"opt": (Moments(3, {"w": np.ones(2)}), Point(1.5, None))})
    item = json.loads((tmp_path / "ck" / "manifest.json").read_text())["items"]["opt"]
    first = item["tree"]["v"][0]
    assert first["t"] == "namedtuple" and first["type"] == f"{__name__}.Moments"
    assert first["fields"] == ["count", "mu", "nu"] and first["v"][0] == {"t": "int", "v": "3"}
    assert list(item["tensors"]) == ["0.mu.w"]


def test_restored_as_the_live_class_else_as_plain_tuples(tmp_path: Path) -> None:
    saved = {"m": Moments(3, np.arange(2.0)), "p": [Point(1, 2)], "h": Holder(Moments(7, np.ones(1)))}
    runstate.save(tmp_path / "ck", saved)
    plain = runstate.load(tmp_path / "ck")
    assert type(plain["m"]) is tuple and plain["m"][0] == 3 and type(plain["p"][0]) is tuple
    assert type(plain["h"]["m"]) is tuple

    holder = Holder(Moments(0, np.zeros(1)))
    live = {"m": Moments(0, np.zeros(2)), "p": [Point(0, 0)], "h": holder}
    runstate.load(tmp_path / "ck", live)
    assert type(live["m"]) is Moments and live["m"].count == 3 and live["m"].mu.tolist() == [0.0, 1.0]
    assert live["m"].nu is None and live["p"] == [Point(1, 2)]
    assert live["h"] is holder and holder.m.count == 7


def test_another_class_with_the_same_name_is_not_used(tmp_path: Path) -> None:
    runstate.save(tmp_path / "ck", {"p": Point(1, 2)})
    Impostor = namedtuple("Point", "x y")  # same qualname, other module... and other class
    Impostor.__module__ = "elsewhere"
    with pytest.raises(
        runstate.StateMismatchError, match=r"a .*\.Point\('x', 'y'\) in the checkpoint, a elsewhere\.Point"
    ):
        runstate.load(tmp_path / "ck", {"p": Impostor(0, 0)})


@pytest.mark.parametrize(
    "node",
    [
        {"t": "namedtuple", "type": "a.B", "fields": ["x"], "v": []},
        {"t": "namedtuple", "type": "a.B", "fields": [1], "v": [{"t": "none"}]},
        {"t": "namedtuple", "type": 5, "fields": ["x"], "v": [{"t": "none"}]},
        {"t": "namedtuple", "type": "a.B", "v": []},
    ],
)
def test_malformed_nodes_are_corrupt(node: dict[str, Any]) -> None:
    with pytest.raises(runstate.CorruptCheckpointError, match="malformed 'namedtuple' node"):
        Decoder("x", lambda n: None, []).decode(node)


def test_decoded_namedtuple_keeps_type_and_fields() -> None:
    node = Encoder("x", lambda v: None, []).encode(Point(1, "a"))
    got = Decoder("x", lambda n: None, []).decode(node)
    assert got == NamedTupleState(f"{__name__}.Point", ("x", "y"), (1, "a"))
