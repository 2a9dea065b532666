"""Helpers shared by the benchmark scripts: the state they save, the reference I/O, timing.

Not a test and not part of the library: the scripts in this folder print figures, and
``run_all.py`` (``make bench``) runs them one after the other in fresh processes.

Conventions every script follows:

* every save is durable: the file(s) and the directory holding them are fsynced, so all rows
  pay for the same writeback (``os.sync()`` before each timed operation, so no earlier
  writeback overlaps it);
* operations are timed round-robin (one run of each, then the next repetition), so a slow
  drift of the disk or of the machine's background load hits every row alike, and the
  figure shown is the median;
* ``vs raw`` is the speed of an operation as a fraction of the raw I/O of the same bytes in
  the same run: raw time / time (1.00 = as fast as the raw write or read; 0.50 = twice as slow).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

try:
    import runstate
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
    import runstate

from runstate.storage.local import fsync_dir  # after the sys.path fallback above

__all__ = ["fsync_dir", "runstate"]  # re-exported so the scripts import the same runstate (installed or from src/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024**3
MIB = 1024**2
N_LAYERS = 8


# --------------------------------------------------------------------------- system helpers


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_caches() -> str | None:
    """Empty the page cache; return None on success or why it failed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return None


def status_kib(key: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``), None when unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return status_kib("VmHWM") is not None


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if not name or platform.system() != "Linux":
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def malloc_trim() -> None:
    """Give glibc's free heap memory back to the OS, so reusing it shows up in RSS again."""
    libc = _libc()
    with contextlib.suppress(AttributeError):
        if libc is not None:
            libc.malloc_trim(0)


def pin_malloc_mmap_threshold() -> None:
    """Make glibc map (and on free, unmap) every buffer of 1 MiB or more.

    By default glibc raises its mmap threshold after big frees and then serves a later
    operation's buffers from heap memory that is already resident, hiding them from VmHWM.
    Used only for the final, untimed peak-RSS pass: fresh pages on every allocation make
    timings much noisier (page faults, and on VMs the hypervisor re-backing freed memory).
    """
    libc = _libc()
    with contextlib.suppress(AttributeError):
        if libc is not None:
            m_mmap_threshold = -3
            libc.mallopt(m_mmap_threshold, MIB)


def filesystem_of(path: str) -> str:
    """``device (type, mounted on ...)`` of the mount holding ``path`` (best effort, Linux)."""
    path = os.path.realpath(path)
    best = ("", "?", "?")
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, dev, fstype)
    return f"{best[1]} ({best[2]}, mounted on {best[0]})"


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def load_average() -> str:
    with contextlib.suppress(OSError):
        one, five, fifteen = os.getloadavg()
        return f"{one:.2f} {five:.2f} {fifteen:.2f}"
    return "?"


def source_revision() -> str:
    """The git commit of the checkout measured, and whether src/ has uncommitted changes."""
    try:
        rev = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", ROOT, "status", "--porcelain", "--", "src"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"{rev}{' + uncommitted changes in src/' if dirty else ''}"


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
                break
    import safetensors

    return {
        "cpu": f"{cpu_model()}, {os.cpu_count()} CPUs",
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": (
            f"runstate {runstate.__version__}, torch {torch.__version__}, safetensors {safetensors.__version__}, "
            f"numpy {np.__version__}"
        ),
        "source": source_revision(),
        "load average": load_average(),
    }


def print_machine(scratch: str) -> None:
    m = machine()
    print(f"machine: {m['cpu']}; {m['memory']} RAM; {m['kernel']}; python {m['python']}; {m['versions']}")
    print(f"runstate source: {m['source']}")
    print(f"scratch: {scratch} on {filesystem_of(scratch)}; load average at start {m['load average']}")


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def scratch_dir(base: str | None, need_bytes: int, prefix: str) -> Iterator[str]:
    """A fresh directory under ``base`` (default ``ROOT/.bench-tmp``), removed afterwards.

    Raises:
        SystemExit: the disk has less than ``need_bytes`` free.
    """
    base = os.path.abspath(base or os.path.join(ROOT, ".bench-tmp"))
    created_base = not os.path.exists(base)
    os.makedirs(base, exist_ok=True)
    free = shutil.disk_usage(base).free
    if free < need_bytes:
        if created_base:
            os.rmdir(base)
        raise SystemExit(f"error: {base} has {free / GIB:.1f} GiB free, the benchmark needs ~{need_bytes / GIB:.1f}")
    work = tempfile.mkdtemp(prefix=prefix, dir=base)
    if threading_main():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)  # run the cleanup below when killed politely
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created_base:
            with contextlib.suppress(OSError):
                os.rmdir(base)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


# --------------------------------------------------------------------------- the state


def linear_width(gib: float) -> int:
    """Width of ``N_LAYERS`` square Linear layers whose params + AdamW moments total ~``gib``."""
    return max(64, round(math.sqrt(gib * GIB / (3 * 4 * N_LAYERS)) / 64) * 64)


def build_state(gib: float, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, int]:
    """A stack of Linear layers + AdamW after one step, whose 3 fp32 copies total ~``gib``."""
    width = linear_width(gib)
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(N_LAYERS)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(4, width)
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt, width


