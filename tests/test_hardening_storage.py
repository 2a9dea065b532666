"""Storage hardening (issues 13 and 14): durable new directories, exact leftover names, a
lock that follows no symlink and survives fork(), a damaged object-store lock, every path form."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

import runstate
from runstate.storage import LocalStore, local, open_store

HEX = "0123456789ab"


def _inode(path: Path | str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _record_dir_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    synced: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            synced.append((st.st_dev, st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def _python(code: str, *args: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-c", textwrap.dedent(code), *args], text=True, **kwargs
    )


# -- 13.3: every directory runstate creates is durable ------------------------------------------


def test_the_writer_lock_fsyncs_every_directory_it_creates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = _record_dir_fsyncs(monkeypatch)
    lock = LocalStore(str(tmp_path / "a" / "run")).lock()
    lock.acquire()
    try:
        assert (tmp_path / "a" / "run" / ".lock").is_file()
        assert _inode(tmp_path) in synced  # the entry of "a"
        assert _inode(tmp_path / "a") in synced  # the entry of "run"
    finally:
        lock.release()


def test_the_first_save_of_a_new_run_makes_the_run_directory_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = _record_dir_fsyncs(monkeypatch)
    with runstate.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"x": 1})
    assert _inode(tmp_path) in synced
    assert _inode(tmp_path / "run") in synced


# -- 13.6: only runstate's own, dead leftovers are removed --------------------------------------


def _foreign_entries(run: Path) -> list[Path]:
    """Entries that look like leftovers but are not of the exact documented form."""
    entries = []
    for name in (
        ".tmp-notes",
        ".del-me",
        f".tmp-step-000000000001-{HEX[:-1]}x",
        f".del--{HEX}",
        ".tmp-x-ABCDEF012345",
        f".tmp-step-000000000001-{HEX}\n",  # the form, then a newline: not the form
    ):
        (run / name).mkdir()
        (run / name / "keep.txt").write_text("user data")
        entries.append(run / name)
    (run / f".tmp-a-{HEX}").write_text("a file, never a runstate leftover")
    entries.append(run / f".tmp-a-{HEX}")
    return entries


def test_cleanup_removes_only_entries_of_the_documented_form(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    foreign = _foreign_entries(run)
    dead = [run / f".tmp-step-000000000002-{HEX}", run / f".del-step-000000000001-{HEX[::-1]}"]
    for path in dead:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x" * 10)
    with runstate.CheckpointManager(run) as mgr:
        assert sorted(mgr.leftovers()) == sorted(map(str, dead))
        mgr.save(3, {"x": 1})  # every save cleans up
        assert mgr.clean() == []
    assert all(p.exists() for p in foreign), [p for p in foreign if not p.exists()]
    assert not any(p.exists() for p in dead)
    from runstate.cli import main

    assert main(["gc", str(run)]) == 0
    assert all(p.exists() for p in foreign)


def test_a_standalone_save_into_a_managed_run_survives_the_managers_cleanup(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with runstate.CheckpointManager(run) as mgr:
        mgr.save(1, {"x": 1})
        with local.commit_directory(str(run / "export")) as tmp:
            (Path(tmp) / "a.bin").write_bytes(b"abc")
            mgr.save(2, {"x": 2})  # cleans leftovers while the standalone save is in flight
            assert mgr.clean() == [] and mgr.leftovers() == []
            assert (Path(tmp) / "a.bin").read_bytes() == b"abc"
        assert (run / "export" / "a.bin").read_bytes() == b"abc"
        assert mgr.steps() == [1, 2]


_SLOW_SAVE = """
    import sys
    from pathlib import Path
    from runstate.storage import local

    with local.commit_directory(sys.argv[1]) as tmp:
        (Path(tmp) / "a.bin").write_bytes(b"abc")
        print(tmp, flush=True)
        sys.stdin.readline()
"""


def test_a_standalone_save_in_another_process_is_left_alone_until_it_is_dead(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with runstate.CheckpointManager(run) as mgr:
        mgr.save(1, {"x": 1})
        live = _python(_SLOW_SAVE, str(run / "export"), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        dying = _python(_SLOW_SAVE, str(run / "doomed"), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert live.stdout is not None and dying.stdout is not None and live.stdin is not None
            live_tmp, dying_tmp = live.stdout.readline().strip(), dying.stdout.readline().strip()
            assert Path(live_tmp).is_dir() and Path(dying_tmp).is_dir()
            dying.kill()
            dying.wait(timeout=60)
            mgr.save(2, {"x": 2})
            assert Path(live_tmp).is_dir() and not Path(dying_tmp).exists()  # the dead one is removed
            assert mgr.clean() == []
            live.stdin.write("\n")
            live.stdin.flush()
            assert live.wait(timeout=120) == 0
        finally:
            for proc in (live, dying):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    assert (run / "export" / "a.bin").read_bytes() == b"abc"
    assert not (run / "doomed").exists()


# -- 13.14: the lock never follows a symlink nor truncates a file it did not create -------------


def test_a_symlinked_lock_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("do not truncate me\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(target)
    with pytest.raises(runstate.LockError, match=r"\.lock is a symbolic link"):
        LocalStore(str(run)).lock().acquire()
    with pytest.raises(runstate.LockError, match="symbolic link"), runstate.CheckpointManager(run) as mgr:
        mgr.save(1, {"x": 1})
    assert target.read_text() == "do not truncate me\n"
    (run / ".lock").unlink()
    (run / ".lock").symlink_to(tmp_path / "missing")  # a dangling link is not created through either
    with pytest.raises(runstate.LockError, match="symbolic link"):
        LocalStore(str(run)).lock().acquire()
    assert not (tmp_path / "missing").exists()


def test_a_hard_linked_lock_is_refused_and_left_intact(tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("do not truncate me\n")
    run = tmp_path / "run"
    run.mkdir()
    os.link(target, run / ".lock")
    with pytest.raises(runstate.LockError, match="hard link"):
        LocalStore(str(run)).lock().acquire()
    assert target.read_text() == "do not truncate me\n"


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_lock_that_is_not_a_regular_file_is_refused(kind: str, tmp_path: Path) -> None:
    if kind == "fifo":
        os.mkfifo(tmp_path / ".lock")
    else:
        (tmp_path / ".lock").mkdir()
    with pytest.raises(runstate.LockError, match="not a regular file"):
        LocalStore(str(tmp_path)).lock().acquire()


def test_the_lock_file_of_a_previous_writer_is_reused(tmp_path: Path) -> None:
    (tmp_path / ".lock").write_text("pid 1 on somewhere-else-with-a-long-name\n")
    lock = LocalStore(str(tmp_path)).lock()
    lock.acquire()
    lock.release()
    assert (tmp_path / ".lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"


# -- 13.17: a forked child never keeps the lock of a dead writer --------------------------------

_FORKING_WRITER = """
    import os, sys, time
    import runstate

    mgr = runstate.CheckpointManager(sys.argv[1])
    mgr.save(1, {"x": 1})  # takes the lock
    child = os.fork()
    if child == 0:  # a DataLoader worker
        time.sleep(300)
        os._exit(0)
    print(child, flush=True)
    time.sleep(300)
"""

_SUCCESSOR = """
    import sys
    import runstate

    with runstate.CheckpointManager(sys.argv[1]) as mgr:
        mgr.save(2, {"x": 2})
    print("saved", flush=True)
