"""Never lose a checkpoint: SIGKILL, full and failing disks, and corruption, for real.

* SIGKILL: a real process (``tests/e2e/kill_saver.py``) saves step after step and is killed
  at random moments, or kills itself right before or after the N-th call of one function of
  the write path (tensor bytes, tensor files, fsync, mkdir, rename, retention deletions and
  leftover removal). After each kill a new manager must list only whole checkpoints, the
  last step the process was promised must be there and verify, restoring the newest must
  give exactly the values saved at that step, and the next writer must remove the leftovers.
* ENOSPC/EIO: ``tests/faults.py`` fails each OS call of a save in turn; every failure must
  be a ``CheckpointWriteError`` naming the errno and the path, leave older checkpoints
  intact and no temporary behind, and a later save must succeed. Once more for real on a
  1 MiB tmpfs when the machine allows mounting one.
* Corruption: every single-bit flip of every byte of a small checkpoint, truncation at every
  length, deleted files, edited manifests: ``verify`` names the damaged file, ``load`` raises,
  and ``restore`` falls back to an older checkpoint (or raises with ``fallback=False``).

Each test prints its counts (run with ``-s``); ``make stress`` runs ten times more kills.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import runstate
from runstate.format.manifest import _canonical_checksum
from runstate.storage.local import LEFTOVER_PREFIXES
from tests.e2e.kill_saver import make_state
from tests.faults import inject

ROOT = Path(__file__).resolve().parents[1]
SAVER = ROOT / "tests" / "e2e" / "kill_saver.py"
STEP = "step-{:012d}"

# --------------------------------------------------------------------------------------------
# Comparing values exactly


def mismatches(got: Any, want: Any, where: str = "state") -> list[str]:
    """Every difference between a loaded value and the expected one (types, dtypes, bits)."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or list(got) != list(want):
            return [f"{where}: keys {list(got) if isinstance(got, dict) else type(got)} != {list(want)}"]
        return [m for k in want for m in mismatches(got[k], want[k], f"{where}[{k!r}]")]
    if isinstance(want, (np.ndarray, torch.Tensor)):
        if type(got) is not type(want):
            return [f"{where}: {type(got).__name__} != {type(want).__name__}"]
        a, b = (np.asarray(x) for x in (got, want))
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            return [f"{where}: array differs ({a.dtype}{a.shape} vs {b.dtype}{b.shape})"]
        return []
    if type(got) is not type(want) or got != want:
        return [f"{where}: {got!r} != {want!r}"]
    return []


def test_mismatches_sees_a_one_bit_difference() -> None:
    """Negative control for the comparison every test below relies on."""
    a = make_state(3)
    b = make_state(3)
    assert mismatches(a, b) == []
    b["model"]["layer2.weight"].view(np.uint32)[5, 7] ^= 1
    assert mismatches(a, b) == ["state['model']['layer2.weight']: array differs (float32(64, 256) vs float32(64, 256))"]
    assert mismatches(make_state(3), make_state(4)) != []
    assert mismatches(make_state(3, "torch"), make_state(3)) != []  # torch tensors are not numpy arrays


def leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith(LEFTOVER_PREFIXES)) if run.exists() else []


# --------------------------------------------------------------------------------------------
# SIGKILL of a saving process

#: (target, when) pairs of the deterministic kills: the child SIGKILLs itself right before or
#: after the N-th call of the target (see tests/e2e/kill_saver.py), N drawn per trial.
KILL_POINTS: list[tuple[str, str, int]] = [  # target, when, calls per save (N is drawn up to 3 saves' worth)
    ("tensor", "before", 6),
    ("write", "before", 8),
    ("file", "before", 2),
    ("file", "after", 2),
    ("fsync", "before", 6),
    ("fsync", "after", 6),
    ("mkdir", "before", 1),
    ("mkdir", "after", 1),
    ("rename", "before", 2),
    ("rename", "after", 2),
    ("delete", "before", 1),
    ("delete", "after", 1),
    ("unlink", "before", 3),
    ("rmdir", "before", 1),
]


@dataclass
class KillLedger:
    """What the kill trials did and found."""

    trials: int = 0
    saves_acked: int = 0
    lost: int = 0
    leftovers_removed: int = 0
    seen_after_kill: Counter[str] = field(default_factory=Counter)  # ".tmp-", ".del-", "clean"
    problems: list[str] = field(default_factory=list)

    def lose(self, what: str) -> None:
        self.lost += 1
        self.problems.append(what)


