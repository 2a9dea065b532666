"""The Keras tests on the TensorFlow backend.

A process has one Keras backend, chosen when keras is first imported, and pytest runs
``tests/test_keras.py`` on torch. This runs the same file, conformance suite included, in a
pytest subprocess with ``KERAS_BACKEND=tensorflow`` (tensorflow-cpu), where the tests of
``fit`` over a ``tf.data`` pipeline (iterator state, SIGKILL and resume) run too; the test that
starts its own JAX-backend process runs only from the torch run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("tensorflow", reason="tensorflow-cpu is installed by make test")


@pytest.mark.e2e
def test_keras_suite_on_the_tensorflow_backend(tmp_path: Path) -> None:
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    args = ["-q", "-p", "no:cacheprovider", "-p", "no:xdist", "--basetemp", str(tmp_path / "inner")]
    args += ["-W", "ignore::DeprecationWarning", "-k", "not jax_backend"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *args, "tests/test_keras.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary
