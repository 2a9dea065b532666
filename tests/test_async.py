"""Async saving: point-in-time snapshots, one save in flight, failures never lost, bounded
memory, and exact resume when a background save is interrupted by SIGKILL."""

from __future__ import annotations

import errno
import os
import signal
import threading
from pathlib import Path

import pytest
import torch

import runstate
import runstate._impl.parts as parts_module
from tests.test_exact_resume import assert_exact, losses, reference, run_job  # noqa: F401


def big_state(value: float = 1.0) -> dict:
    return {"w": {f"t{i}": torch.full((256, 1024), value) for i in range(8)}, "step": 0}


def test_values_changed_after_save_returns_do_not_leak(tmp_path: Path) -> None:
    model = torch.nn.Linear(512, 512)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with runstate.CheckpointManager(tmp_path, async_save=True) as mgr:
        assert mgr.save(1, {"model": model}) is True
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # training goes on, in place, while the save is written
        mgr.wait()
        assert mgr.steps() == [1]
    saved = runstate.load(tmp_path / "step-000000000001")["model"]
    assert all(torch.equal(saved[k], before[k]) for k in before)
    assert not torch.equal(saved["weight"], model.weight)


def test_one_save_in_flight_and_the_next_save_waits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Events, not time bounds: the test must not depend on how loaded the machine is.
    real, release = parts_module.write_part, threading.Event()

    def blocked(*args, **kwargs):
        assert release.wait(30), "the test never released the writer"
        return real(*args, **kwargs)

    monkeypatch.setattr(parts_module, "write_part", blocked)
    with runstate.CheckpointManager(tmp_path, async_save=True, keep_last=None) as mgr:
        mgr.save(1, big_state())  # returns although the write of step 1 cannot finish yet
        assert mgr.steps() == []  # not committed yet
        timer = threading.Timer(0.3, release.set)
        timer.start()
        mgr.save(2, big_state(2.0))
        assert release.is_set()  # save(2) waited for step 1, which needed the release
        assert mgr.steps() == [1]
        timer.join()
    assert runstate.CheckpointManager(tmp_path).steps() == [1, 2]  # close() waited for step 2


@pytest.mark.fresh_process  # forks
def test_a_process_forked_while_a_save_is_in_flight_exits_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bug: a child forked with a save in flight (a DataLoader worker started mid-save) ran the
    exit hook at its end and waited forever for the parent's save: DataLoader's shutdown stalled
    on it until it killed the worker."""
    import multiprocessing

    real, release = parts_module.write_part, threading.Event()

    def blocked(*args, **kwargs):
        assert release.wait(60), "the test never released the writer"
        return real(*args, **kwargs)

    monkeypatch.setattr(parts_module, "write_part", blocked)
    with runstate.CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(1, big_state())
        child = multiprocessing.get_context("fork").Process(target=int)
        child.start()
        child.join(20)
        exited = child.exitcode
        if exited is None:
            child.kill()
            child.join()
        release.set()
    assert exited == 0, "the forked child hung at exit waiting for the parent's save"
    assert runstate.CheckpointManager(tmp_path).steps() == [1]


@pytest.mark.parametrize("reported_by", ["save", "wait", "close"])
def test_a_background_failure_is_raised_by_the_next_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reported_by: str) -> None:
    mgr = runstate.CheckpointManager(tmp_path, async_save=True)
    mgr.save(1, big_state())
    mgr.wait()

    real, calls = parts_module.write_part, []

    def full_disk_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(parts_module, "write_part", full_disk_once)
    assert mgr.save(2, big_state()) is True  # the failure happens in the background
    with pytest.raises(runstate.AsyncSaveError) as err:
        if reported_by == "save":
            mgr.save(3, big_state())
        elif reported_by == "wait":
            mgr.wait()
        else:
            mgr.close()
    assert err.value.step == 2 and "background save of step 2 failed" in str(err.value)
    assert isinstance(err.value.__cause__, runstate.CheckpointWriteError)
    assert err.value.__cause__.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".lock")) == ["step-000000000001"]
    if reported_by != "close":
        assert mgr.save(4, big_state()) is True  # training goes on
    mgr.close()


def test_snapshot_memory_does_not_grow_over_50_saves(tmp_path: Path) -> None:
    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    state = big_state()  # 8 MiB of tensors
    with runstate.CheckpointManager(tmp_path, async_save=True, keep_last=2) as mgr:
        for step in range(5):
            mgr.save(step, state)
        mgr.wait()
        pool, base = mgr._saver.pool.nbytes, rss()
        for step in range(5, 55):
            for t in state["w"].values():
                t.fill_(float(step))
            mgr.save(step, state)
        mgr.wait()
        assert mgr._saver.pool.nbytes == pool == 8 * 256 * 1024 * 4
        assert rss() - base < 16 * 2**20
    got = runstate.load(tmp_path / "step-000000000054")
    assert all(torch.equal(t, torch.full((256, 1024), 54.0)) for t in got["w"].values())


def test_restore_waits_for_the_save_in_flight(tmp_path: Path) -> None:
    with runstate.CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(7, {"x": 7, **big_state()})
        state = {"x": None, "w": None, "step": None}
        assert mgr.restore(state) == 7 and state["x"] == 7


@pytest.mark.e2e
@pytest.mark.parametrize("kill_at", [19, 24])
def test_async_saves_resume_exactly_after_sigkill(tmp_path: Path, reference, kill_at: int) -> None:  # noqa: F811
    config = "adamw_onecycle"
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    killed = run_job(config, run_dir, out_dir, "--kill-at", str(kill_at), "--async-save")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    steps = sorted(int(p.name.split("-")[1]) for p in run_dir.glob("step-*"))
    assert steps, "no checkpoint committed"
    resumed = run_job(config, run_dir, out_dir, "--async-save")
    assert resumed.returncode == 0, resumed.stderr
    assert_exact(reference(config), out_dir, max(steps))
    assert max(losses(out_dir)) == 42
