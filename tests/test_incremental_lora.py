"""examples/lora: a peft LoRA fine-tune saved incrementally writes only the adapters' state at
each save after the first, and SIGKILLed right after a save, it resumes bit-exactly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "lora" / "train.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}


def _train(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(SCRIPT), "--out-dir", str(out), "--steps", "9", "--every", "3", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)


def _losses(stdout: str) -> dict[int, str]:
    return {int(m[1]): m[2] for m in re.finditer(r"^step (\d+) loss (\S+)$", stdout, re.M)}


def _written(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"wrote ([0-9.]+) MB", stdout)]


def test_lora_example_writes_only_adapters_and_resumes_exactly_after_sigkill(tmp_path: Path) -> None:
    whole = _train(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    written = _written(whole.stdout)
    assert len(written) == 3 and written[1] < written[0] / 10 and written[2] < written[0] / 10, written
    killed = _train(tmp_path / "killed", "--kill-at", "6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = _train(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert min(_losses(resumed.stdout)) == 7  # resumed after step 6, not from scratch
    assert {**_losses(killed.stdout), **_losses(resumed.stdout)} == _losses(whole.stdout)
    import runstate

    a = runstate.load(tmp_path / "whole" / "ckpt" / "step-000000000009")
    b = runstate.load(tmp_path / "killed" / "ckpt" / "step-000000000009")
    diffs = [k for k, v in a["model"].items() if not (v == b["model"][k]).all()]
    assert a["model"] and not diffs, diffs[:5]
    diffs = [
        k
        for k, v in a["optimizer"]["state"].items()
        if any(not (x == b["optimizer"]["state"][k][n]).all() for n, x in v.items())
    ]
    assert not diffs, diffs[:5]
    full = _train(tmp_path / "full", "--full")  # negative control: without incremental, every save writes it all
    assert full.returncode == 0 and min(_written(full.stdout)) > written[0] * 0.9
