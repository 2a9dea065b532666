"""examples/nanogpt: a real GPT training script, SIGKILLed at random moments under `runstate run`,
ends bit-identical to an uninterrupted run; resumed the way most scripts resume, it does not."""

from __future__ import annotations

import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "nanogpt" / "train.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore"}
ITERS = 40  # checkpoints every 5 iterations, evaluations every 10
TIMEOUT = 240.0


def train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--out-dir", str(out), "--max-iters", str(ITERS), *extra]


class Lines:
    """The stdout lines of a process, read by a thread so that waiting can time out."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for_iter(self, target: int, *, skip: Collection[int] = ()) -> int | None:
        """Wait for a line ``iter N loss ... pid P`` with N >= target and P not in ``skip``;
        return P (None at the end of the output)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            line = self._queue.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                return None
            self.seen.append(line)
            words = line.split()
            if len(words) == 6 and words[:3:2] == ["iter", "loss"] and int(words[1]) >= target:
                pid = int(words[5])
                if pid not in skip:
                    return pid

    def rest(self) -> list[str]:
        while (line := self._queue.get(timeout=TIMEOUT)) is not None:
            self.seen.append(line)
        return self.seen


def run_interrupted(cmd: list[str], interruptions: list[tuple[int, signal.Signals]], rnd: random.Random) -> list[str]:
    """Run ``cmd``; at each (iteration, signal), signal the training process a random moment
    after it reports that iteration (inside the next step, or its save). Returns the output."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = Lines(proc)
    signalled: set[int] = set()
    for target, signum in interruptions:
        pid = lines.wait_for_iter(target, skip=signalled)
        assert pid is not None, f"finished before iteration {target}:\n" + "\n".join(lines.seen)
        time.sleep(rnd.uniform(0.0, 0.05))
        os.kill(pid, signum)
        signalled.add(pid)
    out = lines.rest()
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, "\n".join(out) + err[-3000:]
    return out


def final_params(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final.safetensors")


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def starts(out: list[str]) -> list[int]:
    return [int(line.split()[3]) for line in out if line.startswith("start at iter")]


@pytest.mark.e2e
def test_nanogpt_killed_at_random_moments_ends_bit_identical(tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    rnd = random.Random(seed)
    moments = sorted(rnd.sample(range(3, ITERS - 4), 2))
    signals = rnd.sample([signal.SIGKILL, signal.SIGTERM], 2)  # a crash and a preemption, in either order
    plan = list(zip(moments, signals, strict=True))

    def reference_then_naive() -> tuple[list[str], list[str]]:
        ref = run_interrupted(train_cmd(tmp_path / "ref"), [], rnd)
        # The negative control resumes from one of the reference's checkpoints (the older one
        # kept, iteration ITERS - 5) the way most scripts do: weights, optimizer, iteration number.
        older = sorted((tmp_path / "ref" / "ckpt").glob("step-*"))[0]
        shutil.copytree(older, tmp_path / "naive" / "ckpt" / older.name)
        naive = run_interrupted(train_cmd(tmp_path / "naive", "--resume-like-most-scripts"), [], rnd)
        return ref, naive

    supervisor = [sys.executable, "-m", "runstate", "run", "--backoff", "0", "--max-restarts", "5", "--"]
    with ThreadPoolExecutor(max_workers=1) as pool:
        side = pool.submit(reference_then_naive)
        out = run_interrupted(supervisor + train_cmd(tmp_path / "exact"), plan, random.Random(seed + 1))
        ref_out, naive_out = side.result()

    context = f"seed {seed}, interruptions {plan}:\n" + "\n".join(out)
    resumed_at = starts(out)  # a SIGTERM at iteration N saves at once: the next start is past N
    assert len(resumed_at) == 3 and resumed_at[0] == 0 and resumed_at[2] > 0, context
    i = 0 if plan[0][1] == signal.SIGTERM else 1
    assert resumed_at[i + 1] > plan[i][0], context
    reference = final_params(tmp_path / "ref")
    assert identical(final_params(tmp_path / "exact"), reference), context
    # Negative control: weights, optimizer and iteration number restored, but not the RNG and
    # the prefetched batch (what a script's own torch.save checkpoint holds): another run.
    assert starts(ref_out) == [0] and starts(naive_out) == [ITERS - 5], naive_out
    assert not identical(final_params(tmp_path / "naive"), reference)
