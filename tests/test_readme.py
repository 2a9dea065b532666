"""The README's quickstart runs as written, and a second run resumes instead of retraining."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match
    return match.group(1)


def test_readme_quickstart_trains_saves_and_resumes(tmp_path: Path) -> None:
    code = quickstart() + "\nprint('final', step, mgr.latest_step(), sorted(mgr.steps()))\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore"}
    first = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().splitlines()[-1] == "final 300 300 [200, 250, 300]"
    second = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip().splitlines()[-1] == "final 300 300 [200, 250, 300]"
