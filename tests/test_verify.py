"""runstate.verify, restore fallback past damaged checkpoints, and save(verify=True)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

import runstate
from tests.conftest import fresh_training_state, make_training_state


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    runstate.save(tmp_path / "ck", {**make_training_state(), "epoch": 3}, step=5)
    return tmp_path / "ck"


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_intact_checkpoint_verifies(ckpt: Path) -> None:
    report = runstate.verify(ckpt)
    assert report.ok and bool(report) and report.problems == ()
    assert report.tensors_checked == 4 + 4 * 3 and report.nbytes_checked > 0


def test_flipped_tensor_byte_is_reported_with_file_and_tensor(ckpt: Path) -> None:
    flip(ckpt / "model.safetensors", -1)
    report = runstate.verify(ckpt)
    assert not report.ok and len(report.problems) == 1
    problem = report.problems[0]
    assert (problem.file, problem.tensor) == ("model.safetensors", "2.bias")
    assert "checksum mismatch" in problem.reason
    assert str(problem).startswith("model.safetensors: tensor '2.bias': checksum mismatch")


def test_every_damage_is_reported_at_once(ckpt: Path) -> None:
    (ckpt / "scheduler.safetensors").exists() and (ckpt / "scheduler.safetensors").unlink()
    os.truncate(ckpt / "model.safetensors", 100)
    (ckpt / "optimizer.safetensors").unlink()
    report = runstate.verify(ckpt)
    files = sorted(p.file for p in report.problems)
    assert files == ["model.safetensors", "optimizer.safetensors"]
    reasons = " | ".join(p.reason for p in report.problems)
    assert "size is 100 bytes" in reasons and "file is missing" in reasons


def test_edited_manifest_is_reported(ckpt: Path) -> None:
    text = (ckpt / "manifest.json").read_text()
    (ckpt / "manifest.json").write_text(text.replace('"step": 5', '"step": 6'))
    report = runstate.verify(ckpt)
    assert [p.file for p in report.problems] == ["manifest.json"]
    assert "manifest checksum mismatch" in report.problems[0].reason


def test_symlinked_files_are_refused(ckpt: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.safetensors"
    os.replace(ckpt / "model.safetensors", outside)
    os.symlink(outside, ckpt / "model.safetensors")
    report = runstate.verify(ckpt)
    assert not report.ok and "symlinks are refused" in report.problems[0].reason


def test_restore_falls_back_to_the_newest_intact_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = make_training_state()
    with runstate.CheckpointManager(tmp_path, keep_last=2) as mgr:
        mgr.save(1, {**state, "epoch": 1})
        mgr.save(2, {**state, "epoch": 2})
    flip(tmp_path / "step-000000000002" / "optimizer.safetensors", -2)
    target = {**fresh_training_state(), "epoch": None}
    with runstate.CheckpointManager(tmp_path, keep_last=2) as mgr:
        with pytest.raises(runstate.CorruptCheckpointError, match="checksum mismatch"):
            mgr.restore(target, fallback=False)
        assert target["epoch"] is None  # nothing changed
        with caplog.at_level(logging.WARNING, logger="runstate"):
            assert mgr.restore(target) == 1
        assert target["epoch"] == 1
        assert "skipping damaged checkpoint" in caplog.text and "step-000000000002" in caplog.text
        # Retention never deletes the damaged one; saving its step again moves it aside.
        mgr.save(2, {**state, "epoch": 2})
        mgr.save(3, {**state, "epoch": 3})
        mgr.save(4, {**state, "epoch": 4})
        assert mgr.steps() == [3, 4]
    aside = [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1 and aside[0].startswith("step-000000000002.corrupt-")
    assert not runstate.verify(tmp_path / aside[0]).ok


def test_every_checkpoint_damaged_raises(tmp_path: Path) -> None:
    with runstate.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"t": torch.ones(3)})
    flip(tmp_path / "step-000000000001" / "t.safetensors", -1)
    with pytest.raises(runstate.CorruptCheckpointError, match="every checkpoint is damaged"):
        runstate.CheckpointManager(tmp_path, read_only=True).restore({"t": None})


def test_missing_manifest_in_a_committed_step_is_damage(tmp_path: Path) -> None:
    with runstate.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"x": 1})
        mgr.save(2, {"x": 2})
    (tmp_path / "step-000000000002" / "manifest.json").unlink()
    state = {"x": None}
    assert runstate.CheckpointManager(tmp_path, read_only=True).restore(state) == 1 and state["x"] == 1


def test_save_with_verify(tmp_path: Path) -> None:
    with runstate.CheckpointManager(tmp_path) as mgr:
        assert mgr.save(1, make_training_state(), verify=True)
    assert runstate.verify(tmp_path / "step-000000000001").ok
