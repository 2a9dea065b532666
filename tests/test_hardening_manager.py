"""CheckpointManager hardening (issues 13 and 14), each with real processes and signals where
the bug involves them: signal handlers shared by several managers, a failed async save at
exit, cleanup during an async save, a writer that learns at once it cannot write, a
preempted job under ``runstate run``, readers next to a writer whose retention deletes,
and ``latest_step(verified=True)``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import runstate
import runstate._impl.parts as parts_module
import runstate._impl.run_dir as run_dir_module
from runstate._impl.reader import CheckpointReader
from runstate.cli import run as run_cli
from tests.test_exact_resume import assert_exact, reference  # noqa: F401 - the fixture is used by name

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore"}


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# -- 13.18: two managers listening to the same signal ------------------------------------------

TWO_MANAGERS = """
    import signal, sys, time, runstate
    run = sys.argv[1]
    a = runstate.CheckpointManager(run + "/a", save_on_signals=(signal.SIGTERM,))
    b = runstate.CheckpointManager(run + "/b", save_on_signals=(signal.SIGTERM,))
    print("ready", flush=True)
    deadline = time.monotonic() + 60
    while (a.signal_received is None or b.signal_received is None) and time.monotonic() < deadline:
        time.sleep(0.01)
    print("got", a.signal_received, b.signal_received, flush=True)
    print("saved", a.save(1, {"x": 1}), b.save(1, {"x": 1}), a.preempted, b.preempted, flush=True)
    a.close()  # not LIFO: the first one created closes first
    print("closed a", flush=True)
    sys.stdin.readline()  # the test sent a second SIGTERM meanwhile: b still listens, nobody dies
    print("alive", flush=True)
    b.close()
    print("default back", signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, flush=True)
"""


def test_two_managers_both_get_the_signal_and_any_close_order_restores_the_handler(tmp_path: Path) -> None:
    proc = spawn(TWO_MANAGERS, str(tmp_path))
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline().split() == ["got", str(int(signal.SIGTERM)), str(int(signal.SIGTERM))]
    assert proc.stdout.readline().split() == ["saved", "True", "True", "True", "True"]
    assert proc.stdout.readline().strip() == "closed a"
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.split("\n")[:2] == ["alive", "default back True"]
    assert runstate.CheckpointManager(tmp_path / "a", read_only=True).steps() == [1]
    assert runstate.CheckpointManager(tmp_path / "b", read_only=True).steps() == [1]


def test_a_handler_installed_before_comes_back_after_both_close(tmp_path: Path) -> None:
    marker: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: marker.append(s))
    try:
        a = runstate.CheckpointManager(tmp_path / "a", save_on_signals=(signal.SIGUSR2,))
        b = runstate.CheckpointManager(tmp_path / "b", save_on_signals=(signal.SIGUSR2,))
        os.kill(os.getpid(), signal.SIGUSR2)
        assert a.signal_received == b.signal_received == signal.SIGUSR2 and marker == []
        a.close()
        a.close()  # idempotent: b keeps listening
        os.kill(os.getpid(), signal.SIGUSR2)
        assert marker == []
        b.close()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert marker == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


# -- 13.19: a failed async save in a process that exits without close() ---------------------------

EXIT_WITHOUT_CLOSE = """
    import errno, sys, numpy as np, runstate, runstate._impl.parts as m
    real = m.write_part
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    mgr = runstate.CheckpointManager(sys.argv[1], async_save=True)
    mgr.save(1, {"w": np.ones(4)})
    mgr.wait()
    if sys.argv[2] == "fail":
        m.write_part = full_disk
    mgr.save(2, {"w": np.ones(4)})
    print("end of script", flush=True)
"""


@pytest.mark.parametrize("outcome", ["fail", "ok"])
def test_a_failed_async_save_is_reported_at_exit(tmp_path: Path, outcome: str) -> None:
    proc = spawn(EXIT_WITHOUT_CLOSE, str(tmp_path), outcome)
    out, err = proc.communicate(timeout=120)
    assert out == "end of script\n"
    steps = runstate.CheckpointManager(tmp_path, read_only=True).steps()
    if outcome == "ok":  # control: the pending save is committed at exit, status 0
        assert proc.returncode == 0 and steps == [1, 2] and "ERROR" not in err, err
        return
    assert proc.returncode == 1, err
    assert "background save of step 2 failed" in err and "No space left on device" in err
    assert "exiting with status 1" in err and steps == [1]


EXIT_COMPRESSED = """
    import sys, time, numpy as np, runstate, runstate._impl.parts as m
    real = m.write_part
    def late(*args, **kwargs):  # the script has ended before the tensor file is compressed
        time.sleep(0.5)
        return real(*args, **kwargs)
    m.write_part = late
    mgr = runstate.CheckpointManager(sys.argv[1], async_save=True, compression="zstd")
    mgr.save(1, {"w": np.linspace(0, 1, 4 << 20, dtype=np.float32)})  # 16 MiB: 16 chunks on the threads
    print("end of script", flush=True)