def run_saver(run: Path, lib: str, plan: tuple[str, int, str] | None, rnd: random.Random) -> tuple[list[int], str]:
    """Start a saving process, let it be killed (by us at a random moment, or by itself)."""
    args = [sys.executable, str(SAVER), str(run), lib]
    if plan is not None:
        args += [plan[0], str(plan[1]), plan[2]]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    if plan is None:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rnd.uniform(0.0, 0.35))
        proc.kill()
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == -signal.SIGKILL, f"saver {args[3:]} exited with {proc.returncode}: {err[-2000:]}"
    return [int(x) for x in out.split() if x.isdigit()], " ".join(args[3:])


def check_run(run: Path, lib: str, promised: int | None, in_flight_max: int | None, ledger: KillLedger, what: str) -> int | None:
    """Check what a new manager sees after a kill; return the newest step."""
    mgr = runstate.CheckpointManager(run, keep_last=2, read_only=True)  # a reader: never takes the lock
    steps = mgr.steps()
    if promised is not None and promised not in steps:
        ledger.lose(f"{what}: step {promised} was saved (save() returned) but is gone; steps {steps}")
    for step in steps:
        if in_flight_max is not None and step > in_flight_max:
            ledger.problems.append(f"{what}: step {step} was never saved, yet it is listed")
        report = runstate.verify(mgr.path(step))
        if not report.ok:
            ledger.lose(f"{what}: step {step} is listed but damaged: {[str(p) for p in report.problems]}")
            continue
        diff = mismatches(runstate.load(mgr.path(step)), make_state(step, lib))
        if diff:
            ledger.lose(f"{what}: step {step} does not hold what was saved: {diff[:3]}")
    if not steps:
        return None
    target: dict[str, Any] = {"model": None, "optimizer": None, "step": None, "tag": None}
    try:
        restored = mgr.restore(target, fallback=False)
    except runstate.CheckpointError as exc:
        ledger.lose(f"{what}: restoring the newest step {steps[-1]} failed: {exc}")
        return steps[-1]
    if restored != steps[-1] or mismatches(target, make_state(steps[-1], lib)):
        ledger.lose(f"{what}: restoring the newest step {steps[-1]} gave step {restored} or other values")
    return steps[-1]


def kill_trials(run: Path, lib: str, plans: list[tuple[str, int, str] | None], seed: int) -> KillLedger:
    """Kill a saving process once per plan, in the same run directory, checking after each."""
    rnd = random.Random(seed)
    ledger = KillLedger()
    newest: int | None = None
    for i, plan in enumerate(plans):
        before = leftovers(run)
        acked, what = run_saver(run, lib, plan, rnd)
        ledger.trials += 1
        ledger.saves_acked += len(acked)
        what = f"trial {i} ({what}, acked {acked[-3:]})"
        promised = acked[-1] if acked else newest
        start = (newest or 0) + 1
        in_flight = (acked[-1] if acked else start - 1) + 1
        newest = check_run(run, lib, promised, in_flight, ledger, what)
        kinds = {name[:5] for name in leftovers(run) if name not in before}
        ledger.seen_after_kill.update(kinds or {"clean"})
        if acked:  # the killed process was a writer: it must have removed what earlier kills left
            still = [name for name in before if (run / name).exists()]
            if still:
                ledger.problems.append(f"{what}: the next writer left earlier leftovers {still}")
            ledger.leftovers_removed += len(before)
        left = leftovers(run)
        if left and i % 3 == 2:  # now and then, the test itself is the next writer
            step = (newest or 0) + 1
            with runstate.CheckpointManager(run, keep_last=2) as mgr:
                assert mgr.save(step, make_state(step, lib))
            if leftovers(run):
                ledger.problems.append(f"{what}: a writer's save left {leftovers(run)} (before: {left})")
            ledger.leftovers_removed += len(left)
            newest = check_run(run, lib, step, step, ledger, f"{what}, then saved {step}")
    return ledger


def kill_plans(rnd: random.Random, n_random: int, rounds: int) -> list[tuple[str, int, str] | None]:
    plans: list[tuple[str, int, str] | None] = [None] * n_random
    for _ in range(rounds):
        plans += [(target, rnd.randint(1, 3 * per_save), when) for target, when, per_save in KILL_POINTS]
    rnd.shuffle(plans)
    return plans


def report(ledger: KillLedger, name: str) -> None:
    print(
        f"\n{name}: {ledger.trials} kill trials, {ledger.saves_acked} saves acknowledged, "
        f"{ledger.leftovers_removed} leftovers removed by a next writer, {ledger.lost} checkpoints lost; "
        f"after the kills: {dict(ledger.seen_after_kill)}"
    )
    assert ledger.lost == 0 and not ledger.problems, "\n".join(ledger.problems)


