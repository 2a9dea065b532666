"""A custom framework (examples/custom_framework, NumPy) made resumable with runstate.register.

The conformance suite runs its training script (Adam) in subprocesses, killed and resumed;
the tests below check every optimizer in process, each with a negative control: zeroing the
optimizer's moments after the restore must change the result.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import runstate
from tests.conformance import Conformance, same_values

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_framework"
sys.path.insert(0, str(EXAMPLE))

import resumable  # noqa: E402
import tinynn  # noqa: E402
import train  # noqa: E402


@pytest.fixture(autouse=True)
def registered() -> Iterator[None]:
    resumable.register()
    yield
    resumable.unregister()


class TestCustomFrameworkConformance(Conformance):
    in_place_items = ("model", "optimizer", "dropout_rng")
    negative_resume = "reset_moments"
    save_every = train.SAVE_EVERY
    total_steps = train.TOTAL_STEPS
    kill_at = 19

    def make_state(self, seed: int) -> dict[str, Any]:
        state = train.build(seed)
        for _ in range(2 + seed):
            train.train_one(state)
        return state

    def train(self, state: dict[str, Any], steps: int) -> dict[str, Any]:
        for _ in range(steps):
            train.train_one(state)
        return state

    def values(self, state: dict[str, Any]) -> dict[str, np.ndarray]:
        return train.final_arrays(state)

    def mismatched_state(self) -> dict[str, Any]:
        return train.build(0, hidden=16)

    def job_command(self) -> list[str]:
        return [sys.executable, str(EXAMPLE / "train.py")]


def run(state: dict[str, Any], steps: int) -> list[float]:
    return [train.train_one(state) for _ in range(steps)]


@pytest.mark.parametrize("optimizer", sorted(train.OPTIMIZERS))
def test_every_optimizer_resumes_bit_exactly(tmp_path: Path, optimizer: str) -> None:
    reference = train.build(0, optimizer)
    run(reference, 7)  # mid-epoch
    runstate.save(tmp_path / "ck", reference)
    expected = run(reference, 20)  # crosses an epoch boundary

    resumed = train.build(5, optimizer)  # other weights, other generators
    opt_before, params_before = resumed["optimizer"], resumed["model"].parameters()
    runstate.load(tmp_path / "ck", resumed)
    assert resumed["optimizer"] is opt_before
    assert all(a is b for a, b in zip(opt_before.params.values(), params_before.values()))  # still the model's arrays
    assert run(resumed, 20) == expected
    assert same_values(train.final_arrays(reference), train.final_arrays(resumed)) == []

    # Negative control: the same restore, then the optimizer's moments are zeroed.
    control = train.build(5, optimizer)
    runstate.load(tmp_path / "ck", control)
    for buffers in control["optimizer"].moments().values():
        for arr in buffers.values():
            arr[...] = 0.0
    assert run(control, 20) != expected
    assert same_values(train.final_arrays(reference), train.final_arrays(control))


def test_the_optimizer_moments_are_stored_as_tensors(tmp_path: Path) -> None:
    state = train.build(0, "adam")
    run(state, 2)
    runstate.save(tmp_path / "ck", state)
    info = runstate.inspect(tmp_path / "ck")
    names = {t.name for t in info.items["optimizer"].tensors}
    assert {"moments.m.0.W", "moments.v.3.b"} <= names
    assert info.items["model"].type == "tinynn.Sequential"
    assert {t.name: t.shape for t in info.items["model"].tensors}["0.W"] == (10, 32)


def test_a_different_architecture_is_a_mismatch(tmp_path: Path) -> None:
    runstate.save(tmp_path / "ck", train.build(0))
    live = train.build(0, hidden=16)
    before = live["model"].get_weights()
    with pytest.raises(runstate.StateMismatchError, match=r"state\['model'\]\['0.W'\]: shape \(10, 32\) in checkpoint"):
        runstate.load(tmp_path / "ck", live)
    assert same_values(before, live["model"].get_weights()) == []


def test_unregistered_classes_are_refused_with_advice(tmp_path: Path) -> None:
    resumable.unregister()
    with pytest.raises(runstate.UnsupportedTypeError, match=r"state\['model'\]: a value of type tinynn.Sequential"):
        runstate.save(tmp_path / "ck", {"model": tinynn.Sequential()})
