"""Preemption: save_on_signals in the manager, and the `runstate run` supervisor, with real
processes and real signals."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import runstate
from tests.test_exact_resume import assert_exact, reference  # noqa: F401 - the fixture is used by name

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore"}

LOOP = textwrap.dedent(
    """
    import signal, sys, time, runstate
    state = {"step": 0}
    with runstate.CheckpointManager(sys.argv[1], save_every_steps=1000, save_on_signals=(signal.SIGTERM, signal.SIGUSR1)) as mgr:
        start = mgr.restore(state) or 0
        print("start", start, flush=True)
        for step in range(start, 10**6):
            time.sleep(0.01)  # one "training step"
            state["step"] = step + 1
            mgr.save(step + 1, state)
            if step + 1 == start + 3:
                print("running", flush=True)
            if mgr.preempted:
                print("preempted", step + 1, flush=True)
                break
    print("handler restored", signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, flush=True)
    sys.exit(mgr.exit_code)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_makes_the_next_save_write_and_the_loop_end(tmp_path: Path, signum: int) -> None:
    proc = subprocess.Popen([sys.executable, "-c", LOOP, str(tmp_path)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().split() == ["start", "0"]
    assert proc.stdout.readline().strip() == "running"
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == runstate.CheckpointManager.EXIT_PREEMPTED == 75  # "saved, restart me"
    lines = out.strip().splitlines()
    preempted_at = int(lines[0].split()[1])
    assert lines[-1] == "handler restored True"
    mgr = runstate.CheckpointManager(tmp_path, read_only=True)
    assert mgr.steps() == [preempted_at]  # only the signal-triggered save: the cadence is 1000
    # The same command resumes from it.
    again = subprocess.Popen([sys.executable, "-c", LOOP, str(tmp_path)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert again.stdout is not None
    assert again.stdout.readline().split() == ["start", str(preempted_at)]
    assert again.stdout.readline().strip() == "running"
    again.send_signal(signal.SIGTERM)
    out, _ = again.communicate(timeout=30)
    assert again.returncode == 75 and int(out.split()[1]) > preempted_at


def test_handlers_are_restored_on_close(tmp_path: Path) -> None:
    marker: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: marker.append(s))
    try:
        mgr = runstate.CheckpointManager(tmp_path, save_on_signals=(signal.SIGUSR1,))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert mgr.signal_received == signal.SIGUSR1 and marker == []
        assert mgr.save(5, {"x": 1}) is True and mgr.preempted
        mgr.close()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert marker == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_signals_need_the_main_thread(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def make() -> None:
        try:
            runstate.CheckpointManager(tmp_path, save_on_signals=(signal.SIGTERM,))
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=make)
    t.start()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], runstate.CheckpointError)
    assert "only be installed from the main thread" in str(errors[0])


FLAKY = textwrap.dedent(
    """
    import os, signal, sys
    n = int(os.environ["RUNSTATE_RESTART_COUNT"])
    with open(sys.argv[1], "a") as f:
        f.write(f"{n}\\n")
    if n == 0:
        sys.exit(3)
    if n == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(0)
    """
)


def supervisor(*args: str) -> list[str]:
    return [sys.executable, "-m", "runstate", "run", *args]


def test_supervisor_restarts_until_success_and_logs_each_restart(tmp_path: Path) -> None:
    log = tmp_path / "starts"
    proc = subprocess.run(
        supervisor("--backoff", "0", "--", sys.executable, "-c", FLAKY, str(log)),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().split() == ["0", "1", "2"]
    assert "exited with code 3; restart 1 of 3" in proc.stderr
    assert "killed by SIGKILL; restart 2 of 3" in proc.stderr
    assert "succeeded after 2 restart(s)" in proc.stderr


def test_supervisor_gives_up_with_the_childs_code(tmp_path: Path) -> None:
    proc = subprocess.run(
        supervisor("--max-restarts", "2", "--backoff", "0", "--", "sh", "-c", "exit 7"),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 7
    assert "no restarts left (2 used)" in proc.stderr
    killed = subprocess.run(
        supervisor("--max-restarts", "0", "--", "sh", "-c", "kill -9 $$"), env=ENV, capture_output=True, text=True
    )
    assert killed.returncode == 128 + 9


def test_supervisor_usage_errors() -> None:
    proc = subprocess.run(supervisor(), env=ENV, capture_output=True, text=True)
    assert proc.returncode == 2 and "give the command to run after --" in proc.stderr
    missing = subprocess.run(supervisor("--", "/nonexistent/cmd"), env=ENV, capture_output=True, text=True)
    assert (
        missing.returncode == 127
        and "cannot start /nonexistent/cmd" in missing.stderr
        and "Traceback" not in missing.stderr
    )


GRACEFUL = textwrap.dedent(
    """
    import signal, sys, time
    def stop(signum, frame):
        open(sys.argv[1], "w").write(f"got {signum}")
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_supervisor_forwards_sigterm_and_does_not_restart(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        supervisor("--", sys.executable, "-c", GRACEFUL, str(marker)),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert marker.read_text() == f"got {int(signal.SIGTERM)}"
    assert "restart" not in err


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(x) for x in text.split()]


def progress(out_dir: Path) -> int:
    path = out_dir / "losses.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.e2e
def test_supervised_training_killed_at_random_moments_ends_bit_identical(tmp_path: Path, reference) -> None:  # noqa: F811
    """The supervisor restarts a real training job whose process is SIGKILLed twice at random
    moments; the job resumes by itself each time and ends identical to an uninterrupted run."""
    config = "adamw_onecycle"
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    job = [sys.executable, str(ROOT / "tests" / "e2e" / "train_job.py"), config, str(run_dir), str(out_dir)]
    sup = subprocess.Popen(
        supervisor("--backoff", "0", "--max-restarts", "5", "--", *job), env=ENV, stderr=subprocess.PIPE, text=True
    )
    rnd = random.Random()
    kills = 0
    killed_after: list[int] = []
    deadline = time.monotonic() + 120
    while kills < 2 and time.monotonic() < deadline and sup.poll() is None:
        target = rnd.randint(5, 35)
        while progress(out_dir) < target and sup.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        pids = children(sup.pid)
        if pids and progress(out_dir) < 42:
            os.kill(pids[0], signal.SIGKILL)
            killed_after.append(progress(out_dir))
            kills += 1
            while children(sup.pid) == pids and sup.poll() is None:
                time.sleep(0.01)
    _, err = sup.communicate(timeout=180)
    assert sup.returncode == 0, err
    assert kills >= 1, f"no kill landed ({killed_after})"
    assert err.count("killed by SIGKILL") == kills
    ref = reference(config)
    steps = [json.loads(line)["step"] for line in (out_dir / "losses.jsonl").read_text().splitlines()]
    assert len(steps) >= 42 and steps[-1] == 42
    assert_exact(ref, out_dir, 0)  # every logged loss, before and after each restart, matches
