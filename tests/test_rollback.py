"""Rolling back: ``restore(state, step=S)`` in a writer makes the branch that continues from S
the run; the abandoned newer steps are set aside, listed and removable, never silently lost."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import runstate
from runstate.cli import main as cli
from runstate.storage.local import LocalStore

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore"}


def cli_out(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli(list(argv))
    return code, out.getvalue()


def run_with(tmp_path: Path, steps: tuple[int, ...], keep_last: int | None = 3) -> None:
    with runstate.CheckpointManager(tmp_path, keep_last=keep_last) as mgr:
        for step in steps:
            mgr.save(step, {"step": step, "branch": "old"})


def test_rollback_makes_the_new_branch_the_run(tmp_path: Path) -> None:
    run_with(tmp_path, (100, 200, 300))
    state = {"step": None, "branch": None}
    with runstate.CheckpointManager(tmp_path, keep_last=3) as mgr:
        assert mgr.restore(state, step=100) == 100 and state == {"step": 100, "branch": "old"}
        assert mgr.steps() == [100]  # the abandoned branch is no longer the run...
        assert [s for s, _ in mgr.abandoned()] == [200, 300]  # ...but kept
        for step in (150, 200, 250):  # 200 again: no StepExistsError
            assert mgr.save(step, {"step": step, "branch": "new"})
        assert mgr.steps() == [100, 150, 200, 250]  # the step rolled back to survives the first keep_last saves
    with runstate.CheckpointManager(tmp_path, keep_last=3) as mgr:  # a restart resumes the new branch
        assert mgr.restore(state) == 250 and state == {"step": 250, "branch": "new"}
        assert mgr.save(300, {"step": 300, "branch": "new"})
        assert mgr.steps() == [200, 250, 300]  # then retention as usual
        abandoned = mgr.abandoned()
    assert [s for s, _ in abandoned] == [200, 300]
    for step, path in abandoned:  # intact, readable checkpoints of the old branch
        assert os.path.basename(path).startswith(f"step-{step:012d}.abandoned-")
        assert runstate.load(path) == {"step": step, "branch": "old"} and runstate.verify(path).ok
    assert runstate.load(tmp_path / "step-000000000200") == {"step": 200, "branch": "new"}

    code, out = cli_out("ls", str(tmp_path))
    assert code == 0
    assert out.count("abandoned: branch abandoned by a rollback") == 2 and "2 abandoned" in out
    assert "runstate gc --abandoned removes" in out
    code, listed = cli_out("ls", "--json", str(tmp_path))
    statuses = sorted((e["step"], e["status"]) for e in json.loads(listed)["checkpoints"])
    assert statuses == [(200, "abandoned"), (200, "ok"), (250, "ok"), (300, "abandoned"), (300, "ok")]
    assert cli_out("gc", str(tmp_path))[0] == 0  # plain gc keeps them
    assert len(runstate.CheckpointManager(tmp_path, read_only=True).abandoned()) == 2
    code, out = cli_out("gc", "--abandoned", str(tmp_path))
    assert code == 0 and out.count("abandoned-") == 2
    reader = runstate.CheckpointManager(tmp_path, read_only=True)
    assert reader.abandoned() == [] and reader.steps() == [200, 250, 300]


def test_rollback_with_keep_last_1_keeps_the_step_rolled_back_to_at_the_first_save(tmp_path: Path) -> None:
    run_with(tmp_path, (1, 2, 3), keep_last=None)
    with runstate.CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.restore({"step": 0, "branch": ""}, step=1)
        mgr.save(2, {"step": 2, "branch": "new"})
        assert mgr.steps() == [1, 2]
        mgr.save(3, {"step": 3, "branch": "new"})
        assert mgr.steps() == [3]
        assert [s for s, _ in mgr.abandoned()] == [2, 3]


def test_gc_abandoned_removes_only_names_of_the_exact_form(tmp_path: Path) -> None:
    run_with(tmp_path, (1,))
    foreign = tmp_path / "step-000000000002.abandoned-0123456789ab\n"  # the form, then a newline
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    assert runstate.CheckpointManager(tmp_path, read_only=True).abandoned() == []
    assert cli_out("gc", "--abandoned", str(tmp_path))[0] == 0
    assert (foreign / "keep.txt").read_text() == "user data"


def test_a_reader_never_rolls_back(tmp_path: Path) -> None:
    run_with(tmp_path, (1, 2, 3))
    reader = runstate.CheckpointManager(tmp_path, read_only=True)
    assert reader.restore({"step": 0, "branch": ""}, step=1) == 1
    assert reader.steps() == [1, 2, 3] and reader.abandoned() == []


def test_a_failed_move_is_finished_before_the_next_save_commits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash or error between the moves leaves the older part of the old branch; the next
    save moves the rest before it commits anything of the new branch."""
    run_with(tmp_path, (1, 2, 3))
    real, moves = LocalStore.set_aside, []

    def fail_second(self: LocalStore, name: str, tag: str) -> str:
        moves.append(name)
        if len(moves) == 2:
            raise runstate.CheckpointWriteError(5, "simulated I/O error")
        return real(self, name, tag)

    monkeypatch.setattr(LocalStore, "set_aside", fail_second)
    with runstate.CheckpointManager(tmp_path) as mgr:
        assert mgr.restore({"step": 0, "branch": ""}, step=1) == 1  # the state is restored anyway
        assert mgr.steps() == [1, 2] and moves == ["step-000000000003", "step-000000000002"]  # newest first
        monkeypatch.setattr(LocalStore, "set_aside", real)
        mgr.save(2, {"step": 2, "branch": "new"})
        assert mgr.steps() == [1, 2] and [s for s, _ in mgr.abandoned()] == [2, 3]
    assert runstate.load(tmp_path / "step-000000000002")["branch"] == "new"


KILLED_AFTER_ROLLBACK = textwrap.dedent(
    """
    import os, signal, sys, runstate
    mgr = runstate.CheckpointManager(sys.argv[1])
    state = {"step": 0, "branch": ""}
    mgr.restore(state, step=int(sys.argv[2]))
    print("restored", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # before any save of the new branch
    """
)


def test_killed_right_after_a_rollback_a_restart_resumes_the_step_rolled_back_to(tmp_path: Path) -> None:
    run_with(tmp_path, (100, 200, 300))
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_ROLLBACK, str(tmp_path), "100"], env=ENV, capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL and proc.stdout == "restored\n", proc.stderr
    state = {"step": None, "branch": None}
    with runstate.CheckpointManager(tmp_path) as mgr:
        assert mgr.restore(state) == 100  # not 300 of the abandoned branch
        assert [s for s, _ in mgr.abandoned()] == [200, 300]
        assert mgr.save(200, {"step": 200, "branch": "new"})


def test_rollback_on_an_object_store(tmp_path: Path) -> None:
    pytest.importorskip("fsspec")
    url = f"memory://rollback-{os.getpid()}-{tmp_path.name}"
    with runstate.CheckpointManager(url, keep_last=None) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"step": step, "branch": "old"})
        mgr.restore({"step": 0, "branch": ""}, step=1)
        assert mgr.steps() == [1] and [s for s, _ in mgr.abandoned()] == [2, 3]
        assert mgr.save(2, {"step": 2, "branch": "new"})
        assert runstate.load(mgr.abandoned()[0][1]) == {"step": 2, "branch": "old"}
        assert len(mgr.clean(abandoned=True)) == 2
        assert mgr.abandoned() == [] and mgr.steps() == [1, 2]