def test_sigkill_at_random_moments_and_at_every_phase(tmp_path: Path, stress: bool) -> None:
    """NumPy-only savers (fast to start): random kills plus two rounds of every kill point."""
    seed = random.randrange(2**32)
    rnd = random.Random(seed)
    scale = 10 if stress else 1
    plans = kill_plans(rnd, n_random=22 * scale, rounds=2 * scale)
    ledger = kill_trials(tmp_path / "run", "numpy", plans, seed)
    report(ledger, f"numpy savers (seed {seed})")
    assert ledger.trials >= 50 and ledger.saves_acked > ledger.trials
    # The kills landed inside saves and inside deletions, not only between them.
    assert ledger.seen_after_kill[".tmp-"] > 3 and ledger.seen_after_kill[".del-"] > 3, ledger.seen_after_kill


def test_sigkill_of_a_torch_saver(tmp_path: Path, stress: bool) -> None:
    seed = random.randrange(2**32)
    rnd = random.Random(seed)
    plans: list[tuple[str, int, str] | None] = [None, ("write", rnd.randint(1, 16), "before"), None, ("fsync", 5, "after")]
    ledger = kill_trials(tmp_path / "run", "torch", plans * (5 if stress else 1), seed)
    report(ledger, f"torch savers (seed {seed})")


def test_kill_checks_can_fail(tmp_path: Path) -> None:
    """Negative controls: the checks after a kill see a lost, a damaged and a wrong checkpoint."""
    run = tmp_path / "run"
    with runstate.CheckpointManager(run, keep_last=None) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, make_state(step))
    ledger = KillLedger()
    check_run(run, "numpy", 4, 4, ledger, "promised 4")
    assert ledger.lost == 1 and "step 4 was saved" in ledger.problems[0]
    data = run / STEP.format(3) / "model.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    ledger = KillLedger()
    check_run(run, "numpy", 2, 3, ledger, "flipped")
    assert ledger.lost == 2 and "step 3 is listed but damaged" in ledger.problems[0]  # and restore(fallback=False)
    shutil.rmtree(run / STEP.format(3))
    os.rename(run / STEP.format(2), run / STEP.format(3))  # step 3 now holds step 2's values
    ledger = KillLedger()
    check_run(run, "numpy", 3, 3, ledger, "renamed")
    assert ledger.lost == 2 and "does not hold what was saved" in ledger.problems[0]


