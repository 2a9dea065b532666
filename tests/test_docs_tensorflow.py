"""The code blocks of docs/tensorflow.md run as printed, and do what the page says.

All of them run in one subprocess (tests/tf_docs_job.py, ``KERAS_BACKEND=tensorflow``: a
pytest worker already holds Keras on the torch backend, and TensorFlow costs seconds to
import). Both loops are killed at step 35 (a ``train_step`` that raises; the blocks are
unchanged) and started again: the runstate loop must end bit-identical to an uninterrupted
run, and the page's statement that the TensorFlow loop does not is checked too. The
``runstate import`` transcript must be what the commands print.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "tensorflow.md"
SIZE = re.compile(r"\d+(\.\d)? (B|KiB|MiB)")

pytest.importorskip("tensorflow", reason="tensorflow-cpu is installed by make test")


def blocks() -> dict[str, str]:
    return dict(re.findall(r"<!-- example: (\w+) -->\n```\w*\n(.*?)```", DOC.read_text(), re.S))


def test_every_code_block_is_run() -> None:
    text = DOC.read_text()
    assert text.count("```") == 2 * len(blocks())  # no block the job would not pick up
    assert set(blocks()) == {"setup", "tf_loop", "runstate_loop", "migrate", "import", "load_imported"}


def run_job(root: Path) -> dict[str, Any]:
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "tf_docs_job.py"), str(root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "AutoGraph could not transform" not in proc.stderr  # the blocks run as from a script file
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


FINAL = ("weights", "optimizer", "gen", "next_batch")


def same(a: dict[str, Any], b: dict[str, Any]) -> dict[str, bool]:
    return {k: a[k] == b[k] for k in FINAL}


@pytest.mark.e2e
def test_docs_tensorflow_blocks_run_as_printed(tmp_path: Path) -> None:
    report = run_job(tmp_path)  # one process for every block: TensorFlow loads once
    check_loops(report)
    check_import_transcript(report)


def check_loops(report: dict[str, Any]) -> None:
    (clean,) = report["uninterrupted"]
    assert (clean["printed"], clean["crashed"], clean["step"]) == ("starting from scratch\n", False, 60)
    everything = dict.fromkeys(FINAL, True)

    # runstate: killed at step 35, restored from step 30, bit-identical; a third start has nothing to do.
    killed, resumed, again = report["runstate"]
    assert (killed["printed"], killed["crashed"], killed["step"]) == ("starting from scratch\n", True, 34)
    assert same(killed, clean) != everything  # negative control: the comparison can fail
    assert (resumed["printed"], resumed["step"]) == ("restored step 30\n", 60)
    assert same(resumed, clean) == everything
    assert (again["printed"], again["step"]) == ("restored step 60\n", 60) and same(again, clean) == everything

    # TensorFlow: restores ckpt-3 with the data position and generator, but not the Dropout seed
    # state (as the page says), so its weights differ.
    tf_killed, tf_resumed = report["tf"]
    assert (tf_killed["crashed"], tf_resumed["printed"]) == (True, "restored from tf_ckpts/ckpt-3\n")
    assert tf_resumed["step"] == 60
    assert same(tf_resumed, clean) == {"weights": False, "optimizer": False, "gen": True, "next_batch": True}

    # Migration: continues from TensorFlow's last checkpoint exactly as the TensorFlow loop does,
    # then restores from runstate's own checkpoints.
    _, migrated, migrated_again = report["migrate"]
    assert (migrated["printed"], migrated["crashed"], migrated["step"]) == ("", False, 60)
    assert same(migrated, tf_resumed) == everything and same(migrated_again, migrated) == everything


def check_import_transcript(report: dict[str, Any]) -> None:
    printed = blocks()["import"].splitlines()
    commands = [c for c in report["import"] if c["command"].startswith("$ ")]
    assert [c["command"] for c in commands] == [line for line in printed if line.startswith("$ ")]
    real: list[str] = []
    for call in commands:
        assert (call["code"], call["stderr"]) == (0, ""), call
        real += [call["command"], *call["stdout"].splitlines()]
    assert [SIZE.sub("SIZE", line) for line in real] == [SIZE.sub("SIZE", line) for line in printed]
    (loaded,) = [c for c in report["import"] if c["command"] == "load_imported"]
    expected = re.search(r"\n# (.*)\n$", blocks()["load_imported"])
    assert expected is not None and loaded["stdout"] == expected.group(1) + "\n"
