"""Local storage: a checkpoint directory appears only when complete; failures leave nothing."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import runstate
from runstate.storage import local


def test_commit_directory_renames_only_on_success(tmp_path: Path) -> None:
    final = tmp_path / "run" / "step-1"
    with local.commit_directory(str(final)) as tmp:
        assert Path(tmp).parent == final.parent and Path(tmp).name.startswith(".tmp-step-1-")
        (Path(tmp) / "a").write_text("x")
        assert not final.exists()
    assert (final / "a").read_text() == "x"
    assert [p.name for p in final.parent.iterdir()] == ["step-1"]


def test_failure_inside_the_block_leaves_no_trace(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), local.commit_directory(str(tmp_path / "step-1")) as tmp:
        (Path(tmp) / "a").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_os_errors_become_checkpoint_write_errors(tmp_path: Path) -> None:
    with pytest.raises(runstate.CheckpointWriteError) as err, local.commit_directory(str(tmp_path / "step-1")):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert err.value.errno == errno.ENOSPC
    assert "No space left on device; nothing was committed, free disk space" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_save_failure_from_the_disk_keeps_older_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with runstate.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"x": [1, 2]})
        real_fsync = os.fsync

        def failing_fsync(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(runstate.CheckpointWriteError, match="Input/output error"):
            mgr.save(2, {"x": [3]})
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert mgr.steps() == [1]
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "step-000000000001"]
        assert mgr.save(2, {"x": [3]}) is True  # training can go on
    assert runstate.load(tmp_path / "step-000000000001") == {"x": [1, 2]}


def test_list_committed_ignores_leftovers_files_and_other_names(tmp_path: Path) -> None:
    for name in ("step-000000000003", "step-10", ".tmp-step-000000000004-ab", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "step-000000000005").write_text("a file, not a checkpoint")
    # step-10 is not step 10's name (step-000000000010): listing it would list what is never read
    assert local.list_committed(str(tmp_path)) == {3: str(tmp_path / "step-000000000003")}
    assert local.list_committed(str(tmp_path / "missing")) == {}


def test_delete_directory_never_shows_a_half_deleted_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "step-1").mkdir()
    (tmp_path / "step-1" / "f").write_text("x")
    local.delete_directory(str(tmp_path / "step-1"))
    assert list(tmp_path.iterdir()) == []


def test_run_lock_is_exclusive_and_reentrant_per_object(tmp_path: Path) -> None:
    a, b = local.RunLock(str(tmp_path)), local.RunLock(str(tmp_path))
    a.acquire()
    a.acquire()
    assert a.held
    with pytest.raises(runstate.LockError, match="only one writer per run directory"):
        b.acquire()
    a.release()
    b.acquire()
    assert b.held
    b.release()
