"""A job server for end-to-end tests whose jobs import a slow framework (transformers, lightning).

The server (``python tests/<x>_job.py --serve``, calling :func:`serve`) imports the framework
once; each job is a fork of it, so a job is still a new process that has trained nothing
before (a resume in it starts from the checkpoint only) and dies by a real SIGKILL, without
paying the import again. :class:`Jobs` is the test side: it sends ``[ident, [args...]]`` lines
and waits for ``[ident, exit code]`` (-9 after a SIGKILL). Jobs run concurrently.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def serve(main: Callable[[list[str]], int | None]) -> None:
    """Run ``main(args)`` in a forked child for every job line read on stdin (output to
    ``RUN_DIR/output.txt``, ``RUN_DIR`` being ``args[0]``); write ``[ident, exit code]`` on stdout
    when it ends. ``main`` returning None means exit code 0."""
    running: dict[int, Any] = {}
    stdin_open = True
    pending = b""  # read with os.read: a buffered readline would hide a second line from select
    while stdin_open or running:
        lines: list[bytes] = []
        if stdin_open and select.select([0], [], [], 0.05)[0]:
            chunk = os.read(0, 65536)
            stdin_open = bool(chunk)
            *lines, pending = (pending + chunk).split(b"\n")
        elif not stdin_open:
            time.sleep(0.05)
        for line in lines:
            if line.strip():
                ident, args = json.loads(line)
                running[_fork(main, args)] = ident
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            print(json.dumps([running.pop(pid), os.waitstatus_to_exitcode(status)]), flush=True)


def _fork(main: Callable[[list[str]], int | None], args: list[str]) -> int:
    Path(args[0]).mkdir(parents=True, exist_ok=True)
    pid = os.fork()
    if pid:
        return pid
    code = 1  # the child never returns to the server loop
    try:
        with open(Path(args[0]) / "output.txt", "a") as out:
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
        returned = main(args)
        code = 0 if returned is None else returned
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


ROOT = Path(__file__).resolve().parents[1]


def job_env() -> dict[str, str]:
    """The environment of a job server: this checkout's runstate, quiet, one OpenMP thread."""
    return {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}",
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
    }


class Jobs:
    """The test side of a job server started as ``python JOB --serve``."""

    def __init__(self, job: Path, env: Mapping[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(job), "--serve"],
            env=dict(env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.results: dict[int, int] = {}
        self.done = threading.Condition()
        self.next_id = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            ident, code = json.loads(line)
            with self.done:
                self.results[ident] = code
                self.done.notify_all()
        with self.done:
            self.results[-1] = self.proc.wait()
            self.done.notify_all()

    def run(self, run_dir: Path, *args: str, expect: int = 0, killed: bool = False) -> None:
        """Run one job and wait for it; it must end with ``expect`` (``killed``: by SIGKILL)."""
        assert self.proc.stdin is not None
        expect = -signal.SIGKILL if killed else expect
        with self.done:
            ident, self.next_id = self.next_id, self.next_id + 1
            self.proc.stdin.write(json.dumps([ident, [str(run_dir), *args]]) + "\n")
            self.proc.stdin.flush()
            assert self.done.wait_for(lambda: ident in self.results or -1 in self.results, timeout=600)
            code = self.results.get(ident, "the job server died")
        output = (run_dir / "output.txt").read_text()[-3000:] if (run_dir / "output.txt").exists() else ""
        assert code == expect, (args, code, output)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=600)
