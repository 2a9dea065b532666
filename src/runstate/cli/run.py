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
    stop_signal: list[int] = []
    child: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        stop_signal.append(signum)
        if child and child[0].poll() is None:
            child[0].send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        restarts = preemptions = 0
        while True:
            env = {**os.environ, "RUNSTATE_RESTART_COUNT": str(restarts + preemptions)}
            try:
                proc = subprocess.Popen(list(command), env=env)
            except OSError as exc:
                log.error("runstate run: cannot start %s: %s", command[0], exc.strerror)
                return 127
            child[:] = [proc]
            if stop_signal and proc.poll() is None:  # it arrived between Popen and the line above
                proc.send_signal(stop_signal[0])
            code = proc.wait()
            if code == 0:
                if restarts or preemptions:
                    log.warning(
                        "runstate run: command succeeded after %d restart(s) and %d preemption(s)", restarts, preemptions
                    )
                return 0
            if code == EXIT_PREEMPTED and not stop_signal:
                preemptions += 1
                log.warning(
                    "runstate run: the command was preempted after saving (exit %d); restarting it (preemption %d)",
                    code,
                    preemptions,
                )
                continue
            if stop_signal:
                log.warning(
                    "runstate run: stopped by %s; the command %s", signal.Signals(stop_signal[0]).name, _describe(code)
                )
                return _exit_code(code)
            if restarts >= max_restarts:
                log.error("runstate run: the command %s; no restarts left (%d used)", _describe(code), restarts)
                return _exit_code(code)
            restarts += 1
            delay = min(backoff * 2 ** (restarts - 1), 60.0) if backoff > 0 else 0.0
            log.warning(
                "runstate run: the command %s; restart %d of %d in %.1f s",
                _describe(code),
                restarts,
                max_restarts,
                delay,
            )
            deadline = time.monotonic() + delay
            while not stop_signal and time.monotonic() < deadline:
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            if stop_signal:
                return _exit_code(code)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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
