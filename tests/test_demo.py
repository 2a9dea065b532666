"""`runstate demo` runs end to end through the installed entry point and checks itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_demo_runs_and_proves_exact_resume(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "runstate", "demo", "--steps", "240", "--seed", "3", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line[:3]: line for line in proc.stdout.splitlines() if line.startswith("(")}
    assert rows["(a)"].rstrip().endswith("yes")
    assert "SIGKILL@" in rows["(b)"] and "SIGTERM@" in rows["(b)"] and rows["(b)"].rstrip().endswith("yes")
    assert rows["(c)"].rstrip().endswith("no") and rows["(d)"].rstrip().endswith("no")
    assert "OK: (b) is bit-identical to (a)" in proc.stdout
    png = tmp_path / "demo" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_demo_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "runstate", "demo", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert proc.returncode == 0 and "--steps" in proc.stdout and "bit-identical" in proc.stdout


def test_demo_refuses_too_few_steps_in_one_line(tmp_path: Path) -> None:
    # With fewer steps the SIGKILL could land before the first checkpoint and (c)/(d) would
    # restart from scratch and match (a): the demo would report its own check as failed.
    proc = subprocess.run(
        [sys.executable, "-m", "runstate", "demo", "--steps", "60", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "--steps must be at least 100" in proc.stderr
    assert not (tmp_path / "demo").exists()
