"""``runstate run``: restart a training command until it finishes.

Preemptible and flaky machines kill training jobs. The supervisor runs the command as a
child, and when it exits non-zero or is killed by a signal it starts it again (the job
resumes from its latest checkpoint by itself), until it exits 0 or the restarts are used up;
then it exits with the child's last code. A child that exits with 75 (``EX_TEMPFAIL``,
``CheckpointManager.EXIT_PREEMPTED``: what ``sys.exit(mgr.exit_code)`` gives after a
preemption save) is restarted at once and not counted against the restarts. SIGTERM and
SIGINT sent to the supervisor are forwarded to the child, which gets the chance to save and
stop; the supervisor then exits with the child's code and does not restart it. Each child
sees ``RUNSTATE_RESTART_COUNT`` (0 for the first start, then the number of starts before it).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

__all__ = ["EXIT_PREEMPTED", "register", "supervise"]

logger = logging.getLogger("runstate")

#: A child exiting with this status saved after a preemption notice and asks to be restarted
#: (``EX_TEMPFAIL``; the same number as ``runstate.CheckpointManager.EXIT_PREEMPTED``).
EXIT_PREEMPTED = 75


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _exit_code(code: int) -> int:
    """A shell-style exit status for the supervisor itself (128 + N for signal N)."""
    return 128 - code if code < 0 else code


def supervise(
    command: Sequence[str],
    *,
    max_restarts: int = 3,
    backoff: float = 1.0,
    log: logging.Logger = logger,
) -> int:
    """Run ``command`` and restart it on failure; return the final exit status.

    Args:
        command: the program and its arguments.
        max_restarts: how many times a failed child is started again.
        backoff: seconds to wait before a restart (doubling each time, at most 60 s).

    A child that exits with :data:`EXIT_PREEMPTED` (75) was preempted after saving: it is
    restarted at once, and that restart does not count against ``max_restarts``.

    Returns:
        0 when the child finally succeeded; otherwise the child's last exit code, or
        128 + N when it was killed by signal N.
    """
    supervisor = _Supervisor(command, max_restarts, backoff, log)
    previous = {s: signal.signal(s, supervisor.forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            status = supervisor.run_once()
            if status is not None:
                return status
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class _Supervisor:
    """One :func:`supervise` call: the command, its current child, the signal that stops it, the counts."""

    def __init__(self, command: Sequence[str], max_restarts: int, backoff: float, log: logging.Logger) -> None:
        self.command = list(command)
        self.max_restarts, self.backoff, self.log = max_restarts, backoff, log
        self.stop_signal: list[int] = []
        self.child: subprocess.Popen[bytes] | None = None
        self.restarts = self.preemptions = 0

    def forward(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler: remember the signal (no more restarts) and pass it on to the child."""
        self.stop_signal.append(signum)
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def run_once(self) -> int | None:
        """Start the command and wait for it: the supervisor's exit status, or None to start it again."""
        env = {**os.environ, "RUNSTATE_RESTART_COUNT": str(self.restarts + self.preemptions)}
        try:
            proc = subprocess.Popen(self.command, env=env)
        except OSError as exc:
            self.log.error("runstate run: cannot start %s: %s", self.command[0], exc.strerror)
            return 127
        self.child = proc
        if self.stop_signal and proc.poll() is None:  # it arrived between Popen and the line above
            proc.send_signal(self.stop_signal[0])
        return self._after(proc.wait())

    def _after(self, code: int) -> int | None:
        """What follows a child's exit with ``code``: the final status, or None to restart."""
        log = self.log
        if code == 0:
            if self.restarts or self.preemptions:
                log.warning(
                    "runstate run: command succeeded after %d restart(s) and %d preemption(s)",
                    self.restarts,
                    self.preemptions,
                )
            return 0
        if code == EXIT_PREEMPTED and not self.stop_signal:
            self.preemptions += 1
            log.warning(
                "runstate run: the command was preempted after saving (exit %d); restarting it (preemption %d)",
                code,
                self.preemptions,
            )
            return None
        if self.stop_signal:
            log.warning(
                "runstate run: stopped by %s; the command %s", signal.Signals(self.stop_signal[0]).name, _describe(code)
            )
            return _exit_code(code)
        if self.restarts >= self.max_restarts:
            log.error("runstate run: the command %s; no restarts left (%d used)", _describe(code), self.restarts)
            return _exit_code(code)
        self.restarts += 1
        delay = min(self.backoff * 2 ** (self.restarts - 1), 60.0) if self.backoff > 0 else 0.0
        log.warning(
            "runstate run: the command %s; restart %d of %d in %.1f s",
            _describe(code),
            self.restarts,
            self.max_restarts,
            delay,
        )
        return None if self._sleep(delay) else _exit_code(code)

    def _sleep(self, delay: float) -> bool:
        """Wait ``delay`` seconds before a restart; False when a stop signal came meanwhile."""
        deadline = time.monotonic() + delay
        while not self.stop_signal and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return not self.stop_signal


def _run(args: argparse.Namespace) -> int:
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print(
            "runstate run: error: give the command to run after --, e.g. runstate run -- python train.py",
            file=sys.stderr,
        )
        return 2
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return supervise(command, max_restarts=args.max_restarts, backoff=args.backoff)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``run`` subcommand."""
    p = sub.add_parser(
        "run",
        help="run a training command, restarting it when it fails or is killed",
        description=(__doc__ or "").split("\n\n")[1],
        usage="runstate run [--max-restarts N] [--backoff SECONDS] -- COMMAND [ARGS...]",
    )
    p.add_argument(
        "--max-restarts", type=int, default=3, metavar="N", help="restarts allowed after failures (default 3)"
    )
    p.add_argument(
        "--backoff",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="wait before a restart, doubling each time (default 1)",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="COMMAND", help="the command to run, after --")
    p.set_defaults(func=_run)
