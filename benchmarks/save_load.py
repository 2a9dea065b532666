"""Benchmark runstate.save / runstate.load against reference ways of writing the same bytes.

Builds an AdamW training state (a stack of ``nn.Linear`` layers after one optimizer step:
parameters, ``exp_avg`` and ``exp_avg_sq`` in fp32) and times, in the same run:

saves (all durable: the file and its directory are fsynced)
    raw write      every tensor's bytes into one file with ``os.write``, then fsync
    safetensors    ``safetensors.torch.save_file`` of the flattened tensors, then fsync
    torch.save     ``torch.save({"model": sd, "optimizer": opt_sd})``, then fsync
    runstate.save  ``runstate.save(dir, {"model": model, "optimizer": opt}, step=1)``

loads (cold page cache when ``/proc/sys/vm/drop_caches`` is writable, and warm)
    raw read       the raw file read back into fresh buffers (the reference)
    raw read live  the raw file read straight into the live tensors (the in-place bound)
    safetensors    ``safetensors.torch.load_file``: lazy mmap (default) and backend="pread"
    torch.load     ``torch.load(weights_only=True)``
    torch.load+lsd the same, then ``load_state_dict`` into a second model and optimizer
    runstate.load  ``runstate.load(dir, {"model": model2, "optimizer": opt2})`` (in place)

Every figure is the median of ``--reps`` runs (the best is shown too), as seconds, GB/s of
state bytes and a ratio against the raw write (saves) or raw read (loads) of the same run:
``x raw`` is time / raw time, so 1.00 means as fast as the raw I/O and 2.00 twice as slow.
``peak RSS`` is how far the process's resident memory rose above where it was when the
operation started (VmHWM, reset through /proc/self/clear_refs), from one extra untimed run
of each operation at the end with glibc set to map every big buffer freshly.

    python benchmarks/save_load.py            # ~0.75 GiB state, about 1-2 minutes
    python benchmarks/save_load.py --quick    # ~0.1 GiB state, CI smoke run
    python benchmarks/save_load.py --gib 2 --reps 5 --dir /mnt/nvme/tmp
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import inspect
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import safetensors
import torch
from safetensors.torch import load_file, save_file
from torch import nn

try:
    import runstate
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
    import runstate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024**3
MIB = 1024**2
N_LAYERS = 8


# --------------------------------------------------------------------------- system helpers


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _status_kib(key: str) -> int | None:
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
    return _status_kib("VmHWM") is not None


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
    """``device type`` of the mount holding ``path`` (best effort, Linux)."""
    path = os.path.realpath(path)
    best = ("", "?", "?")
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, dev, fstype)
    return f"{best[1]} ({best[2]}, mounted on {best[0]})"


# --------------------------------------------------------------------------- the state


def build_state(gib: float, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, int]:
    """A stack of Linear layers + AdamW after one step, whose 3 fp32 copies total ~``gib``."""
    width = max(64, round(math.sqrt(gib * GIB / (3 * 4 * N_LAYERS)) / 64) * 64)
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
    torch.manual_seed(1)
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


def byte_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


# --------------------------------------------------------------------------- the operations


def raw_write(path: str, tensors: list[torch.Tensor]) -> None:
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


def safetensors_save(path: str, flat: dict[str, torch.Tensor]) -> None:
    save_file(flat, path)
    fsync_path(path)
    fsync_dir(os.path.dirname(path))


def torch_save(path: str, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    with open(path, "xb") as f:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(os.path.dirname(path))


def torch_load_into(path: str, model: nn.Module, opt: torch.optim.Optimizer) -> Any:
    sd = torch.load(path, weights_only=True)
    model.load_state_dict(sd["model"])
    opt.load_state_dict(sd["optimizer"])
    return sd


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


# --------------------------------------------------------------------------- measuring


@dataclass
class Op:
    name: str
    run: Callable[[], Any]
    path: str = ""  # removed before each run of a save
    seconds: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)

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
        if op.path:
            remove(op.path)
        gc.collect()
        malloc_trim()
        if not reset_peak_rss():
            return
        rss0 = _status_kib("VmRSS") or 0
        result = op.run()
        op.peaks.append(max(0, (_status_kib("VmHWM") or 0) - rss0) * 1024)
        del result


def run_saves(ops: list[Op], reps: int) -> None:
    for _ in range(reps):  # round-robin, so slow drift of the disk hits every row alike
        for op in ops:
            remove(op.path)
            measure(op, cold=False)


def run_loads(ops: list[Op], reps: int, *, cold: bool) -> None:
    if not cold:
        for op in ops:  # warm the page cache (and the allocator) once
            op.run()
    for _ in range(reps):
        for op in ops:
            measure(op, cold=cold)


def print_table(title: str, ops: list[Op], nbytes: int, ref: Op) -> None:
    print(f"\n{title}")
    head = f"  {'':<34}{'median s':>10}{'best s':>10}{'GB/s':>8}{'x raw':>8}"
    track_rss = any(op.peaks for op in ops)
    if track_rss:
        head += f"{'peak RSS':>13}"
    print(head)
    for op in ops:
        med = op.median()
        rate = nbytes / med / 1e9
        line = f"  {op.name:<34}{med:>10.3f}{min(op.seconds):>10.3f}{rate:>8.2f}{med / ref.median():>8.2f}"
        if op.peaks:
            line += f"{max(op.peaks) / MIB:>+9.0f} MiB"
        print(line)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=None, help="total state size in GiB (default 0.75)")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: ~0.1 GiB unless --gib is given")
    parser.add_argument("--reps", type=int, default=None, help="measured runs per operation (default 5, --quick 3)")
    parser.add_argument("--dir", default=None, help="scratch directory on the disk to test (default ROOT/.bench-tmp)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-page-cache loads")
    args = parser.parse_args(argv)
    gib = args.gib if args.gib is not None else (0.1 if args.quick else 0.75)
    args.reps = args.reps if args.reps is not None else (3 if args.quick else 5)
    if gib <= 0 or args.reps < 1:
        parser.error("--gib and --reps must be positive")
    started = time.perf_counter()

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, opt, width = build_state(gib)
    flat = flat_tensors(model, opt)
    tensors = list(flat.values())
    sizes = [t.nbytes for t in tensors]
    nbytes = sum(sizes)
    model2, opt2 = fresh_copy(width)
    n_params = sum(p.numel() for p in model.parameters())
    gc.collect()
    gc.freeze()  # the many objects torch created at import: later gc.collect() calls need not scan them

    base = os.path.abspath(args.dir or os.path.join(ROOT, ".bench-tmp"))
    created_base = not os.path.exists(base)
    os.makedirs(base, exist_ok=True)
    free = shutil.disk_usage(base).free
    if free < 6 * nbytes:
        print(f"error: {base} has {free / GIB:.1f} GiB free, the benchmark needs ~{6 * nbytes / GIB:.1f}")
        return 1
    work = tempfile.mkdtemp(prefix="save_load-", dir=base)
    cold_reason = "disabled by --no-cold" if args.no_cold else drop_caches()
    track_rss = reset_peak_rss()

    print(
        f"runstate {runstate.__version__} benchmark: {nbytes / GIB:.3f} GiB of state "
        f"({N_LAYERS} x nn.Linear({width}, {width}) + AdamW after 1 step: {n_params / 1e6:.1f}M params, "
        f"{len(tensors)} tensors)"
    )
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, safetensors {safetensors.__version__}, "
        f"numpy {np.__version__}; {os.cpu_count()} CPUs, {args.reps} reps (median; best also shown)"
    )
    print(f"scratch: {work} on {filesystem_of(work)}")
    try:
        p_raw = os.path.join(work, "raw.bin")
        p_st = os.path.join(work, "state.safetensors")
        p_pt = os.path.join(work, "state.pt")
        p_rs = os.path.join(work, "runstate-ckpt")

        saves = [
            Op("raw write (os.write+fsync)", lambda: raw_write(p_raw, tensors), p_raw),
            Op("safetensors save_file+fsync", lambda: safetensors_save(p_st, flat), p_st),
            Op("torch.save+fsync", lambda: torch_save(p_pt, model, opt), p_pt),
            Op("runstate.save", lambda: runstate.save(p_rs, {"model": model, "optimizer": opt}, step=1), p_rs),
        ]
        run_saves(saves, args.reps)

        # sanity: runstate restores exactly what was saved
        runstate.load(p_rs, {"model": model2, "optimizer": opt2})
        restored = flat_tensors(model2, opt2)
        if restored.keys() != flat.keys() or not all(torch.equal(restored[k], v) for k, v in flat.items()):
            print("error: runstate.load did not restore the saved state")
            return 1
        del restored

        def loads() -> list[Op]:
            ops = [
                Op("raw read (readinto)", lambda: raw_read(p_raw, sizes)),
                Op(
                    "raw read into live tensors",
                    lambda: raw_read_into(p_raw, list(flat_tensors(model2, opt2).values())),
                ),
                Op("safetensors load_file (lazy mmap)", lambda: load_file(p_st)),
                Op("torch.load(weights_only)", lambda: torch.load(p_pt, weights_only=True)),
                Op("torch.load+load_state_dict", lambda: torch_load_into(p_pt, model2, opt2)),
                Op("runstate.load (in place)", lambda: runstate.load(p_rs, {"model": model2, "optimizer": opt2})),
            ]
            if "backend" in inspect.signature(load_file).parameters:  # safetensors >= 0.8
                ops.insert(3, Op("safetensors load_file (pread)", lambda: load_file(p_st, backend="pread")))
            return ops

        cold_loads: list[Op] = []
        if cold_reason is None:
            cold_loads = loads()
            run_loads(cold_loads, args.reps, cold=True)
        warm_loads = loads()
        run_loads(warm_loads, args.reps, cold=False)
        if track_rss:  # last: it changes malloc settings for the rest of the process
            pin_malloc_mmap_threshold()
            measure_peak_rss(saves)
            measure_peak_rss(warm_loads)

        print_table("SAVE (durable: file + directory fsynced)", saves, nbytes, saves[0])
        if cold_loads:
            title = "LOAD, cold page cache (sync; drop_caches before each)"
            print_table(title, cold_loads, nbytes, cold_loads[0])
        else:
            print(f"\nLOAD, cold page cache: skipped, cannot drop the page cache ({cold_reason}); warm figures only")
        print_table("LOAD, warm page cache", warm_loads, nbytes, warm_loads[0])
        print(
            "\nx raw = median time / median time of the raw write (saves) or raw read (loads) in this run."
            "\npeak RSS = highest resident memory during the operation minus resident memory at its start"
            "\n  (one extra untimed run per operation, warm cache, every buffer >= 1 MiB freshly mapped);"
            "\n  lazy mmap = safetensors' default backend: tensors map the file and no byte is read until used.\n"
            "  raw read into live tensors = readinto() the storage of the live model/optimizer (the in-place bound)."
        )
        if not track_rss:
            print("  (peak RSS not shown: /proc/self/clear_refs is not available)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created_base:
            with contextlib.suppress(OSError):
                os.rmdir(base)
    print(f"total benchmark time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