def fresh_copy(width: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model and optimizer of the same structure to restore into, with state of their own."""
    return build_state_of_width(width, seed=1)


def build_state_of_width(width: int, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(N_LAYERS)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, width)).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def flat_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach() for k, v in model.state_dict().items()}
    for pid, buffers in opt.state_dict()["state"].items():
        for key, value in buffers.items():
            if isinstance(value, torch.Tensor):
                out[f"optimizer.state.{pid}.{key}"] = value.detach()
    return out


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], v) for k, v in b.items())


def byte_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


# --------------------------------------------------------------------------- reference I/O


def raw_write(path: str, tensors: list[torch.Tensor]) -> None:
    """Every tensor's bytes into one new file with ``os.write``, then fsync file and directory."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for t in tensors:
            view = byte_view(t)
            while view.nbytes:
                n = os.write(fd, view)
                view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(path))


def raw_read(path: str, sizes: list[int]) -> list[np.ndarray]:
    """The raw file read back into fresh buffers, one per tensor."""
    out = []
    with open(path, "rb", buffering=0) as f:
        for size in sizes:
            buf = np.empty(size, dtype=np.uint8)
            view = memoryview(buf)
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    raise RuntimeError(f"{path}: truncated")
                got += n
            out.append(buf)
    return out


def raw_read_into(path: str, live: list[torch.Tensor]) -> None:
    """The lower bound of an in-place restore: read the bytes straight into the live tensors."""
    with open(path, "rb", buffering=0) as f:
        for t in live:
            view = byte_view(t)
            while view.nbytes:
                n = f.readinto(view)
                if not n:
                    raise RuntimeError(f"{path}: truncated")
                view = view[n:]


# --------------------------------------------------------------------------- measuring


@dataclass
class Op:
    """One timed operation. Before each run of a save, ``clear`` is called, or ``path`` removed."""

    name: str
    run: Callable[[], Any]
    path: str = ""
    seconds: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    note: str = ""
    clear: Callable[[], Any] | None = None

    def reset(self) -> None:
        """Remove what the previous run of this save left (untimed)."""
        if self.clear is not None:
            self.clear()
        elif self.path:
            remove(self.path)

    def median(self) -> float:
        return statistics.median(self.seconds)


def measure(op: Op, *, cold: bool) -> None:
    gc.collect()
    os.sync()  # no writeback of an earlier operation overlaps this one
    if cold:
        drop_caches()
    t0 = time.perf_counter()
    result = op.run()
    dt = time.perf_counter() - t0
    del result
    op.seconds.append(dt)


def measure_peak_rss(ops: list[Op]) -> None:
    """Run each operation once more, untimed, and record how far resident memory rose."""
    for op in ops:
        op.reset()
        gc.collect()
        malloc_trim()
        if not reset_peak_rss():
            return
        rss0 = status_kib("VmRSS") or 0
        result = op.run()
        op.peaks.append(max(0, (status_kib("VmHWM") or 0) - rss0) * 1024)
        del result


def run_saves(ops: list[Op], reps: int) -> None:
    """Round-robin, so a slow drift of the disk hits every row alike, starting one op later each rep.

    Every op's previous output is removed before the round (and the deletions synced): on a
    filesystem mounted with ``discard`` a deletion right before a write slows that write.
    """
    for rep in range(reps):
        for op in ops:
            op.reset()
        os.sync()
        k = rep % len(ops)
        for op in ops[k:] + ops[:k]:
            measure(op, cold=False)


def run_loads(ops: list[Op], reps: int, *, cold: bool) -> None:
    if not cold:
        for op in ops:  # warm the page cache (and the allocator) once
            op.run()
    for _ in range(reps):
        for op in ops:
            measure(op, cold=cold)


def rate(nbytes: int, seconds: float) -> float:
    return nbytes / max(seconds, 1e-12) / 1e9


def print_table(title: str, ops: list[Op], nbytes: int, ref: Op | None, *, ref_label: str = "vs raw") -> None:
    """Median, best, GB/s, speed relative to ``ref`` (ref time / time) and peak RSS when measured."""
    print(f"\n{title}")
    track_rss = any(op.peaks for op in ops)
    head = f"  {'':<40}{'median s':>10}{'best s':>9}{'GB/s':>8}{ref_label:>9}"
    if track_rss:
        head += f"{'peak RSS':>13}"
    print(head)
    for op in ops:
        med = op.median()
        line = f"  {op.name:<40}{med:>10.3f}{min(op.seconds):>9.3f}{rate(nbytes, med):>8.2f}"
        line += f"{ref.median() / med:>9.2f}" if ref is not None else f"{'':>9}"
        if op.peaks:
            line += f"{max(op.peaks) / MIB:>+9.0f} MiB"
        if op.note:
            line += f"  {op.note}"
        print(line)


def op_record(op: Op, nbytes: int, ref: Op | None) -> dict[str, Any]:
    """An operation's figures as JSON-ready data."""
    med = op.median()
    return {
        "median_s": med,
        "best_s": min(op.seconds),
        "all_s": op.seconds,
        "gbps": rate(nbytes, med),
        "vs_ref": ref.median() / med if ref is not None else None,
        "peak_rss_mib": max(op.peaks) / MIB if op.peaks else None,
    }


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)


@contextlib.contextmanager
def output_to(path: str) -> Iterator[None]:
    """File descriptors 1 and 2 go to ``path`` meanwhile (what a process spawned now inherits:
    DCP's checkpoint process logs every request at INFO)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)