def test_second_writer_process_and_stale_lock(tmp_path: Path) -> None:
    """A second process cannot write while the first lives; once it is killed, the lock is taken over."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore"}
    first = subprocess.Popen(
        [sys.executable, str(SAVER), str(run), "numpy"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert first.stdout is not None
    assert first.stdout.readline().strip() == "ready"
    assert first.stdout.readline().strip() == "1"  # it holds the lock now
    second = subprocess.run(
        [sys.executable, str(SAVER), str(run), "numpy"], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert second.returncode == 1
    assert "LockError" in second.stderr and f"pid {first.pid} on" in second.stderr
    with pytest.raises(runstate.LockError, match=f"pid {first.pid} on"):
        runstate.CheckpointManager(run).save(10**6, {"x": 1})
    first.kill()
    first.communicate(timeout=60)
    newest = runstate.CheckpointManager(run, read_only=True).latest_step()
    assert newest is not None
    assert f"pid {first.pid} on" in (run / ".lock").read_text()  # the dead holder's name stays...
    with runstate.CheckpointManager(run, keep_last=2) as mgr:  # ...but its lock died with it
        assert mgr.save(newest + 1, make_state(newest + 1))
        mgr.wait()  # retention runs in the background after save returns
        assert leftovers(run) == []
        assert mgr.steps()[-1] == newest + 1
    assert f"pid {os.getpid()} on" in (run / ".lock").read_text()


# --------------------------------------------------------------------------------------------
# ENOSPC and EIO


def small_state(step: int) -> dict[str, Any]:
    rng = np.random.default_rng(step)
    return {
        "model": {"w": rng.standard_normal((8, 16), dtype=np.float32), "b": np.arange(step + 3)},
        "optimizer": {"m": rng.standard_normal(50)},
        "step": step,
    }


OLD_LEFTOVER = "0123456789ab"  # the random part of the leftovers a killed writer left


def prepare_run(base: Path, scenario: str) -> tuple[Path, runstate.CheckpointManager, list[int]]:
    """The run directory and manager just before the save that meets the fault, and the steps it holds."""
    if scenario == "new run":  # the first save ever: creates the run directory (two levels) and the lock
        run = base / "runs" / "exp"
        return run, runstate.CheckpointManager(run, keep_last=2), []
    run = base / "run"
    mgr = runstate.CheckpointManager(run, keep_last=2)
    mgr.save(1, small_state(1))
    mgr.save(2, small_state(2))
    if scenario == "restart with leftovers":  # a killed writer left a temporary and half a deletion
        mgr.close()
        for name in (f".tmp-step-000000000003-{OLD_LEFTOVER}", f".del-step-000000000000-{OLD_LEFTOVER}"):
            (run / name).mkdir()
            (run / name / "model.safetensors").write_bytes(b"partial")
        mgr = runstate.CheckpointManager(run, keep_last=2)
    return run, mgr, [1, 2]


def check_committed(run: Path, steps: list[int], what: str) -> list[str]:
    problems = []
    for step in steps:
        path = run / STEP.format(step)
        report = runstate.verify(path)
        if not report.ok:
            problems.append(f"{what}: step {step} damaged: {[str(p) for p in report.problems]}")
        elif diff := mismatches(runstate.load(path), small_state(step)):
            problems.append(f"{what}: step {step} holds other values: {diff[:2]}")
    return problems


def check_fault(
    run: Path,
    mgr: runstate.CheckpointManager,
    old: list[int],
    new: int,
    err: BaseException | None,
    fired: str,
    error: int,
    at: int,
    commit_start: int,
    retention_start: int = 10**9,
) -> list[str]:
    """Everything that must hold after a save met a disk fault; returns what does not."""
    what = f"fault {errno.errorcode[error]} at call {at} {fired}"
    steps = mgr.steps()
    problems: list[str] = []
    new_leftovers = [n for n in leftovers(run) if OLD_LEFTOVER not in n]  # a killed writer's may stay
    tmp_left = [n for n in new_leftovers if n.startswith(".tmp-")]
    if tmp_left:
        problems.append(f"{what}: temporaries left behind: {tmp_left}")
    if err is None:
        # Only a call whose failure changes nothing may fail silently: before the save's own
        # work starts (the lock's informational content, removing old leftovers), or after the
        # new step is committed (retention deleting an old checkpoint: logged as a warning).
        if commit_start <= at < retention_start or (at >= retention_start and new not in steps):
            problems.append(f"{what}: the save hid the fault and reported success")
        if new not in steps:
            problems.append(f"{what}: save() returned True but step {new} is not committed")
        return problems + check_committed(run, steps, what)
    if not isinstance(err, runstate.CheckpointWriteError):
        return [*problems, f"{what}: {type(err).__name__} escaped instead of CheckpointWriteError: {err}"]
    msg = str(err)
    if err.errno != error or os.strerror(error) not in msg or str(run) not in msg:
        problems.append(f"{what}: the message does not say what happened and where: {msg}")
    if new in steps:  # committed, then retention failed: the message must say so
        if "cannot delete old checkpoint" not in msg or steps[-1] != new or old[-1] not in steps:
            problems.append(f"{what}: step {new} committed with steps {steps}, yet save raised: {msg}")
    else:
        if "nothing was committed" not in msg:
            problems.append(f"{what}: nothing was committed but the message does not say so: {msg}")
        if steps != old:
            problems.append(f"{what}: older checkpoints changed: {steps} != {old}")
    if any(n.startswith(".del-") for n in new_leftovers) and "until the next writer" not in msg:
        problems.append(f"{what}: half a deletion left without saying so: {new_leftovers} {msg}")
    return problems + check_committed(run, steps, what)


@pytest.mark.parametrize(
    ("scenario", "error", "short_write"),
    [
        ("steady", errno.ENOSPC, False),
        ("steady", errno.ENOSPC, True),
        ("steady", errno.EIO, False),
        ("new run", errno.ENOSPC, False),
        ("restart with leftovers", errno.ENOSPC, True),
        ("restart with leftovers", errno.EIO, False),
    ],
)
def test_disk_fault_at_every_call_of_a_save(tmp_path: Path, scenario: str, error: int, short_write: bool) -> None:
    """Each OS call of one save fails in turn (the N-th for N = 0, 1, ... until the save outgrows them)."""
    run, mgr, old = prepare_run(tmp_path / "clean", scenario)
    new = (old[-1] if old else 0) + 1
    with mgr, inject(None) as clean:
        assert mgr.save(new, small_state(new))
        mgr.wait()  # retention (background) runs its calls inside the recording too
    commit_start = next(
        i for i, call in enumerate(clean.calls) if f".tmp-{STEP.format(new)}-" in call and OLD_LEFTOVER not in call
    )
    committed_at = next(
        i for i, call in enumerate(clean.calls) if call.startswith("os.rename") and f".tmp-{STEP.format(new)}-" in call
    )
    retention_start = next(
        (i for i, call in enumerate(clean.calls) if i > committed_at and any(STEP.format(o) in call for o in old)),
        len(clean.calls),
    )
    problems: list[str] = []
    faults_hit = 0
    for at in range(len(clean.calls) + 1):
        base = tmp_path / f"at-{at}"
        run, mgr, old = prepare_run(base, scenario)
        with mgr:
            err: BaseException | None = None
            with inject(at, error, short_write=short_write) as faults:
                try:
                    mgr.save(new, small_state(new))
                except BaseException as exc:
                    err = exc
                mgr.wait()  # retention (background) meets its faults inside the injection too
            if faults.fired is None:  # past the last call: nothing failed
                assert at == len(clean.calls) and err is None
                break
            faults_hit += 1
            problems += check_fault(run, mgr, old, new, err, faults.fired, error, at, commit_start, retention_start)
            # The training process goes on: its next save succeeds.
            try:
                assert mgr.save(new + 1, small_state(new + 1))
            except runstate.CheckpointError as exc:
                problems.append(f"fault at call {at} {faults.fired}: the next save failed too: {exc}")
            problems += check_committed(run, [new + 1], f"after the fault at call {at}")
        if leftovers(run):
            with runstate.CheckpointManager(run, keep_last=2) as mgr:  # a new writer removes them
                mgr.save(new + 2, small_state(new + 2))
                mgr.wait()  # retention runs in the background after save returns
                if leftovers(run):
                    problems.append(f"fault at call {at}: the next writer left {leftovers(run)}")
        shutil.rmtree(base)
    print(f"\n{scenario}, {errno.errorcode[error]}{' (short write)' if short_write else ''}: "
          f"{faults_hit} faults injected, {len(problems)} problems")
    assert faults_hit == len(clean.calls) > 15
    assert not problems, "\n".join(problems)


def test_the_fault_checks_can_fail(tmp_path: Path) -> None:
    """Negative controls: a swallowed fault, a wrong exception, a leftover and a missing step are caught."""
    run, mgr, old = prepare_run(tmp_path, "steady")
    with mgr:
        mgr.save(3, small_state(3))
        (run / ".tmp-step-000000000004-ba9876543210").mkdir()
        found = check_fault(run, mgr, old, 3, None, "os.fsync(3)", errno.EIO, 20, 5)
        assert any("hid the fault" in p for p in found) and any("temporaries left" in p for p in found)
        found = check_fault(run, mgr, old, 4, OSError(errno.EIO, "x"), "os.fsync(3)", errno.EIO, 20, 5)
        assert any("OSError escaped" in p for p in found)
        wrong = runstate.CheckpointWriteError(errno.EIO, "cannot write: nothing was committed")
        found = check_fault(run, mgr, [1, 2], 4, wrong, "os.fsync(3)", errno.EIO, 20, 5)
        assert any("does not say what happened and where" in p for p in found)
        assert any("older checkpoints changed" in p for p in found)


def test_disk_full_for_real_on_a_tiny_tmpfs(tmp_path: Path) -> None:
    """A real 1 MiB filesystem, filled to several levels so that ENOSPC strikes at different points."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or mounted.returncode})")
    try:
        run = mnt / "run"
        outcomes = []
        with runstate.CheckpointManager(run, keep_last=2) as mgr:
            mgr.save(1, small_state(1))
            step = 2
            # Too big for the disk at all: fails while writing tensor data.
            huge = {"model": {"w": np.ones((300, 1024), dtype=np.float32)}, "optimizer": np.ones(10**5)}
            with pytest.raises(runstate.CheckpointWriteError) as err:
                mgr.save(step, huge)
            assert err.value.errno == errno.ENOSPC
            assert f"{run}/.tmp-{STEP.format(step)}-" in str(err.value) or f"{run}/{STEP.format(step)}" in str(err.value)
            assert "No space left on device; nothing was committed, free disk space" in str(err.value)
            assert mgr.steps() == [1] and leftovers(run) == []
            # Leave a little room, less each time, so the save fails later or earlier.
            for room in (48 * 1024, 16 * 1024, 8 * 1024, 4 * 1024, 0):
                mgr.wait()  # the last save's retention (background) frees its space before the disk is filled
                filler = mnt / "filler"
                with open(filler, "wb", buffering=0) as f, pytest.raises(OSError, match="No space left"):
                    while True:
                        f.write(b"\0" * 4096)
                os.truncate(filler, max(0, filler.stat().st_size - room))
                try:
                    mgr.save(step, small_state(step))
                    outcomes.append("saved")
                    step += 1
                except runstate.CheckpointWriteError as exc:
                    assert exc.errno == errno.ENOSPC and str(run) in str(exc), exc
                    outcomes.append("ENOSPC")
                mgr.wait()  # retention (background) may be mid-deletion: a .del- directory
                assert leftovers(run) == [], leftovers(run)
                assert not check_committed(run, mgr.steps(), f"room {room}")
                filler.unlink()
                assert mgr.save(step, small_state(step))  # space is back: training goes on
                step += 1
            assert not check_committed(run, mgr.steps(), "at the end")
        assert "ENOSPC" in outcomes, outcomes
        print(f"\nreal tmpfs: room levels gave {outcomes}")
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


