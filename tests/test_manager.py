"""CheckpointManager: cadence, retention, commit visibility, locking and restore semantics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import runstate
from runstate.manager import CheckpointManager
from tests.conftest import fresh_training_state, make_training_state

ROOT = Path(__file__).resolve().parents[1]


def test_restore_from_nothing_returns_none_and_changes_nothing(tmp_path: Path) -> None:
    state = {"epoch": 5}
    for directory in (tmp_path / "missing", tmp_path):
        with CheckpointManager(directory, read_only=True) as mgr:
            assert mgr.restore(state) is None
            assert mgr.latest_step() is None and mgr.steps() == []
    assert state == {"epoch": 5}
    assert not (tmp_path / "missing").exists()  # a reader creates nothing
    with CheckpointManager(tmp_path / "new") as mgr:  # a writer creates the run directory and takes the lock
        assert mgr.restore(state) is None and state == {"epoch": 5}
    assert sorted(os.listdir(tmp_path / "new")) == [".lock"]


def test_save_restore_latest_and_specific_step(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep_last=None) as mgr:
        for step in (10, 20, 30):
            assert mgr.save(step, {"epoch": step // 10}, metrics={"loss": 1.0 / step}) is True
        assert mgr.steps() == [10, 20, 30] and mgr.latest_step() == 30
        assert mgr.path(20) == os.path.join(str(tmp_path), "step-000000000020")
        state = {"epoch": None}
        assert mgr.restore(state) == 30 and state["epoch"] == 3
        reader = CheckpointManager(tmp_path, read_only=True)
        assert reader.restore(state, step=10) == 10 and state["epoch"] == 1  # a reader never rolls back
        info = mgr.info(20)
        assert info.step == 20 and info.metrics == {"loss": 0.05} and info.nbytes > 0
        assert info.created.endswith("+00:00") and info.path == mgr.path(20)
        with pytest.raises(runstate.CheckpointNotFoundError, match=r"no checkpoint for step 15 .*steps: 10, 20, 30"):
            mgr.restore(state, step=15)
        with pytest.raises(runstate.StepExistsError, match="step-000000000020 already exists"):
            mgr.save(20, {"epoch": 9})
        assert mgr.restore(state, step=30) == 30 and mgr.steps() == [10, 20, 30]  # the newest: no rollback
    assert runstate.load(os.path.join(tmp_path, "step-000000000020")) == {"epoch": 2}


def test_cadence_by_steps_and_force(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep_last=None, save_every_steps=5) as mgr:
        written = [s for s in range(1, 13) if mgr.save(s, {"s": s})]
        assert written == [5, 10]
        assert mgr.save(11, {"s": 11}, force=True) is True
        assert mgr.steps() == [5, 10, 11]


def test_cadence_by_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    with CheckpointManager(tmp_path, keep_last=None, save_every_seconds=60) as mgr:
        assert mgr.save(1, {"s": 1}) is False
        clock[0] += 61
        assert mgr.save(2, {"s": 2}) is True
        clock[0] += 30
        assert mgr.save(3, {"s": 3}) is False
        clock[0] += 31
        assert mgr.save(4, {"s": 4}) is True
    assert CheckpointManager(tmp_path).steps() == [2, 4]


def test_every_call_saves_without_cadence(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep_last=None) as mgr:
        assert all(mgr.save(s, {"s": s}) for s in range(3))
        assert mgr.steps() == [0, 1, 2]


def test_retention_union_of_last_every_and_best(tmp_path: Path) -> None:
    losses = {1: 0.5, 2: 0.1, 3: 0.9, 4: 0.7, 5: 0.8, 6: 0.6, 7: 0.95, 8: 0.99}
    with CheckpointManager(tmp_path, keep_last=2, keep_every=3, keep_best=2, best_metric="loss") as mgr:
        for step, loss in losses.items():
            mgr.save(step, {"s": step}, metrics={"loss": loss})
        # last 2: 7, 8; every 3: 3, 6; best 2 by min loss: 2 (0.1), 1 (0.5)
        assert mgr.steps() == [1, 2, 3, 6, 7, 8]


def test_retention_max_mode_and_never_deletes_newest(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep_last=1, keep_best=1, best_metric="acc", best_mode="max") as mgr:
        mgr.save(1, {}, metrics={"acc": 0.9})
        mgr.save(2, {}, metrics={"acc": 0.1})
        mgr.save(3, {}, metrics={"acc": 0.2})
        assert mgr.steps() == [1, 3]
        mgr.save(0, {}, metrics={"acc": 0.0})  # an older step written after: kept as the one just saved
        assert mgr.steps() == [0, 1, 3]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep_last": 0}, "keep_last must be a positive int"),
        ({"keep_best": 2}, "keep_best needs best_metric"),
        ({"best_mode": "lowest"}, "best_mode must be 'min' or 'max'"),
        ({"save_every_steps": 0}, "save_every_steps must be a positive int"),
        ({"save_every_seconds": -1.0}, "save_every_seconds must be a positive float"),
    ],
)
def test_bad_options_are_rejected(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CheckpointManager(tmp_path, **kwargs)


def test_directory_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(runstate.CheckpointError, match="is a file"):
        CheckpointManager(tmp_path / "f")
    assert (tmp_path / "f").read_text() == "x"


def test_leftovers_are_ignored_by_readers_and_removed_by_the_next_writer(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"s": 1})
    (tmp_path / ".tmp-step-000000000002-0123456789ab").mkdir()
    (tmp_path / ".tmp-step-000000000002-0123456789ab" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".del-step-000000000000-0123456789ab").mkdir()
    reader = CheckpointManager(tmp_path, read_only=True)
    assert reader.steps() == [1]
    assert (tmp_path / ".tmp-step-000000000002-0123456789ab").exists()  # readers never delete
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(2, {"s": 2})
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock") == ["step-000000000001", "step-000000000002"]


def test_second_writer_fails_when_created_and_readers_need_no_lock(tmp_path: Path) -> None:
    first = CheckpointManager(tmp_path)
    first.save(1, {"s": 1})
    with pytest.raises(runstate.LockError, match=f"being written by another CheckpointManager \\(pid {os.getpid()}"):
        CheckpointManager(tmp_path)  # before it restores and trains, not at its first save
    reader = CheckpointManager(tmp_path, read_only=True)
    state = {"s": None}
    assert reader.restore(state) == 1 and state["s"] == 1  # reading works while the writer holds the lock
    with pytest.raises(runstate.CheckpointError, match="is read-only .* cannot save"):
        reader.save(2, {"s": 2})
    with pytest.raises(runstate.CheckpointError, match="is read-only .* cannot remove leftovers"):
        reader.clean()
    first.close()
    second = CheckpointManager(tmp_path)
    assert second.save(2, {"s": 2}) is True
    assert reader.steps() == [1, 2] and reader.latest_step() == 2
    second.close()
    with pytest.raises(runstate.CheckpointError, match="is closed"):
        second.save(3, {"s": 3})


def test_a_writer_dropped_without_close_frees_the_lock(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"s": 1})
    assert CheckpointManager(tmp_path).steps() == [1]  # a writer never closed, garbage at once
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.save(2, {"s": 2})


@pytest.mark.parametrize("option", [{"async_save": True}, {"save_on_signals": (signal.SIGUSR1,)}])
def test_read_only_refuses_writer_options(tmp_path: Path, option: dict) -> None:
    with pytest.raises(runstate.CheckpointError, match="read_only=True cannot be combined"):
        CheckpointManager(tmp_path, read_only=True, **option)


def test_lock_of_a_killed_writer_is_taken_over(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, signal, runstate
        mgr = runstate.CheckpointManager({str(tmp_path)!r})
        mgr.save(1, {{"s": 1}})
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, check=False, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert "pid" in (tmp_path / ".lock").read_text()
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.save(2, {"s": 2}) is True
        assert mgr.steps() == [1, 2]


def test_restore_full_training_state(tmp_path: Path) -> None:
    state = make_training_state()
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(2, state)
    target = fresh_training_state()
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.restore(target) == 2
    assert torch.equal(target["model"][0].weight, state["model"][0].weight)
    assert target["scheduler"].last_epoch == 2


KILL_SAVER = textwrap.dedent(
    """
    import sys, torch, runstate
    mgr = runstate.CheckpointManager(sys.argv[1], keep_last=2)
    step = (mgr.latest_step() or 0) + 1
    while True:
        state = {"w": {f"t{i}": torch.full((64, 1024), float(step)) for i in range(16)}, "step": step}
        mgr.save(step, state)
        print(step, flush=True)
        step += 1
    """
)


def test_sigkill_during_saves_never_exposes_a_partial_checkpoint(tmp_path: Path) -> None:
    """A saver is SIGKILLed at random moments; every visible checkpoint is whole."""
    import random

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    rnd = random.Random()
    for trial in range(6):
        proc = subprocess.Popen([sys.executable, "-c", KILL_SAVER, str(tmp_path)], env=env, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one save done
        time.sleep(rnd.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with CheckpointManager(tmp_path) as mgr:
            steps = mgr.steps()
            assert steps, f"trial {trial}: no checkpoint left"
            for step in steps:
                got = runstate.load(mgr.path(step))
                assert got["step"] == step
                assert all(torch.equal(t, torch.full((64, 1024), float(step))) for t in got["w"].values())


# -- issue 16: policy objects, one config error type, RestoreResult ------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep_last": -1}, "keep_last must be a positive int"),
        ({"keep_last": "3"}, "keep_last must be a positive int"),
        ({"keep_every": 2.0}, "keep_every must be a positive int"),
        ({"keep_best": 1, "best_metric": 3}, "best_metric must be a metric name"),
        ({"best_mode": "x"}, "best_mode must be 'min' or 'max'"),
        ({"save_every_steps": 0}, "save_every_steps must be a positive int"),
        ({"save_every_seconds": float("nan")}, "save_every_seconds must be a positive float"),
        ({"save_on_signals": "SIGTERM"}, "save_on_signals must be a sequence of signal numbers"),
        ({"save_on_signals": (signal.SIGKILL,)}, "not a signal a handler can be installed for"),
        ({"save_on_signals": (0,)}, "not a signal a handler can be installed for"),
        ({"retention": 3}, "retention must be a runstate.Retention"),
        ({"cadence": {"every_steps": 5}}, "cadence must be a runstate.SaveCadence"),
        ({"retention": runstate.Retention(keep_last=2), "keep_last": 3}, "keep_last both set the retention"),
        ({"cadence": runstate.SaveCadence(every_steps=5), "save_every_seconds": 60.0}, "save_every_seconds both set"),
        ({"read_only": True, "async_save": True}, "read_only=True cannot be combined"),
    ],
)
def test_every_bad_option_raises_checkpoint_config_error_before_touching_the_run(
    tmp_path: Path, kwargs: dict, match: str
) -> None:
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(runstate.CheckpointConfigError, match=match):
        CheckpointManager(tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()  # nothing created, no lock taken
    assert signal.getsignal(signal.SIGTERM) is previous


def test_retention_and_cadence_objects_are_the_keyword_arguments(tmp_path: Path) -> None:
    retention, cadence = runstate.Retention(keep_last=2, keep_every=4), runstate.SaveCadence(every_steps=2)
    with CheckpointManager(tmp_path / "a", retention=retention, cadence=cadence) as objects:
        assert objects.retention is retention and objects.cadence is cadence
        written = [s for s in range(1, 11) if objects.save(s, {"s": s})]
    with CheckpointManager(tmp_path / "b", keep_last=2, keep_every=4, save_every_steps=2) as keywords:
        assert keywords.retention == retention and keywords.cadence == cadence
        assert [s for s in range(1, 11) if keywords.save(s, {"s": s})] == written == [2, 4, 6, 8, 10]
    assert objects.steps() == keywords.steps() == [4, 8, 10]
    with CheckpointManager(tmp_path / "c") as defaults:  # keep_last=3 when neither is given
        assert defaults.retention == runstate.Retention(keep_last=3) and defaults.cadence == runstate.SaveCadence()


def test_restore_returns_the_step_with_its_report(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep_last=None) as mgr:
        mgr.save(0, {"w": torch.zeros(2), "n": 0})
        mgr.save(7, {"w": torch.ones(2), "n": 7})
        state = {"w": torch.zeros(2), "n": None, "extra": 1}
        result = mgr.restore(state, strict=False)
        assert isinstance(result, runstate.RestoreResult) and isinstance(result, int)
        assert result == 7 and result.step == 7 and result.path == mgr.path(7) and state["n"] == 7
        assert result.report is mgr.last_restore_report and not result.report.ok
        assert result.report.of("extra") == ["state['extra']"]
        assert (result or 0) + 1 == 8 and type(result + 1) is int and list(range(result, 9)) == [7, 8]
        assert f"{result}" == str(result) == "7" and "RestoreResult(step=7" in repr(result)
        assert mgr.save(result + 1, {"n": 8}) and mgr.path(result) == mgr.path(7)
        mgr.save(mgr.restore({"n": None}, step=8) + 1, {"n": 9})  # the result is a step the manager takes
        zero = mgr.restore({"w": None, "n": None}, step=0)
        assert zero.step == 0 and (zero or 0) == 0 and zero.report.ok  # falsy like 0: `or 0` still works
        assert mgr.steps() == [0] and [s for s, _ in mgr.abandoned()] == [7, 8, 9]  # restoring step 0: a rollback


def test_retention_runs_after_save_returns_and_listing_waits_for_it(tmp_path: Path, monkeypatch) -> None:
    """A synchronous save returns once its checkpoint is committed; retention (deleting the old
    checkpoints) runs in the background, and steps()/wait()/close() see it done."""
    import threading

    from runstate._impl.housekeeping import RunHousekeeping

    real = RunHousekeeping.apply_retention
    release = {step: threading.Event() for step in (1, 2, 3)}
    started = {step: threading.Event() for step in (1, 2, 3)}
    threads: list[str] = []

    def gated(self, just_saved: int) -> None:
        threads.append(threading.current_thread().name)
        started[just_saved].set()
        assert release[just_saved].wait(30), "the test never released retention"
        real(self, just_saved)

    def names() -> list[str]:
        return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-"))

    monkeypatch.setattr(RunHousekeeping, "apply_retention", gated)
    state = {"x": torch.ones(4)}
    with CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save(1, state)  # returns although its retention is blocked
        assert started[1].wait(30)
        release[1].set()
        mgr.save(2, state)  # waits for step 1's retention (released), not for its own
        assert started[2].wait(30)
        assert names() == ["step-000000000001", "step-000000000002"]  # step 2's retention is blocked
        release[2].set()
        assert mgr.steps() == [2]  # steps() waited for it
        release[3].set()
        mgr.save(3, state)
        mgr.wait()
        assert names() == ["step-000000000003"]
    assert threads and all(name.startswith("runstate-retention") for name in threads)
    assert CheckpointManager(tmp_path, read_only=True).steps() == [3]


def test_a_retention_failure_is_logged_and_the_next_save_goes_on(tmp_path: Path, monkeypatch, caplog) -> None:
    from runstate._impl.housekeeping import RunHousekeeping

    def broken(self, just_saved: int) -> None:
        raise ValueError("a bug in retention")

    monkeypatch.setattr(RunHousekeeping, "apply_retention", broken)
    with CheckpointManager(tmp_path, keep_last=1) as mgr, caplog.at_level("ERROR", "runstate"):
        mgr.save(1, {"x": torch.ones(2)})
        mgr.save(2, {"x": torch.ones(2)})
        assert mgr.steps() == [1, 2]
    assert any("step 1 is saved, but the upkeep after it (retention) failed" in r.getMessage() for r in caplog.records)


def test_a_save_waits_for_retention_even_when_another_thread_is_already_waiting(tmp_path: Path, monkeypatch) -> None:
    """The bug (review): settle() dropped the handle before waiting, so while a monitoring
    thread's steps() waited for step 1's retention, save(2) did not: it claimed, captured and
    wrote next to the deletions (an incremental run then lost a fresh blob to the collection)."""
    import threading

    from runstate._impl.housekeeping import RunHousekeeping

    real_retention, real_before = RunHousekeeping.apply_retention, RunHousekeeping.before_save
    release, retention_done, overlaps = threading.Event(), threading.Event(), []

    def gated(self, just_saved: int) -> None:
        if just_saved == 1:
            assert release.wait(30), "the test never released retention"
        real_retention(self, just_saved)
        if just_saved == 1:
            retention_done.set()

    def before(self, step: int) -> None:
        overlaps.append((step, retention_done.is_set()))
        real_before(self, step)

    monkeypatch.setattr(RunHousekeeping, "apply_retention", gated)
    monkeypatch.setattr(RunHousekeeping, "before_save", before)
    with CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save(1, {"x": torch.ones(2)})
        monitor = threading.Thread(target=mgr.steps)
        monitor.start()
        threading.Timer(0.3, release.set).start()
        mgr.save(2, {"x": torch.ones(2)})
        monitor.join(30)
        assert mgr.steps() == [2]
    assert overlaps == [(1, False), (2, True)]  # step 2 was claimed only after step 1's retention


def test_retention_finishes_at_exit_without_close_on_an_object_store(tmp_path: Path) -> None:
    """The bug (review): at exit without close(), concurrent.futures refused new work to every
    executor before the retention thread was joined, and an fsspec store's listing (a thread
    pool) failed: an ERROR traceback and old checkpoints never deleted."""
    script = textwrap.dedent(
        """
        import logging, sys, numpy as np, runstate
        logging.basicConfig(level=logging.WARNING)
        import runstate._impl.savers as savers
        real = savers._after_commit
        def slow(*args):
            import time; time.sleep(0.3)  # still deleting when the script ends
            real(*args)
        savers._after_commit = slow
        mgr = runstate.CheckpointManager(sys.argv[1], keep_last=1)
        for s in range(1, 4):
            mgr.save(s, {"w": np.full(1000, float(s))})
        """
    )
    url = f"file://{tmp_path / 'run'}"
    proc = subprocess.run([sys.executable, "-c", script, url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr
    assert CheckpointManager(url, read_only=True).steps() == [3]
