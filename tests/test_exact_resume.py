"""Exact resume, proven in real processes.

For each configuration a reference run trains uninterrupted. Another run SIGKILLs itself
at a step (mid-epoch, exactly at an epoch end, or random), and the same command resumes it
in a new process from the latest checkpoint. Every loss after the resume point and the final
parameters and optimizer state must be bit-identical to the reference. Negative controls
resume with parts of the state left out and must *not* be identical, which shows the
comparison can tell the difference.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.train_job import CONFIGS, SAVE_EVERY, STEPS_PER_EPOCH, TOTAL_STEPS

JOB = Path(__file__).parent / "e2e" / "train_job.py"
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e


def run_job(config: str, run_dir: Path, out_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(JOB), config, str(run_dir), str(out_dir), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


def losses(out_dir: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    for line in (out_dir / "losses.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]  # a later (resumed) record for the same step wins
    return out


def finals(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(out_dir / "final.safetensors")


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, Path] = {}

    def get(config: str) -> Path:
        if config not in cache:
            base = tmp_path_factory.mktemp(f"ref-{config}")
            proc = run_job(config, base / "run", base / "out")
            assert proc.returncode == 0, proc.stderr
            cache[config] = base / "out"
        return cache[config]

    return get


def interrupted_run(tmp_path: Path, config: str, kill_at: int, resume: str = "full") -> tuple[Path, int]:
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    killed = run_job(config, run_dir, out_dir, "--kill-at", str(kill_at))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out_dir / "final.safetensors").exists()
    committed = sorted(int(p.name.split("-")[1]) for p in run_dir.glob("step-*"))
    resume_step = max(committed) if committed else 0
    assert resume_step == kill_at - kill_at % SAVE_EVERY
    resumed = run_job(config, run_dir, out_dir, "--resume", resume)
    assert resumed.returncode == 0, resumed.stderr
    return out_dir, resume_step


def assert_exact(ref: Path, out: Path, resume_step: int) -> None:
    ref_losses, got = losses(ref), losses(out)
    assert sorted(got) == list(range(1, TOTAL_STEPS + 1))
    after = [s for s in range(resume_step + 1, TOTAL_STEPS + 1)]
    diverged = [s for s in after if got[s] != ref_losses[s]]
    assert not diverged, f"losses differ after resuming at {resume_step}: first at step {diverged[0]}"
    a, b = finals(ref), finals(out)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"final tensors differ: {different[:5]}"


KILL_POINTS = {
    "mid_epoch": 19,  # last checkpoint 16: 4 batches into epoch 2
    "epoch_end": 24,  # checkpoint 24 is exactly the end of epoch 2
    "after_epoch_end": 27,  # resumes from 24 and redoes 25..27 in the next epoch
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("where", sorted(KILL_POINTS))
def test_resume_is_bit_identical(tmp_path: Path, reference, config: str, where: str) -> None:
    kill_at = KILL_POINTS[where]
    out, resume_step = interrupted_run(tmp_path, config, kill_at)
    assert_exact(reference(config), out, resume_step)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_resume_at_random_step_is_bit_identical(tmp_path: Path, reference, config: str) -> None:
    kill_at = random.Random().randint(SAVE_EVERY, TOTAL_STEPS - 1)
    out, resume_step = interrupted_run(tmp_path, config, kill_at)
    try:
        assert_exact(reference(config), out, resume_step)
    except AssertionError as exc:
        raise AssertionError(f"killed at step {kill_at}: {exc}") from exc


def test_kill_points_cover_epoch_boundaries() -> None:
    assert KILL_POINTS["mid_epoch"] % SAVE_EVERY != 0
    assert (KILL_POINTS["mid_epoch"] - KILL_POINTS["mid_epoch"] % SAVE_EVERY) % STEPS_PER_EPOCH != 0
    assert KILL_POINTS["epoch_end"] % STEPS_PER_EPOCH == 0
    assert TOTAL_STEPS > 3 * STEPS_PER_EPOCH


# Negative controls: leaving part of the state out must change the result, on the same
# configurations and kill points, so the exactness checks above can fail.
@pytest.mark.parametrize(
    ("resume", "config"),
    [
        ("weights_only", "adamw_onecycle"),
        ("weights_only", "sgd_nesterov_warm_restarts"),
        ("no_rng", "adamw_onecycle"),
        ("no_loader", "sgd_nesterov_warm_restarts"),
    ],
)
def test_partial_resume_is_not_identical(tmp_path: Path, reference, resume: str, config: str) -> None:
    out, resume_step = interrupted_run(tmp_path, config, KILL_POINTS["mid_epoch"], resume=resume)
    ref = reference(config)
    assert not identical(finals(ref), finals(out)), f"resuming with {resume} unexpectedly matched"
    ref_losses, got = losses(ref), losses(out)
    assert any(got[s] != ref_losses[s] for s in range(resume_step + 1, TOTAL_STEPS + 1))


@pytest.mark.parametrize("config", ["plain_loader_workers0", "plain_loader_workers2"])
def test_torchdata_shuffled_loader_as_written_resumes_exactly(tmp_path: Path, reference, config: str) -> None:
    """torchdata's own shuffled StatefulDataLoader, as users write it, resumes exactly too
    (runstate.adapters.torch_data; tests/test_loader_matrix.py covers every configuration and
    its negative controls)."""
    out, resume_step = interrupted_run(tmp_path, config, KILL_POINTS["mid_epoch"])
    assert_exact(reference(config), out, resume_step)