# --------------------------------------------------------------------------------------------
# Corruption


def tiny_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint of well under a kilobyte: a manifest and one tensor file of two tensors."""
    state = {"model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], dtype=np.int16)}, "epoch": 3}
    runstate.save(path, state, step=7)
    return state


def load_outcome(path: Path) -> type[BaseException] | None:
    """The exception ``runstate.load`` raises, or None when it returns."""
    try:
        runstate.load(path)
    except runstate.CheckpointError as exc:
        return type(exc)
    return None


@dataclass
class Tally:
    injected: int = 0
    missed: list[str] = field(default_factory=list)

    def check(self, ckpt: Path, damaged: str, what: str, *, allowed: tuple[type[BaseException], ...] = (runstate.CorruptCheckpointError,)) -> None:
        """Damage was done to file ``damaged``: verify must name it and load must raise."""
        self.injected += 1
        report = runstate.verify(ckpt)
        files = {p.file for p in report.problems}
        raised = load_outcome(ckpt)
        if report.ok or files != {damaged}:
            self.missed.append(f"{what}: verify reported {[str(p) for p in report.problems]}")
        if raised is None or not issubclass(raised, allowed):
            self.missed.append(f"{what}: load {'returned' if raised is None else 'raised ' + raised.__name__}")


def test_every_bit_flip_of_every_byte_is_detected(tmp_path: Path) -> None:
    ckpt = tmp_path / "ck"
    tiny_checkpoint(ckpt)
    files = {p.name: p.read_bytes() for p in sorted(ckpt.iterdir())}
    # Small, so that 8 flips per byte stay quick; the manifest's "versions" grows with the
    # frameworks this worker process has imported (tensorflow, jax...), hence the margin.
    assert sorted(files) == ["manifest.json", "model.safetensors"] and sum(map(len, files.values())) < 1200
    manifest = files["manifest.json"]
    version_digit = manifest.index(b'"format_version": 1') + len(b'"format_version": ')
    corrupt = (runstate.CorruptCheckpointError,)
    tally = Tally()
    for name, raw in files.items():
        for offset in range(len(raw)):
            for bit in range(8):
                damaged = bytearray(raw)
                damaged[offset] ^= 1 << bit
                (ckpt / name).write_bytes(bytes(damaged))
                # A flipped version digit reads as a newer format: refused, but as FormatVersionError.
                newer = name == "manifest.json" and offset == version_digit
                allowed = (runstate.FormatVersionError, *corrupt) if newer else corrupt
                tally.check(ckpt, name, f"{name} byte {offset} bit {bit}", allowed=allowed)
        (ckpt / name).write_bytes(raw)
    assert runstate.verify(ckpt).ok and load_outcome(ckpt) is None  # restored: intact again
    print(f"\nbit flips: {tally.injected} injected, {len(tally.missed)} missed")
    assert tally.injected == 8 * sum(map(len, files.values()))
    assert not tally.missed, "\n".join(tally.missed[:20])


def test_header_metadata_and_padding_are_checked_byte_for_byte(tmp_path: Path) -> None:
    """Regression: no checksum covers a safetensors header, so damage to ``__metadata__`` or to
    the padding spaces, where the tensors' entries are untouched, went unnoticed."""
    ckpt = tmp_path / "ck"
    tiny_checkpoint(ckpt)
    path = ckpt / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n]
    assert header.endswith(b" ") and b'"runstate_item":"model"' in header
    for damaged in (
        header.replace(b'"format":"np"', b'"format":"pt"'),
        header.replace(b'"runstate_item":"model"', b'"runstate_item":"mode1"'),
        header[:-1] + b"\t",  # still valid JSON, same tensors
        header.replace(b'{"__metadata__"', b'{"__metadata__"', 1).replace(b"}} ", b"}}\n", 1),
    ):
        assert damaged != header and len(damaged) == n
        path.write_bytes(raw[:8] + damaged + raw[8 + n :])
        report = runstate.verify(ckpt)
        assert [p.file for p in report.problems] == ["model.safetensors"]
        assert "header bytes differ from the ones the manifest implies" in report.problems[0].reason
        with pytest.raises(runstate.CorruptCheckpointError, match="header bytes differ"):
            runstate.load(ckpt)
    path.write_bytes(raw)
    assert runstate.verify(ckpt).ok