"""


def test_a_compressed_async_save_in_flight_at_exit_is_committed(tmp_path: Path) -> None:
    """concurrent.futures refuses new work at interpreter exit before runstate's exit hook
    finishes the save in flight: the compression threads must not be needed then."""
    proc = spawn(EXIT_COMPRESSED, str(tmp_path))
    out, err = proc.communicate(timeout=180)
    assert out == "end of script\n"
    assert proc.returncode == 0 and "ERROR" not in err, err
    assert runstate.CheckpointManager(tmp_path, read_only=True).steps() == [1]
    restored = runstate.load(tmp_path / "step-000000000001")["w"]
    assert np.array_equal(restored, np.linspace(0, 1, 4 << 20, dtype=np.float32))


# -- 13.2: cleanup while an async save is in flight -----------------------------------------------


def test_clean_never_touches_the_save_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = parts_module.write_part
    writing, go_on = threading.Event(), threading.Event()

    def slow(staging, *args, **kwargs):  # type: ignore[no-untyped-def]
        with staging.open_write("extra.bin") as f:  # a file of the save in flight, in its temporary dir
            f.write(b"x")
        writing.set()
        go_on.wait(30)
        return real(staging, *args, **kwargs)

    monkeypatch.setattr(parts_module, "write_part", slow)
    state = {"w": np.arange(1000.0)}
    with runstate.CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(1, state)
        assert writing.wait(30)
        threading.Timer(0.5, go_on.set).start()
        assert mgr.clean() == []  # waited for the save: its temporary directory was not a leftover
        assert mgr.steps() == [1]
    assert runstate.verify(tmp_path / "step-000000000001").ok
    np.testing.assert_array_equal(runstate.load(tmp_path / "step-000000000001")["w"], state["w"])


# -- 14.6: a second writer fails when it is created --------------------------------------------------

SECOND_WRITER = """
    import sys, runstate
    try:
        runstate.CheckpointManager(sys.argv[1])
    except runstate.LockError as exc:
        print("LockError at creation:", exc, flush=True)
        sys.exit(3)
    print("created", flush=True)
"""


def test_a_second_writer_process_fails_when_it_creates_its_manager(tmp_path: Path) -> None:
    with runstate.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"x": 1})
        proc = spawn(SECOND_WRITER, str(tmp_path))
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 3, (out, err)
        assert f"LockError at creation: [Errno 11] {tmp_path} is being written by another CheckpointManager (pid " in out
        reader = runstate.CheckpointManager(tmp_path, read_only=True)  # an evaluation job: no lock
        state = {"x": None}
        assert reader.restore(state) == 1 and state == {"x": 1} and reader.latest_step() == 1
    proc = spawn(SECOND_WRITER, str(tmp_path))
    assert proc.communicate(timeout=60)[0] == "created\n"


# -- 14.5: a job that stops on preemption asks to be restarted ------------------------------------------


def test_exit_code_is_the_supervisors_restart_code(tmp_path: Path) -> None:
    assert runstate.CheckpointManager.EXIT_PREEMPTED == run_cli.EXIT_PREEMPTED == 75
    with runstate.CheckpointManager(tmp_path, save_on_signals=(signal.SIGUSR1,)) as mgr:
        assert mgr.exit_code == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        assert mgr.exit_code == 0  # not yet saved
        mgr.save(1, {"x": 1})
        assert mgr.preempted and mgr.exit_code == 75
    assert mgr.exit_code == 75


FLAKY_PREEMPTED = """
    import os, sys
    n = int(os.environ["RUNSTATE_RESTART_COUNT"])
    with open(sys.argv[1], "a") as f:
        f.write(f"{n}\\n")
    sys.exit(75 if n < 3 else 0)
