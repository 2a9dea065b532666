"""Runs every code block of docs/tensorflow.md as printed, in one process (TensorFlow loads once).

Run by tests/test_docs_tensorflow.py as ``python tests/tf_docs_job.py DIR`` with
``KERAS_BACKEND=tensorflow``. Each scenario runs in its own directory under DIR, each "process"
of it in a fresh namespace that executes the setup block first, as a script started again
after a crash would. A crash is a ``train_step`` that raises at its 35th call (the block itself
is unchanged). Prints one JSON document: what each run printed, its final values, and what
each ``$ runstate ...`` line of the import transcript printed.
"""

from __future__ import annotations

import contextlib
import io
import json
import linecache
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
CRASH_AT = 35


class Crash(Exception):
    """The simulated kill."""


def blocks() -> dict[str, str]:
    text = (ROOT / "docs" / "tensorflow.md").read_text()
    return dict(re.findall(r"<!-- example: (\w+) -->\n```\w*\n(.*?)```", text, re.S))


def execute(name: str, ns: dict[str, Any]) -> None:
    """Run block ``name`` in ``ns``; its source is registered in linecache so that AutoGraph
    (``inspect.getsource``) can read the ``tf.function`` it defines, as from a script file."""
    filename = f"docs/tensorflow.md:{name}"
    source = blocks()[name]
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    exec(compile(source, filename, "exec"), ns)


def run(name: str, *, crash: bool = False) -> dict[str, Any]:
    """One process of a scenario: the setup block, then block ``name``; what it printed and ended with."""
    started = time.perf_counter()
    ns: dict[str, Any] = {"__name__": "__main__"}
    execute("setup", ns)
    if crash:
        step_fn, calls = ns["train_step"], [0]

        def crashing(*args: Any) -> Any:
            calls[0] += 1
            if calls[0] == CRASH_AT:
                raise Crash
            return step_fn(*args)

        ns["train_step"] = crashing
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            execute(name, ns)
            crashed = False
        except Crash:
            crashed = True
    return {
        "printed": out.getvalue(),
        "crashed": crashed,
        "step": int(ns["step"].numpy()),
        "weights": [w.numpy().tobytes().hex() for w in ns["net"].weights],
        "optimizer": [v.numpy().tobytes().hex() for v in ns["optimizer"].variables],
        "gen": ns["gen"].state.numpy().tolist(),
        "next_batch": ns["iterator"].get_next()[0].numpy().tobytes().hex(),
        "seconds": round(time.perf_counter() - started, 2),
    }


def scenario(root: Path, name: str, steps: list[tuple[str, bool]]) -> list[dict[str, Any]]:
    where = root / name
    where.mkdir()
    os.chdir(where)
    return [run(block, crash=crash) for block, crash in steps]


def transcript(root: Path) -> list[dict[str, Any]]:
    """Each ``$ runstate ...`` line of the import example, run in the TensorFlow run's directory."""
    from runstate.cli import main

    os.chdir(root / "tf")
    done = []
    for line in blocks()["import"].splitlines():
        if not line.startswith("$ runstate "):
            continue
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(shlex.split(line)[2:])
        done.append({"command": line, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
    ns: dict[str, Any] = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        execute("load_imported", ns)
    done.append({"command": "load_imported", "stdout": out.getvalue(), "tensorflow": "tensorflow" in sys.modules})
    return done


def main_job(root: Path) -> None:
    report = {
        "uninterrupted": scenario(root, "uninterrupted", [("runstate_loop", False)]),
        "runstate": scenario(
            root, "runstate", [("runstate_loop", True), ("runstate_loop", False), ("runstate_loop", False)]
        ),
        "tf": scenario(root, "tf", [("tf_loop", True), ("tf_loop", False)]),
        "migrate": scenario(root, "migrate", [("tf_loop", True), ("migrate", False), ("migrate", False)]),
    }
    report["import"] = transcript(root)
    print(json.dumps(report))


if __name__ == "__main__":
    main_job(Path(sys.argv[1]))