def test_truncation_at_every_length_and_deleted_files(tmp_path: Path) -> None:
    ckpt = tmp_path / "ck"
    state = tiny_checkpoint(ckpt)
    files = {p.name: p.read_bytes() for p in sorted(ckpt.iterdir())}
    tally = Tally()
    for name, raw in files.items():
        for length in range(len(raw)):
            (ckpt / name).write_bytes(raw[:length])
            if name == "manifest.json" and length == len(raw) - 1:
                # Only the final newline gone: formatting, not content (the spec lets readers
                # ignore whitespace), so this one must still load, exactly.
                assert runstate.verify(ckpt).ok
                assert not mismatches(runstate.load(ckpt), state)
                continue
            tally.check(ckpt, name, f"{name} truncated to {length} bytes")
        (ckpt / name).unlink()
        allowed = (runstate.CheckpointNotFoundError,) if name == "manifest.json" else (runstate.CorruptCheckpointError,)
        tally.check(ckpt, name, f"{name} deleted", allowed=allowed)
        (ckpt / name).write_bytes(raw)
    assert runstate.verify(ckpt).ok
    print(f"\ntruncations and deletions: {tally.injected} injected, {len(tally.missed)} missed")
    assert not tally.missed, "\n".join(tally.missed[:20])


def rewrite_manifest(ckpt: Path, edit: Callable[[dict[str, Any]], None], *, fix_checksum: bool) -> None:
    body = json.loads((ckpt / "manifest.json").read_text())
    edit(body)
    if fix_checksum:
        body.pop("checksum")
        body["checksum"] = _canonical_checksum(body)
    (ckpt / "manifest.json").write_text(json.dumps(body) + "\n")


