"""What makes async saving cheap for training, checked for correctness (not timing): buffers
allocated once by ``warmup`` and reused, never huge-page advised."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import runstate

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps and THP are Linux's")


def state(value: float = 1.0) -> dict[str, Any]:
    return {"w": {f"t{i}": torch.full((256, 1024), value) for i in range(4)}, "small": torch.arange(10), "step": 3}


STATE_BYTES = 4 * 256 * 1024 * 4 + 10 * 8


def test_warmup_allocates_once_and_saves_reuse_the_buffers(tmp_path: Path) -> None:
    s = state()
    with runstate.CheckpointManager(tmp_path, async_save=True, keep_last=2) as mgr:
        pool = mgr._saver.pool  # type: ignore[attr-defined]
        assert mgr.warmup(s) == STATE_BYTES
        assert mgr.warmup(s) == 0  # idempotent
        buffers = dict(pool._buffers)
        for step in range(1, 4):
            for t in s["w"].values():
                t.fill_(float(step))
            mgr.save(step, s)
            mgr.wait()
        assert pool.allocated_bytes == STATE_BYTES  # no save allocated anything
        assert all(pool._buffers[k] is b for k, b in buffers.items())
    got = runstate.load(tmp_path / "step-000000000003")
    assert all(torch.equal(t, torch.full((256, 1024), 3.0)) for t in got["w"].values())


def test_without_warmup_the_first_save_allocates(tmp_path: Path) -> None:
    """Negative control of the test above: the pool counts what a save allocates."""
    with runstate.CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(1, state())
        mgr.wait()
        assert mgr._saver.pool.allocated_bytes == STATE_BYTES  # type: ignore[attr-defined]


def test_warmup_after_a_change_of_size_reallocates_only_that_tensor(tmp_path: Path) -> None:
    s = state()
    with runstate.CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.warmup(s)
        s["w"]["t0"] = torch.zeros(10, 10)
        del s["w"]["t1"]
        assert mgr.warmup(s) == 10 * 10 * 4
        assert mgr._saver.pool.nbytes == STATE_BYTES - 2 * 256 * 1024 * 4 + 400  # type: ignore[attr-defined]


def test_warmed_up_snapshot_still_isolates_the_save_from_training(tmp_path: Path) -> None:
    model = torch.nn.Linear(512, 512)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with runstate.CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.warmup({"model": model})
        mgr.save(1, {"model": model})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        mgr.wait()
    saved = runstate.load(tmp_path / "step-000000000001")["model"]
    assert all(torch.equal(saved[k], before[k]) for k in before)


def test_warmup_is_a_no_op_without_async_save_and_refused_read_only(tmp_path: Path) -> None:
    with runstate.CheckpointManager(tmp_path) as mgr:
        assert mgr.warmup(state()) == 0
    with (
        runstate.CheckpointManager(tmp_path, read_only=True) as reader,
        pytest.raises(runstate.CheckpointError, match="read-only"),
    ):
        reader.warmup(state())


def test_warmup_refuses_what_save_refuses(tmp_path: Path) -> None:
    with runstate.CheckpointManager(tmp_path, async_save=True) as mgr:
        with pytest.raises(runstate.UnsupportedTypeError):
            mgr.warmup({"x": object()})
        assert mgr._saver.pool.nbytes == 0  # type: ignore[attr-defined]


EXIT_WITHOUT_CLOSE = """
    import errno, sys, numpy as np, runstate, runstate._impl.parts as m
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    mgr = runstate.CheckpointManager(sys.argv[1], async_save=True)
    mgr.warmup({"w": np.ones(1 << 18)})
    mgr.save(1, {"w": np.ones(1 << 18)})
    mgr.wait()
    if sys.argv[2] == "fail":
        m.write_part = full_disk
    mgr.save(2, {"w": np.ones(1 << 18)})
    print("end of script", flush=True)
"""


@pytest.mark.parametrize("outcome", ["ok", "fail"])
def test_a_save_left_in_flight_at_exit_after_warmup_is_committed_or_reported(tmp_path: Path, outcome: str) -> None:
    """The exit hook's semantics hold with pre-allocated buffers (a real process)."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(EXIT_WITHOUT_CLOSE), str(tmp_path), outcome],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.stdout == "end of script\n", proc.stderr
    steps = runstate.CheckpointManager(tmp_path, read_only=True).steps()
    if outcome == "ok":
        assert (proc.returncode, steps) == (0, [1, 2]), proc.stderr
    else:
        assert (proc.returncode, steps) == (1, [1]), proc.stderr
        assert "background save of step 2 failed" in proc.stderr and "No space left on device" in proc.stderr


def _thp_eligible(address: int) -> bool | None:
    """Whether the mapping holding ``address`` may get transparent huge pages (Linux smaps)."""
    current = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            current = start <= address < end
        elif current and line.startswith("THPeligible:"):
            return line.split()[1] == "1"
    return None


@linux
@pytest.mark.skipif(
    "[madvise]"
    not in (
        Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        if os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled")
        else ""
    ),
    reason="only THP enabled=madvise tells an advised mapping from another",
)
def test_snapshot_buffers_are_not_huge_page_advised(tmp_path: Path) -> None:
    """NumPy advises MADV_HUGEPAGE on large arrays; with defrag=madvise a first snapshot into
    them compacted memory synchronously (first async save 2-5x a clone). The pool's buffers
    are plain mappings."""
    advised = np.ones(1 << 23, dtype=np.uint8)  # negative control: what the np.empty-based buffers were
    if _thp_eligible(advised.ctypes.data + advised.nbytes // 2) is not True:
        pytest.skip("this NumPy does not advise huge pages")
    with runstate.CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.warmup({"w": torch.ones(1 << 21)})  # 8 MiB
        (buf,) = mgr._saver.pool._buffers.values()  # type: ignore[attr-defined]
        assert _thp_eligible(buf.ctypes.data + buf.nbytes // 2) is False


@linux
def test_a_forked_child_does_not_share_the_snapshot_buffers(tmp_path: Path) -> None:
    """DataLoader workers fork after warmup: the pool's pages are wiped in the child (zeros),
    not shared copy-on-write (the parent's next snapshot would copy every page it touches)."""
    with runstate.CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.warmup({"w": torch.ones(1 << 20)})  # 4 MiB of ones in the pool after a save
        mgr.save(1, {"w": torch.ones(1 << 20)})
        mgr.wait()
        (buf,) = mgr._saver.pool._buffers.values()  # type: ignore[attr-defined]
        assert buf[:8].tolist() == [0, 0, 128, 63] * 2  # float32 1.0 in the parent
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report what it sees, leave at once
            os.write(write, bytes(buf[:8]))
            os._exit(0)
        os.close(write)
        seen = os.read(read, 8)
        os.close(read)
        os.waitpid(pid, 0)
    assert seen == bytes(8)
