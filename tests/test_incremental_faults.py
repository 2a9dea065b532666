"""SIGKILL of an incremental run, for real, at random instants of its saves and of its retention.

A real process (``tests/e2e/kill_incremental_saver.py``) restores the newest step, then saves
step after step with ``CheckpointManager(keep_last=2, incremental=True)``, so each save
refers to blobs earlier saves wrote and retention deletes a checkpoint and collects blobs at
every save. It is killed at a random moment, or kills itself right before or after the N-th
call of one function of the write path (tensor bytes, tensor files, fsync, rename, mkdir,
deletions, unlink of a blob, the blob collection itself). After each kill:

* every committed step verifies (its referenced blobs included) and loads exactly the values
  saved at that step, and the last step the process was promised is there;
* restoring the newest step gives exactly its values;
* the next writer that deletes a checkpoint leaves exactly the referenced blobs (a blob a
  killed save or collection left behind is only disk space until then).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import runstate
from tests.e2e.kill_incremental_saver import make_state
from tests.test_fault_injection import mismatches

ROOT = Path(__file__).resolve().parents[1]
SAVER = ROOT / "tests" / "e2e" / "kill_incremental_saver.py"

KILL_POINTS: list[tuple[str, str, int]] = [  # target, when, calls per save
    ("tensor", "before", 5),
    ("write", "before", 6),
    ("file", "before", 2),
    ("file", "after", 2),
    ("fsync", "before", 6),
    ("fsync", "after", 6),
    ("rename", "before", 2),
    ("rename", "after", 2),
    ("delete", "before", 1),
    ("delete", "after", 1),
    ("unlink", "before", 4),
    ("gc", "before", 1),
    ("gc", "after", 1),
]


def _blobs(run: Path) -> set[str]:
    return set(os.listdir(run / "blobs")) if (run / "blobs").exists() else set()


def _referenced(run: Path) -> set[str]:
    found: set[str] = set()
    for entry in run.iterdir() if run.exists() else []:
        if entry.name.startswith("step-") and (entry / "manifest.json").exists():
            found |= set(json.loads((entry / "manifest.json").read_bytes()).get("blobs", {}))
    return found


def _run_saver(run: Path, lib: str, plan: tuple[str, int, str] | None, rnd: random.Random) -> list[int]:
    args = [sys.executable, str(SAVER), str(run), lib]
    if plan is not None:
        args += [plan[0], str(plan[1]), plan[2]]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    if plan is None:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rnd.uniform(0.2, 1.0))
        proc.kill()
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == -signal.SIGKILL, f"saver {args[3:]} exited with {proc.returncode}: {err[-2000:]}"
    return [int(x) for x in out.split() if x.isdigit()]


def _check(run: Path, lib: str, promised: int | None, problems: list[str], what: str) -> int | None:
    mgr = runstate.CheckpointManager(run, read_only=True)
    steps = mgr.steps()
    if promised is not None and promised not in steps:
        problems.append(f"{what}: step {promised} was saved but is gone; steps {steps}")
    for step in steps:
        report = runstate.verify(mgr.path(step))
        if not report.ok:
            problems.append(f"{what}: step {step} is listed but damaged: {[str(p) for p in report.problems]}")
            continue
        diff = mismatches(runstate.load(mgr.path(step)), make_state(step, lib))
        if diff:
            problems.append(f"{what}: step {step} does not hold what was saved: {diff[:3]}")
    if not steps:
        return None
    target: dict[str, Any] = {"model": None, "optimizer": None, "step": None, "tag": None, "frozen": None}
    if lib == "torch":
        target["frozen_module"] = None
    restored = mgr.restore(target, fallback=False)
    if restored != steps[-1] or mismatches(target, make_state(steps[-1], lib)):
        problems.append(f"{what}: restoring the newest step {steps[-1]} gave step {restored} or other values")
    return steps[-1]


def _trials(
    run: Path, lib: str, plans: list[tuple[str, int, str] | None], seed: int, *, codec: str = ""
) -> Counter[str]:
    rnd = random.Random(seed)
    problems: list[str] = []
    seen: Counter[str] = Counter()
    newest: int | None = None
    for i, plan in enumerate(plans):
        acked = _run_saver(run, f"{lib}+{codec}" if codec else lib, plan, rnd)
        what = f"trial {i} ({plan or 'random'}, acked {acked[-3:]}, seed {seed})"
        seen["saves"] += len(acked)
        seen["unreferenced blobs after a kill"] += len(_blobs(run) - _referenced(run))
        newest = _check(run, lib, acked[-1] if acked else newest, problems, what)
        if i % 3 == 2:  # now and then the test is the next writer: its deletion collects every leftover blob
            step = (newest or 0) + 1
            with runstate.CheckpointManager(run, keep_last=2, incremental=True) as mgr:
                target = {"model": None, "optimizer": None, "step": None, "tag": None, "frozen": None}
                mgr.restore({**target, **({"frozen_module": None} if lib == "torch" else {})})
                assert mgr.save(step, make_state(step, lib))
            if len(runstate.CheckpointManager(run, read_only=True).steps()) >= 2 and _blobs(run) != _referenced(run):
                problems.append(f"{what}: after a writer's save, blobs {sorted(_blobs(run) ^ _referenced(run))} differ")
            newest = _check(run, lib, step, problems, f"{what}, then saved {step}")
    assert not problems, "\n".join(problems)
    return seen


def _plans(rnd: random.Random, n_random: int, rounds: int) -> list[tuple[str, int, str] | None]:
    plans: list[tuple[str, int, str] | None] = [None] * n_random
    for _ in range(rounds):
        plans += [(target, rnd.randint(1, 3 * per_save), when) for target, when, per_save in KILL_POINTS]
    rnd.shuffle(plans)
    return plans


def test_sigkill_of_an_incremental_run_loses_nothing(tmp_path: Path, stress: bool) -> None:
    seed = random.randrange(2**32)
    scale = 10 if stress else 1
    seen = _trials(tmp_path / "run", "numpy", _plans(random.Random(seed), 8 * scale, scale), seed)
    print(f"\nincremental numpy savers (seed {seed}): {dict(seen)}")
    assert seen["saves"] > 10


def test_sigkill_of_an_incremental_torch_run(tmp_path: Path, stress: bool) -> None:
    seed = random.randrange(2**32)
    rnd = random.Random(seed)
    plans: list[tuple[str, int, str] | None] = [
        None,
        ("gc", rnd.randint(1, 3), "after"),
        ("write", rnd.randint(1, 12), "before"),
    ]
    seen = _trials(tmp_path / "run", "torch", plans * (5 if stress else 1), seed)
    print(f"\nincremental torch savers (seed {seed}): {dict(seen)}")


def test_sigkill_of_an_incremental_compressed_run(tmp_path: Path, stress: bool) -> None:
    """The same with ``compression="zstd"``: compressed blobs, compared by their decoded bytes;
    every third trial the test's own (uncompressed) writer refers to them."""
    pytest.importorskip("zstandard")
    seed = random.randrange(2**32)
    rnd = random.Random(seed)
    plans: list[tuple[str, int, str] | None] = [
        None,
        ("gc", rnd.randint(1, 3), "after"),
        ("fsync", rnd.randint(1, 18), "before"),
        ("rename", rnd.randint(1, 6), "after"),
        None,
        ("delete", rnd.randint(1, 3), "after"),
    ]
    seen = _trials(tmp_path / "run", "numpy", plans * (5 if stress else 1), seed, codec="zstd")
    print(f"\nincremental zstd savers (seed {seed}): {dict(seen)}")
    assert seen["saves"] > 3


def test_the_kill_checks_can_fail(tmp_path: Path) -> None:
    """Negative controls: a removed referenced blob, and a step holding another step's values."""
    run = tmp_path / "run"
    with runstate.CheckpointManager(run, keep_last=None, incremental=True) as mgr:
        for step in (1, 2):
            mgr.save(step, make_state(step))
    problems: list[str] = []
    _check(run, "numpy", 3, problems, "promised 3")
    assert problems == ["promised 3: step 3 was saved but is gone; steps [1, 2]"]
    frozen = next(b for b in _blobs(run) if "frozen" in b)
    os.unlink(run / "blobs" / frozen)
    problems = []
    with pytest.raises(runstate.CorruptCheckpointError):
        _check(run, "numpy", 2, problems, "blob gone")
    assert len(problems) == 2 and all("listed but damaged" in p for p in problems)