def _tensor(body: dict[str, Any], name: str = "w") -> dict[str, Any]:
    entry: dict[str, Any] = body["items"]["model"]["tensors"][name]
    return entry


MANIFEST_EDITS: list[tuple[str, Callable[[dict[str, Any]], None], bool, str, str | None]] = [
    # what, edit, checksum recomputed, file blamed, words in the reason
    ("step", lambda b: b.update(step=8), False, "manifest.json", "manifest checksum mismatch"),
    ("epoch", lambda b: b["items"]["epoch"]["tree"].update(v="4"), False, "manifest.json", "manifest checksum mismatch"),
    ("checksum itself", lambda b: b.update(checksum="0" * 16), False, "manifest.json", "manifest checksum mismatch"),
    ("tensor xxh3", lambda b: _tensor(b).update(xxh3="0" * 16), True, "model.safetensors", "checksum mismatch in tensor 'w'"),
    ("file size", lambda b: b["files"]["model.safetensors"].update(nbytes=10), True, "model.safetensors", "size is"),
    ("dtype", lambda b: _tensor(b).update(dtype="I32"), True, "model.safetensors", "header entry of tensor 'w' differs"),
    ("shape", lambda b: _tensor(b).update(shape=[3, 2]), True, "model.safetensors", "header entry of tensor 'w' differs"),
    ("offsets", lambda b: _tensor(b).update(data_offsets=[0, 12]), True, "manifest.json", "do not fit shape"),
    ("file name escapes", lambda b: _tensor(b).update(file="../model.safetensors"), True, "manifest.json", "not a plain"),
    ("absolute file name", lambda b: _tensor(b).update(file="/etc/passwd"), True, "manifest.json", "not a plain"),
    ("unlisted file", lambda b: b["files"].clear(), True, "manifest.json", "unlisted file"),
    ("dangling tensor ref", lambda b: b["items"]["model"]["tree"]["v"][0][1].update(name="nope"), True, "manifest.json", "missing from the index"),
    ("unknown node", lambda b: b["items"]["epoch"]["tree"].update(t="pickle"), True, "manifest.json", "unknown node type 'pickle'"),
    ("newer version", lambda b: b.update(format_version=3), False, "manifest.json", "upgrade runstate"),
]