"""


def test_a_killed_writers_forked_child_does_not_keep_the_lock(tmp_path: Path) -> None:
    run = tmp_path / "run"
    writer = _python(_FORKING_WRITER, str(run), stdout=subprocess.PIPE)
    child = 0
    try:
        assert writer.stdout is not None
        child = int(writer.stdout.readline())
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
        os.kill(child, 0)  # the child still lives
        successor = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_SUCCESSOR), str(run)], capture_output=True, text=True, timeout=120
        )
        assert successor.returncode == 0, successor.stderr
        assert successor.stdout.strip() == "saved"
        os.kill(child, 0)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
    assert runstate.CheckpointManager(run).steps() == [1, 2]


def test_a_forked_child_sees_the_lock_as_not_held(tmp_path: Path) -> None:
    lock = LocalStore(str(tmp_path)).lock()
    lock.acquire()
    try:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            os.close(read)
            os.write(write, b"1" if lock.held else b"0")
            lock.release()  # must not unlock the parent's lock
            os._exit(0)
        os.close(write)
        assert os.read(read, 1) == b"0"
        os.close(read)
        os.waitpid(pid, 0)
        assert lock.held
        with pytest.raises(runstate.LockError):
            LocalStore(str(tmp_path)).lock().acquire()
    finally:
        lock.release()


# -- 13.25: a damaged lock object on an object store --------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe garbage",
        b"[1, 2]",
        b'{"time": "yesterday"}',
        b'{"time": [1]}',
        b'{"time": 1e400}',
        b'{"time": NaN}',
        b'{"pid": -1, "host": "HOST", "time": "NOW"}',
        b'{"pid": 99999999999999999999, "host": "HOST", "time": "NOW"}',
        b'{"pid": true, "host": "HOST", "time": "NOW"}',
        b"[" * 100_000,  # json.loads raises RecursionError, not ValueError
    ],
)
def test_a_damaged_object_lock_is_taken_over_with_a_warning(content: bytes, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("fsspec")
    url = f"memory://runstate-damaged-lock-{uuid.uuid4().hex}"
    content = content.replace(b"HOST", socket.gethostname().encode()).replace(b'"NOW"', str(time.time()).encode())
    store = open_store(url)
    store.fs.pipe_file(store.path(".lock"), content)  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="runstate"), runstate.CheckpointManager(url) as mgr:
        assert mgr.save(1, {"x": 1}) is True
        owner = json.loads(store.fs.cat_file(store.path(".lock")))  # type: ignore[attr-defined]
        assert owner["pid"] == os.getpid()
    assert "damaged lock" in caplog.text


def test_a_well_formed_live_object_lock_still_refuses(tmp_path: Path) -> None:
    pytest.importorskip("fsspec")
    url = f"memory://runstate-live-lock-{uuid.uuid4().hex}"
    store = open_store(url)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), "token": "someone-else"}
    store.fs.pipe_file(store.path(".lock"), json.dumps(owner).encode())  # type: ignore[attr-defined]
    with pytest.raises(runstate.LockError, match="one writer"), runstate.CheckpointManager(url) as mgr:
        mgr.save(1, {"x": 1})


# -- 14.1: every path form ----------------------------------------------------------------------

FORMS = ["ckpt", "./ckpt", "../ckpt", "sub/../ckpt", "ABS", "~/ckpt"]


def _where(form: str, tmp_path: Path) -> tuple[str, Path]:
    """The path to pass, and where the checkpoint must appear (cwd is tmp_path/work, HOME tmp_path/home)."""
    work = tmp_path / "work"
    if form == "ABS":
        return str(tmp_path / "abs" / "ckpt"), tmp_path / "abs" / "ckpt"
    if form.startswith("~"):
        return form, tmp_path / "home" / form[2:]
    return form, (work / form).resolve()


@pytest.fixture
def fresh_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "work" / "sub").mkdir(parents=True)
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.mark.parametrize("form", FORMS)
def test_save_and_load_accept_every_path_form(form: str, fresh_cwd: Path) -> None:
    path, where = _where(form, fresh_cwd)
    info = runstate.save(path, {"x": [1, 2], "epoch": 3}, step=7)
    assert info.step == 7
    assert (where / "manifest.json").is_file()
    assert runstate.load(path) == {"x": [1, 2], "epoch": 3}
    assert runstate.load(where) == {"x": [1, 2], "epoch": 3}
    assert [p.name for p in where.parent.iterdir() if p.name.startswith(".tmp-")] == []


@pytest.mark.parametrize("form", FORMS)
def test_a_manager_accepts_every_path_form(form: str, fresh_cwd: Path) -> None:
    path, where = _where(form, fresh_cwd)
    with runstate.CheckpointManager(path, keep_last=1) as mgr:
        mgr.save(1, {"x": 1})
        mgr.save(2, {"x": 2})
        assert mgr.steps() == [2]
    assert sorted(p.name for p in where.iterdir()) == [".lock", "step-000000000002"]
    state = {"x": 0}
    with runstate.CheckpointManager(path) as mgr:
        assert mgr.restore(state) is not None
    assert state == {"x": 2}


@pytest.mark.parametrize("form", FORMS)
def test_import_writes_to_every_path_form(form: str, fresh_cwd: Path) -> None:
    torch = pytest.importorskip("torch")
    from runstate.cli import main

    torch.save({"model": {"w": torch.ones(2)}, "step": 5}, fresh_cwd / "work" / "m.pt")
    path, where = _where(form, fresh_cwd)
    assert main(["import", "m.pt", "-o", path]) == 0
    assert (where / "manifest.json").is_file()
    assert runstate.load(where)["step"] == 5


@pytest.mark.parametrize("form", FORMS)
def test_every_cli_command_takes_every_path_form(
    form: str, fresh_cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from runstate.cli import main

    path, where = _where(form, fresh_cwd)
    with runstate.CheckpointManager(where) as mgr:
        mgr.save(1, {"w": np.ones(2, np.float32)})
        mgr.save(2, {"w": np.zeros(2, np.float32)})
    step = f"{path}/step-000000000002"
    out, out_where = f"{path}.safetensors", Path(f"{where}.safetensors")
    assert main(["ls", path]) == 0
    assert main(["show", path, "--step", "latest"]) == 0
    assert main(["show", step]) == 0
    assert main(["verify", path]) == 0
    assert main(["verify", step]) == 0
    assert main(["diff", path, path, "--step-a", "1", "--step-b", "1"]) == 0
    assert main(["diff", step, step]) == 0
    assert main(["export", path, "w", "-o", out, "--step", "2"]) == 0
    assert out_where.is_file()
    assert main(["gc", path]) == 0
    assert "error" not in capsys.readouterr().err


def test_an_empty_path_is_refused_everywhere(fresh_cwd: Path) -> None:
    # A manager on "" saved into the working directory but listed nothing there: a restart
    # started from scratch next to its own checkpoints.
    calls = [
        lambda: runstate.CheckpointManager(""),
        lambda: runstate.save("", {"x": 1}),
        lambda: runstate.load(""),
        lambda: runstate.inspect(""),
    ]
    for call in calls:
        with pytest.raises(runstate.CheckpointError, match="the path is empty"):
            call()
    assert list((fresh_cwd / "work").iterdir()) == [fresh_cwd / "work" / "sub"]
