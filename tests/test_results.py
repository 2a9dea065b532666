"""Same shape for same things (issue 16): a restore returns its report with the step, every
report has ``ok`` and ``__bool__`` alike, and the result stays usable as the step it was."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import runstate


def test_load_into_a_state_returns_the_step_with_its_report(tmp_path: Path) -> None:
    runstate.save(tmp_path / "ck", {"w": np.arange(3.0), "n": 5}, step=1200)
    state = {"w": np.zeros(3), "n": None, "new": 1}
    result = runstate.load(tmp_path / "ck", state, strict=False)
    assert isinstance(result, runstate.RestoreResult) and result == 1200 and result.step == 1200
    assert result.path == str(tmp_path / "ck") and state["n"] == 5
    assert isinstance(result.report, runstate.RestoreReport) and not result.report and not result.report.ok
    assert result.report.of("new") == ["state['new']"]
    exact = runstate.load(tmp_path / "ck", {"w": None, "n": None})
    assert exact.report.ok and bool(exact.report) and exact.report.mismatches == ()


def test_load_of_a_checkpoint_saved_without_a_step(tmp_path: Path) -> None:
    runstate.save(tmp_path / "ck", {"n": 1})
    result = runstate.load(tmp_path / "ck", {"n": None})
    assert result.step is None and result == 0 and (result or 0) == 0 and result.report.ok


def test_load_without_a_state_still_returns_the_stored_tree(tmp_path: Path) -> None:
    runstate.save(tmp_path / "ck", {"w": np.arange(3.0), "n": 5}, step=1)
    tree = runstate.load(tmp_path / "ck")
    assert type(tree) is dict and tree["n"] == 5 and np.array_equal(tree["w"], np.arange(3.0))


def test_a_restore_result_is_read_only() -> None:
    result = runstate.RestoreResult(3, runstate.RestoreReport("p"), "p")
    with pytest.raises(AttributeError, match="read-only"):
        result.step = 4  # type: ignore[misc]
    assert result.step == 3 and int(result) == 3 and f"{result:d}" == "3"


def test_verify_report_ok_is_a_property_like_the_restore_report(tmp_path: Path) -> None:
    runstate.save(tmp_path / "ck", {"w": np.arange(1000.0)}, step=1)
    good = runstate.verify(tmp_path / "ck")
    assert good.ok is True and bool(good) and good.problems == () and good.tensors_checked == 1
    data = next(p for p in (tmp_path / "ck").iterdir() if p.suffix == ".safetensors")
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    bad = runstate.verify(tmp_path / "ck")
    assert bad.ok is False and not bad and len(bad.problems) == 1
    assert "ok" not in {f.name for f in dataclasses.fields(runstate.VerifyReport)}  # derived, never out of step
    for report_type in (runstate.VerifyReport, runstate.RestoreReport):
        assert isinstance(vars(report_type)["ok"], property) and "__bool__" in vars(report_type)


def test_a_restore_result_is_saved_as_the_plain_step(tmp_path: Path) -> None:
    import enum

    run = str(tmp_path / "run")
    with runstate.CheckpointManager(run) as mgr:
        mgr.save(3, {"w": np.zeros(2), "step": 3})
    with runstate.CheckpointManager(run) as mgr:
        state: dict[str, object] = {"w": np.zeros(2), "step": 0}
        result = mgr.restore(state)
        assert isinstance(result, runstate.RestoreResult)
        state["step"] = result  # the idiom: keep the step in the state
        mgr.save(result + 1, state)
        runstate.save(tmp_path / "alone", state, step=result)
    stored = runstate.load(run + "/step-000000000004")
    assert type(stored["step"]) is int and stored["step"] == 3
    assert runstate.load(tmp_path / "alone", {"w": np.zeros(2), "step": 0}).step == 3

    class Color(enum.IntEnum):  # control: other int subclasses are still refused, not flattened
        RED = 1

    with pytest.raises(runstate.UnsupportedTypeError, match="subclass of int"):
        runstate.save(tmp_path / "enum", {"c": Color.RED})