@pytest.mark.parametrize(("what", "edit", "fix", "blamed", "reason"), MANIFEST_EDITS, ids=[e[0] for e in MANIFEST_EDITS])
def test_edited_manifest_is_reported_precisely(
    tmp_path: Path, what: str, edit: Callable[[dict[str, Any]], None], fix: bool, blamed: str, reason: str
) -> None:
    ckpt = tmp_path / "ck"
    tiny_checkpoint(ckpt)
    rewrite_manifest(ckpt, edit, fix_checksum=fix)
    report = runstate.verify(ckpt)
    assert not report.ok and {p.file for p in report.problems} == {blamed}
    assert any(reason in p.reason for p in report.problems), report.problems
    expected = runstate.FormatVersionError if what == "newer version" else runstate.CorruptCheckpointError
    with pytest.raises(expected):
        runstate.load(ckpt)


def test_manifest_rewritten_without_changing_content_still_verifies(tmp_path: Path) -> None:
    """Negative control for the edits above: re-formatting alone (spec section 5) is not damage."""
    ckpt = tmp_path / "ck"
    state = tiny_checkpoint(ckpt)
    body = json.loads((ckpt / "manifest.json").read_text())
    (ckpt / "manifest.json").write_text(json.dumps(body, indent=2, sort_keys=True))  # items and tensors reordered
    assert runstate.verify(ckpt).ok
    assert not mismatches(dict(sorted(runstate.load(ckpt).items())), dict(sorted(state.items())))


def test_extra_files_are_ignored(tmp_path: Path) -> None:
    """Spec section 3: readers ignore what the manifest does not list."""
    ckpt = tmp_path / "ck"
    state = tiny_checkpoint(ckpt)
    (ckpt / "extra.safetensors").write_bytes(b"garbage")
    (ckpt / "notes.txt").write_text("hello")
    (ckpt / "sub").mkdir()
    os.symlink("/etc/passwd", ckpt / "link.safetensors")
    assert runstate.verify(ckpt).ok and not mismatches(runstate.load(ckpt), state)


def _flip_last(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x10
    path.write_bytes(bytes(raw))


def _flip_metadata(path: Path) -> None:
    path.write_bytes(path.read_bytes().replace(b'"format":"np"', b'"format":"nq"'))


def _symlink_outside(path: Path) -> None:
    outside = path.parent.parent / "outside.safetensors"
    os.replace(path, outside)
    os.symlink(outside, path)


DAMAGE: dict[str, tuple[str, Callable[[Path], None]]] = {
    "tensor byte flipped": ("optimizer.safetensors", _flip_last),
    "header metadata flipped": ("model.safetensors", _flip_metadata),
    "manifest byte flipped": ("manifest.json", lambda p: p.write_bytes(p.read_bytes().replace(b'"step": ', b'"step":\x00'))),
    "tensor file truncated": ("model.safetensors", lambda p: os.truncate(p, p.stat().st_size // 2)),
    "tensor file deleted": ("optimizer.safetensors", lambda p: p.unlink()),
    "manifest deleted": ("manifest.json", lambda p: p.unlink()),
    "manifest edited": ("manifest.json", lambda p: p.write_text(p.read_text().replace('"step": 3', '"step": 4'))),
    "tensor file is a symlink": ("model.safetensors", _symlink_outside),
    "tensor file is a directory": ("model.safetensors", lambda p: (p.unlink(), p.mkdir())),
    "tensor file is a fifo": ("model.safetensors", lambda p: (p.unlink(), os.mkfifo(p))),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_restore_falls_back_past_damage(tmp_path: Path, damage: str) -> None:
    run = tmp_path / "run"
    with runstate.CheckpointManager(run, keep_last=None) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, small_state(step))
    fname, do = DAMAGE[damage]
    do(run / STEP.format(3) / fname)
    report = runstate.verify(run / STEP.format(3))
    assert not report.ok and {p.file for p in report.problems} == {fname}, report.problems
    target: dict[str, Any] = {"model": None, "optimizer": None, "step": "untouched"}
    with pytest.raises(runstate.CorruptCheckpointError, match="step-000000000003"):
        runstate.CheckpointManager(run, read_only=True).restore(target, fallback=False)
    assert target == {"model": None, "optimizer": None, "step": "untouched"}  # nothing changed
    assert runstate.CheckpointManager(run, read_only=True).restore(target) == 2
    assert not mismatches(target, small_state(2))