"""


def test_supervisor_restarts_a_preempted_job_without_counting_a_failure(tmp_path: Path) -> None:
    log = tmp_path / "starts"
    proc = subprocess.run(
        [sys.executable, "-m", "runstate", "run", "--max-restarts", "0", "--", sys.executable, "-c",
         textwrap.dedent(FLAKY_PREEMPTED), str(log)],
        env=ENV, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().split() == ["0", "1", "2", "3"]
    assert proc.stderr.count("was preempted after saving (exit 75); restarting it") == 3


@pytest.mark.e2e
def test_a_job_that_stops_on_preemption_is_restarted_and_ends_bit_identical(tmp_path: Path, reference) -> None:  # noqa: F811
    """The job breaks out of its loop on ``mgr.preempted`` and exits with ``mgr.exit_code``:
    SIGTERMed twice (directly, not through the supervisor), it is restarted and ends identical
    to an uninterrupted run."""
    config = "adamw_onecycle"
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    job = [sys.executable, str(ROOT / "tests" / "e2e" / "preemptible_job.py"), config, str(run_dir), str(out_dir)]
    sup = subprocess.Popen(
        [sys.executable, "-m", "runstate", "run", "--backoff", "0", "--max-restarts", "0", "--", *job],
        env=ENV, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 180
    for target in (9, 23):
        while progress(out_dir) < target and sup.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        pids = children(sup.pid)
        assert pids, "the job ended before it could be preempted"
        os.kill(pids[0], signal.SIGTERM)
        while children(sup.pid) == pids and sup.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    _, err = sup.communicate(timeout=180)
    assert sup.returncode == 0, err
    assert err.count("was preempted after saving (exit 75)") == 2, err
    assert (out_dir / "final.safetensors").exists()
    assert_exact(reference(config), out_dir, 0)


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def progress(out_dir: Path) -> int:
    path = out_dir / "losses.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


# -- 14.8: latest_step(verified=True) ------------------------------------------------------------------


def two_steps_the_second_damaged(run: Path) -> None:
    """Save steps 1 and 2, then flip the last byte of step 2's tensor file."""
    with runstate.CheckpointManager(run, keep_last=None) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": np.full(64, float(step))})
    data = run / "step-000000000002" / "w.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))


def test_latest_step_verified_skips_a_damaged_step(tmp_path: Path) -> None:
    two_steps_the_second_damaged(tmp_path)
    reader = runstate.CheckpointManager(tmp_path, read_only=True)
    assert reader.latest_step() == 2  # names only: the damage is not seen
    assert reader.latest_step(verified=True) == 1
    assert reader.steps() == [1, 2]  # nothing moved or deleted by a reader


def test_latest_step_verified_lists_again_when_the_writer_deletes_the_step_being_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """keep_last=1: the writer commits step 2 and deletes step 1 while a reader verifies step 1.
    That is not damage: the reader lists again and returns step 2 (it returned None)."""
    writer = runstate.CheckpointManager(tmp_path, keep_last=1)
    writer.save(1, {"w": np.full(64, 1.0)})
    reader = runstate.CheckpointManager(tmp_path, read_only=True)
    verify_reader = run_dir_module.verify_reader
    checked: list[int] = []

    def save_meanwhile(checkpoint: CheckpointReader) -> runstate.VerifyReport:
        checked.append(checkpoint.info().step)
        if len(checked) == 1:
            writer.save(2, {"w": np.full(64, 2.0)})  # retention deletes step 1 under the reader
            writer.wait()  # retention runs in the background after save returns
        return verify_reader(checkpoint)

    monkeypatch.setattr(run_dir_module, "verify_reader", save_meanwhile)
    assert reader.latest_step(verified=True) == 2
    assert checked == [1, 2]
    writer.close()


def test_a_step_deleted_by_the_writer_while_a_reader_restores_it_is_not_called_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """restore(state, step=1) in a reader while the writer's keep_last=1 deletes step 1: the step
    is gone, not damaged (it raised CorruptCheckpointError: manifest.json is missing)."""
    import runstate._impl.run_restore as run_restore

    writer = runstate.CheckpointManager(tmp_path, keep_last=1)
    writer.save(1, {"w": np.full(64, 1.0)})
    reader = runstate.CheckpointManager(tmp_path, read_only=True)

    class DeletedFirst(CheckpointReader):
        def __init__(self, *args: object, **kwargs: object) -> None:
            writer.save(2, {"w": np.full(64, 2.0)})  # retention deletes step 1 before it is opened
            writer.wait()  # retention runs in the background after save returns
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(run_restore, "CheckpointReader", DeletedFirst)
    state = {"w": np.zeros(64)}
    with pytest.raises(runstate.CheckpointNotFoundError, match=r"step 1 of .* was deleted .*steps: \[2\]") as caught:
        reader.restore(state, step=1)
    assert not isinstance(caught.value, runstate.CorruptCheckpointError)
    assert np.array_equal(state["w"], np.zeros(64))  # nothing restored
    writer.close()


# -- 13.9: readers next to a writer whose retention deletes ----------------------------------------------

WRITER = """
    import sys, time, numpy as np, runstate
    run, seconds = sys.argv[1], float(sys.argv[2])
    with runstate.CheckpointManager(run, keep_last=1) as mgr:
        step, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            step += 1
            mgr.save(step, {"step": step, "w": np.full((8, 256), float(step))})
            if step == 1:
                print("first", flush=True)
    print("saves", step, flush=True)
"""

