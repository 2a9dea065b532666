"""Local storage: a checkpoint directory appears only when complete; failures leave nothing."""

from __future__ import annotations

import errno
import json
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


# --- storage owns every path (issue 16): what the rest of runstate asks instead of calling os ---


def test_parent_store_of_every_local_path_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runstate.storage import LocalStore, parent_store

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for path, parent in (("ckpt", tmp_path), ("./sub/ckpt/", tmp_path / "sub"), ("~/ckpt", tmp_path / "home")):
        store, name = parent_store(path)
        assert isinstance(store, LocalStore) and (store.location, name) == (str(parent), "ckpt"), path
    (tmp_path / "afile").write_text("x")
    with pytest.raises(runstate.CheckpointWriteError, match="afile is a file, not a directory") as err:
        parent_store("afile/ckpt")
    assert err.value.errno == errno.ENOTDIR
    with pytest.raises(runstate.CheckpointConfigError, match="only apply to URLs"):
        parent_store("ckpt", {"anon": True})
    with pytest.raises(runstate.CheckpointConfigError, match="the path is empty"):
        parent_store("")


def test_parent_store_refuses_a_url_with_no_location_to_hold_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runstate.storage import parent_store

    pytest.importorskip("fsspec")
    monkeypatch.chdir(tmp_path)
    # "memory://ckpt" used to be split into the LOCAL directory "memory:/" and the name "ckpt"
    with pytest.raises(runstate.CheckpointConfigError, match="name the checkpoint inside a location"):
        parent_store("memory://ckpt")
    store, name = parent_store("memory://run/ckpt/")
    assert (store.location, name) == ("memory://run", "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_split_path() -> None:
    from runstate.storage import split_path

    assert split_path("runs/exp/step-1200/") == ("runs/exp", "step-1200")
    assert split_path("ckpt") == (".", "ckpt")
    assert split_path("a/../b/ckpt") == ("b", "ckpt")


def test_atomic_file_replaces_the_file_whole_or_not_at_all(tmp_path: Path) -> None:
    from runstate.storage import atomic_file

    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_file(str(target)) as tmp:
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    with atomic_file(str(target)) as tmp:
        assert Path(tmp).parent == tmp_path and Path(tmp).name.startswith(".model.safetensors.tmp-")
        Path(tmp).write_bytes(b"new")
        assert target.read_bytes() == b"old"  # nothing visible before the block ends
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_kind_follows_symlinks_and_names_fifos_other(tmp_path: Path) -> None:
    from runstate.storage import LocalStore

    store = LocalStore(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_bytes(b"abc")
    os.symlink(tmp_path / "d", tmp_path / "link")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    os.mkfifo(tmp_path / "fifo")
    kinds = {name: store.kind(name) for name in ("d", "f", "link", "dangling", "fifo", "missing")}
    assert kinds == {"d": "directory", "f": "file", "link": "directory", "dangling": None, "fifo": "other", "missing": None}
    assert store.exists("dangling") and not store.exists("missing")  # exists() does not follow: lexists
    assert store.size("link") < 100 and store.size("f") == 3  # a symlink counts as itself, never its target


def test_local_extras_tell_interrupted_deletions_from_saves_and_skip_live_ones(tmp_path: Path) -> None:
    from runstate.storage import INTERRUPTED_DELETION, INTERRUPTED_SAVE, LocalStore

    store = LocalStore(tmp_path)
    (tmp_path / ".del-step-000000000003-0123456789ab").mkdir()
    (tmp_path / ".tmp-export-0123456789ab").mkdir()  # a standalone save into the run directory
    (tmp_path / ".tmp-step-000000000004-0123456789ab").write_text("a file: never runstate's")
    live = store.begin(5)  # a save in progress holds its temporary directory
    extras = {(e.name, e.kind, e.step) for e in store.list_extras()}
    assert extras == {
        (".del-step-000000000003-0123456789ab", INTERRUPTED_DELETION, 3),
        (".tmp-export-0123456789ab", INTERRUPTED_SAVE, None),
    }
    live.abort()


def test_attach_takes_only_a_temporary_directory_of_the_documented_form(tmp_path: Path) -> None:
    from runstate.storage import LocalStore

    store = LocalStore(tmp_path)
    staging = store.begin("my-ckpt-v2")
    assert store.attach(staging.location).final == str(tmp_path / "my-ckpt-v2")
    staging.abort()
    (tmp_path / ".tmp-step-1").mkdir()  # no 12-hex suffix: its final name used to be cut from a fixed offset
    with pytest.raises(runstate.CheckpointWriteError, match="not the temporary directory of a checkpoint") as err:
        store.attach(str(tmp_path / ".tmp-step-1"))
    assert err.value.errno == errno.ENOENT


def test_a_write_error_without_an_errno_has_none() -> None:
    err = local.LocalAttachedStaging("/x/.tmp-a-0123456789ab", "/x/a").write_error(OSError("boom"))
    assert err.errno is None and str(err).startswith("cannot write checkpoint /x/a: boom")
    err = local.LocalAttachedStaging("/x/.tmp-a-0123456789ab", "/x/a").write_error(OSError(errno.EIO, "I/O"))
    assert err.errno == errno.EIO


def test_ls_lists_what_a_run_on_an_object_store_holds_besides_its_checkpoints(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import uuid

    import numpy as np

    from runstate.cli import main
    from runstate.storage import ABANDONED, open_store

    pytest.importorskip("fsspec")
    url = f"memory://runstate-h3-{uuid.uuid4().hex}/run"
    with runstate.CheckpointManager(url) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": np.full(2, step, np.float32)})
    store = open_store(url)
    store.set_aside_damaged("step-000000000002")
    store.set_aside("step-000000000003", ABANDONED)
    assert main(["ls", url, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [(e["step"], e["status"]) for e in listed] == [(1, "ok"), (2, "corrupt"), (3, "abandoned")]
    assert listed[1]["reason"] == "moved aside by restore" and listed[1]["nbytes"] > 0


# -- replace_directory / remove_entry / remove_leftovers_beside (storage/_swap.py) ---------------------


def _make(path: str, content: str) -> None:
    os.mkdir(path)
    Path(path, "data").write_text(content)


def _old_target(tmp_path: Path) -> Path:
    target = tmp_path / "last.ckpt"
    _make(str(target), "old")
    return target


def test_replace_directory_writes_in_place_when_nothing_is_there(tmp_path: Path) -> None:
    from runstate.storage import replace_directory

    target = tmp_path / "new-parent" / "last.ckpt"
    seen: list[str] = []

    def write(path: str) -> None:
        seen.append(path)
        _make(path, "new")

    replace_directory(str(target), write)
    assert seen == [str(target)]
    assert (target / "data").read_text() == "new" and os.listdir(target.parent) == ["last.ckpt"]


def test_replace_directory_swaps_in_one_step_then_fsyncs_and_drops_the_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ctypes
    import sys

    from runstate.storage import _swap, replace_directory

    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir(), b.mkdir()
    renameat2 = getattr(ctypes.CDLL(None), "renameat2", None) if sys.platform.startswith("linux") else None
    if renameat2 is None or renameat2(-100, bytes(a), -100, bytes(b), 2) != 0:  # AT_FDCWD, RENAME_EXCHANGE
        pytest.skip("no RENAME_EXCHANGE on this system or filesystem")
    a.rmdir(), b.rmdir()
    target = _old_target(tmp_path)
    name_there: list[bool] = []  # before every rename: is the name there (it must always be)
    for fn in ("rename", "replace"):
        real = getattr(os, fn)
        monkeypatch.setattr(os, fn, lambda *a, _r=real, **k: (name_there.append(target.exists()), _r(*a, **k))[1])
    fsynced: list[tuple[str, str]] = []
    real_fsync_dir = _swap.fsync_dir

    def fsync_dir(path: str) -> None:
        fsynced.append((path, (target / "data").read_text()))
        real_fsync_dir(path)

    monkeypatch.setattr(_swap, "fsync_dir", fsync_dir)

    def write(path: str) -> None:
        assert Path(path).parent == tmp_path and Path(path).name.startswith(".last.ckpt.runstate-new-")
        assert (target / "data").read_text() == "old"  # the previous one stays until the new one is complete
        _make(path, "new")

    replace_directory(str(target), write)
    assert (target / "data").read_text() == "new"
    assert os.listdir(tmp_path) == ["last.ckpt"]  # the previous directory is gone, nothing hidden is left
    assert all(name_there)
    assert (str(tmp_path), "new") in fsynced  # the swap itself is made durable


def test_replace_directory_falls_back_to_two_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runstate.storage import _swap, replace_directory

    monkeypatch.setattr(_swap, "_exchange", lambda a, b: False)
    target = _old_target(tmp_path)
    replace_directory(str(target), lambda path: _make(path, "new"))
    assert (target / "data").read_text() == "new" and os.listdir(tmp_path) == ["last.ckpt"]


def test_a_kill_between_the_two_fallback_renames_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runstate.storage import _swap, remove_leftovers_beside, replace_directory

    monkeypatch.setattr(_swap, "_exchange", lambda a, b: False)
    target = _old_target(tmp_path)
    real_rename, calls = os.rename, []

    def dies_at_the_second_rename(a: str, b: str) -> None:
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for SIGKILL: nothing after this line runs
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", dies_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        replace_directory(str(target), lambda path: _make(path, "new"))
    monkeypatch.setattr(os, "rename", real_rename)
    assert not target.exists() and len(os.listdir(tmp_path)) == 2  # the window: -old- and -new-, no name
    remove_leftovers_beside(str(target))  # what the next save does first
    assert (target / "data").read_text() == "new" and os.listdir(tmp_path) == ["last.ckpt"]


def test_replace_directory_keeps_the_old_one_when_the_write_fails(tmp_path: Path) -> None:
    from runstate.storage import replace_directory

    target = _old_target(tmp_path)

    def write(path: str) -> None:
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        replace_directory(str(target), write)
    assert (target / "data").read_text() == "old"


def test_sigkill_at_any_point_of_replace_directory_leaves_old_or_new(tmp_path: Path) -> None:
    import signal

    from runstate.storage import remove_leftovers_beside, replace_directory

    def child(target: Path, kill_at: int) -> int:
        pid = os.fork()
        if pid == 0:  # never returns to pytest
            try:
                calls = [0]
                for fn in ("fsync", "rename", "replace", "unlink", "rmdir", "remove", "mkdir"):

                    def hooked(*a: object, _r: object = getattr(os, fn), **k: object) -> object:
                        if calls[0] == kill_at:
                            os.kill(os.getpid(), signal.SIGKILL)
                        calls[0] += 1
                        return _r(*a, **k)  # type: ignore[operator]

                    setattr(os, fn, hooked)
                replace_directory(str(target), lambda path: _make(path, "new"))
                os._exit(100 + min(calls[0], 100))  # not killed: how many calls it made
            except BaseException:
                os._exit(3)
        return os.waitpid(pid, 0)[1]

    outcomes = set()
    for kill_at in range(50):
        d = tmp_path / str(kill_at)
        d.mkdir()
        status = child(_old_target(d), kill_at)
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) >= 100, status  # finished before call kill_at: every point was tried
            assert kill_at >= 3
            break
        assert os.WTERMSIG(status) == signal.SIGKILL
        outcomes.add((d / "last.ckpt" / "data").read_text())  # the name holds a complete directory
        remove_leftovers_beside(str(d / "last.ckpt"))
        assert os.listdir(d) == ["last.ckpt"]
    assert outcomes == {"old", "new"}


def test_remove_leftovers_beside_removes_only_that_names_hidden_entries(tmp_path: Path) -> None:
    from runstate.storage import remove_leftovers_beside

    ours = [".last.ckpt.runstate-new-0123456789ab", ".last.ckpt.runstate-old-ba9876543210"]
    _make(str(tmp_path / ours[0]), "x")
    (tmp_path / ours[1]).write_text("x")
    kept = ["last.ckpt", ".other.ckpt.runstate-new-0123456789ab", ".tmp-last.ckpt-ab", "last.ckpt.runstate-new-x"]
    for name in kept:
        (tmp_path / name).write_text("x")
    removed = remove_leftovers_beside(str(tmp_path / "last.ckpt"))
    assert sorted(removed) == sorted(str(tmp_path / n) for n in ours)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    assert remove_leftovers_beside(str(tmp_path / "missing" / "last.ckpt")) == []


def test_remove_entry_removes_a_directory_in_one_step_and_a_link_not_its_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from runstate.storage import remove_entry

    target = _old_target(tmp_path)
    name_there_while_deleting: list[bool] = []
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(
        shutil, "rmtree", lambda p, **k: (name_there_while_deleting.append(target.exists()), real_rmtree(p, **k))[1]
    )
    remove_entry(str(target))
    assert name_there_while_deleting == [False] and os.listdir(tmp_path) == []
    kept = tmp_path / "kept"
    _make(str(kept), "keep me")
    (tmp_path / "link").symlink_to(kept)
    remove_entry(str(tmp_path / "link"))
    (tmp_path / "file").write_text("x")
    remove_entry(str(tmp_path / "file"))
    remove_entry(str(tmp_path / "missing"))
    assert os.listdir(tmp_path) == ["kept"] and (kept / "data").read_text() == "keep me"


def test_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runstate.storage import absolute_path

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert absolute_path("a/../b/") == str(tmp_path / "b")
    assert absolute_path(Path("~/c")) == str(tmp_path / "home" / "c")