READER = """
    import contextlib, io, json, sys, time, numpy as np, runstate
    from runstate.cli import main as cli
    run, seconds = sys.argv[1], float(sys.argv[2])
    mgr = runstate.CheckpointManager(run, read_only=True)
    problems, restored, verified, i, end = [], 0, 0, 0, time.monotonic() + seconds
    while time.monotonic() < end:
        i += 1
        state = {"step": None, "w": None}
        try:
            step = mgr.restore(state)
        except runstate.CheckpointError as exc:
            problems.append(f"restore: {type(exc).__name__}: {exc}")
            continue
        if step is None:
            problems.append("restore returned None")
        elif state["step"] != step or not np.array_equal(state["w"], np.full((8, 256), float(step))):
            problems.append(f"restore of step {step} gave step {state['step']}")
        else:
            restored += 1
        if i % 5 == 1:
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                code = cli(["verify", run])
            if code != 0:
                problems.append(f"verify exited {code}: {out.getvalue()[-300:]}")
            verified += 1
        latest = mgr.latest_step()
        if latest is None:
            problems.append("latest_step returned None")
        if i % 5 == 3 and mgr.latest_step(verified=True) is None:
            problems.append("latest_step(verified=True) returned None")
    print(json.dumps({"iterations": i, "restored": restored, "verified": verified, "problems": problems[:10], "n": len(problems)}))
"""


def test_a_reader_next_to_a_deleting_writer_always_finds_a_checkpoint(tmp_path: Path, stress: bool) -> None:
    """An evaluation job restores, lists and verifies for 10 s (100 s under --stress: thousands
    of iterations) while the writer saves with keep_last=1, deleting a step at every save."""
    seconds = 100.0 if stress else 10.0
    writer = spawn(WRITER, str(tmp_path), "3600")
    assert writer.stdout is not None
    assert writer.stdout.readline().strip() == "first"
    try:
        reader = spawn(READER, str(tmp_path), str(seconds))
        out, err = reader.communicate(timeout=seconds + 300)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.communicate(timeout=60)
    assert reader.returncode == 0, err
    result = json.loads(out)
    assert result["n"] == 0, result["problems"]
    print(f"reader: {result['iterations']} restores, {result['verified']} runstate verify runs, next to the writer")
    assert result["iterations"] >= 20 and result["restored"] == result["iterations"]
    assert result["verified"] == len(range(1, result["iterations"] + 1, 5))


def test_ls_says_what_it_checked_and_verify_finds_the_damage(tmp_path: Path) -> None:
    from tests.test_rollback import cli_out

    two_steps_the_second_damaged(tmp_path)
    code, out = cli_out("ls", str(tmp_path))
    rows = [line.split() for line in out.splitlines() if re.match(r" *\d+ +\d{4}-\d\d-\d\d ", line)]
    assert code == 0 and [r[-3:] for r in rows] == [["not", "verified", "ok"], ["not", "verified", "ok"]]
    assert "not verified; runstate ls --verify" in out
    code, out = cli_out("ls", "--verify", str(tmp_path))
    rows = [line for line in out.splitlines() if re.match(r" *\d+ +\d{4}-\d\d-\d\d ", line)]
    assert code == 0 and rows[0].split()[-2:] == ["verified", "ok"]
    assert " verified " in rows[1] and "corrupt: w.safetensors" in rows[1] and "checksum mismatch" in rows[1]
    code, listed = cli_out("ls", "--json", "--verify", str(tmp_path))
    checked = {(e["step"], e["status"], e["checked"]) for e in json.loads(listed)["checkpoints"]}
    assert checked == {(1, "ok", "verified"), (2, "corrupt", "verified")}


def readme_block(section: str) -> str:
    text = (ROOT / "README.md").read_text().split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", text, re.S)
    assert match, f"no python block in the README section {section!r}"
    return match.group(1)


def test_readme_preemption_example_runs_as_printed_under_the_supervisor(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(readme_block("Preemption and restarts"))
    sup = subprocess.Popen(
        [sys.executable, "-m", "runstate", "run", "--max-restarts", "0", "--", sys.executable, str(script)],
        cwd=tmp_path, env=ENV, stderr=subprocess.PIPE, text=True,
    )
    run = tmp_path / "runs" / "preemptible"
    deadline = time.monotonic() + 120
    while not (run / "step-000000000100").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    pids = children(sup.pid)
    assert pids, "the job finished before it could be preempted"
    os.kill(pids[0], signal.SIGTERM)  # the scheduler's notice to the job itself
    _, err = sup.communicate(timeout=120)
    assert sup.returncode == 0, err
    assert "was preempted after saving (exit 75); restarting it (preemption 1)" in err
    steps = runstate.CheckpointManager(run, read_only=True).steps()
    assert steps[-1] == 300 and any(s % 100 for s in steps), steps  # the preemption save, off the cadence
