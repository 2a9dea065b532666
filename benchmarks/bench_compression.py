"""What does ``compression="zstd"`` buy, and what does it cost, on real training states?

A small MLP trains with AdamW for ``--steps`` steps on a toy regression, then four kinds of
tensors are measured, each three ways (none, plain zstd, byte-grouping + zstd) at several
levels:

    weights fp32     the model's parameters
    adam exp_avg     AdamW's first moments (fp32)
    adam exp_avg_sq  AdamW's second moments (fp32)
    weights bf16     the same parameters cast to bfloat16

Ratio = stored / raw bytes (smaller is better). Compression and decompression speeds are raw
MB per second through runstate's own chunked codec (``runstate.format.compress``: one
``Packer`` for all the tensors, as a save uses one per file) with the default worker threads
(``min(4, cores)``), and MB per CPU-second of one thread (``time.thread_time``), the figure
that moves least with other processes' load.

Then whole durable local saves (``runstate.save``, fsync included) of two states, model +
AdamW (fp32) and the bf16 model alone, with compression off and at each level (level 1 also
with one thread), timed round-robin against a raw durable write of the same bytes (the disk's
speed, measured in the same run). Each row gives the median and range of the wall time, the
process's CPU seconds (all threads), and the speed as a fraction of the uncompressed save's: a
level "keeps up with the disk" when its save is no slower than the uncompressed save. The
default level in ``runstate.format.compress.DEFAULT_LEVEL`` comes from these tables.

    python benchmarks/bench_compression.py            # ~170 MB of state, ~3-5 minutes on 2 cores
    python benchmarks/bench_compression.py --quick    # ~20 MB, a few reps: ~30 s
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import resource
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
import xxhash
from common import (
    MIB,
    fsync_dir,
    load_average,
    machine,
    print_machine,
    raw_write,
    remove,
    runstate,
    scratch_dir,
    write_json,
)
from torch import nn

from runstate.format.compress import DEFAULT_LEVEL, Compression, Packer, decode_chunks

LEVELS = (-5, -1, 1, 3, 9)
#: Levels of the save table (level 9 compresses at ~30 MB/s: the codec table is enough)
SAVE_LEVELS = (-5, -1, 1, 3)
MODES = ("zstd", "bytegroup+zstd")


def trained_state(width: int, layers: int, steps: int) -> tuple[nn.Module, torch.optim.AdamW]:
    """An MLP after ``steps`` AdamW steps on a fixed random regression task."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.GELU())])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    x, y = torch.randn(64, width), torch.randn(64, width)
    for _ in range(steps):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def kinds(model: nn.Module, opt: torch.optim.AdamW) -> dict[str, list[torch.Tensor]]:
    params = [p.detach() for p in model.parameters()]
    state = [opt.state[p] for p in model.parameters()]
    return {
        "weights fp32": params,
        "adam exp_avg": [s["exp_avg"] for s in state],
        "adam exp_avg_sq": [s["exp_avg_sq"] for s in state],
        "weights bf16": [p.bfloat16() for p in params],
    }


def _code(t: torch.Tensor) -> str:
    return "BF16" if t.dtype == torch.bfloat16 else "F32"


def _compress_all(
    options: Compression, tensors: list[torch.Tensor], datas: list[np.ndarray], keep: bool
) -> tuple[list[Any], list[list[bytes]], int]:
    """Compress every tensor with one Packer; hash each piece as a save does, keep copies if ``keep``."""
    packings, frames, stored = [], [], 0
    with Packer(options) as packer:
        for t, data in zip(tensors, datas, strict=True):
            hasher, out = xxhash.xxh3_64(), list[bytes]()

            def emit(piece: Any, hasher: Any = hasher, out: list[bytes] = out) -> None:
                hasher.update(piece)  # a piece is only valid during the call: copy it to keep it
                if keep:
                    out.append(bytes(piece))

            packings.append(packer.compress(data, _code(t), tuple(t.shape), emit))
            frames.append(out)
            stored += sum(packings[-1].chunks)
    return packings, frames, stored


def codec_figures(tensors: list[torch.Tensor], options: Compression, reps: int) -> dict[str, float]:
    """Ratio, compress and decompress speeds of ``tensors`` through runstate's chunked codec.

    Wall-clock MB/s with the default worker threads, and MB per CPU-second of one thread
    (``time.thread_time``): the second moves much less with other processes' load, and
    times the cores available bounds the speed of an idle machine.
    """
    raw = sum(t.numel() * t.element_size() for t in tensors)
    datas = [t.contiguous().reshape(-1).view(torch.uint8).numpy() for t in tensors]
    one_thread = dataclasses.replace(options, threads=1)
    comp_s, comp_cpu, dec_s, dec_cpu = [], [], [], []
    packings, frames, stored = _compress_all(options, tensors, datas, keep=True)
    for _ in range(reps):
        wall = time.perf_counter()
        _compress_all(options, tensors, datas, keep=False)
        comp_s.append(time.perf_counter() - wall)
        cpu = time.thread_time()
        _compress_all(one_thread, tensors, datas, keep=False)
        comp_cpu.append(time.thread_time() - cpu)
        wall, cpu = time.perf_counter(), time.thread_time()
        for packing, fs in zip(packings, frames, strict=True):
            it = iter(fs)
            dest = np.empty(packing.nbytes, np.uint8)
            for _piece in decode_chunks(packing, lambda n, it=it: memoryview(next(it)), dest):  # type: ignore[misc]
                pass
        dec_s.append(time.perf_counter() - wall)
        dec_cpu.append(time.thread_time() - cpu)
    return {
        "ratio": stored / raw,
        "compress_MBps": raw / 1e6 / statistics.median(comp_s),
        "compress_MB_per_cpu_s": raw / 1e6 / statistics.median(comp_cpu),
        "decompress_MBps": raw / 1e6 / statistics.median(dec_s),
        "decompress_MB_per_cpu_s": raw / 1e6 / statistics.median(dec_cpu),
    }


def _cpu_seconds() -> float:
    """CPU time of this process, every thread included."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def save_figures(
    scratch: str, state: dict[str, Any], flat: list[torch.Tensor], reps: int
) -> tuple[dict[str, dict[str, Any]], float]:
    """Durable local saves of ``state`` round-robin against a raw write of ``flat``.

    Returns:
        Per variant: median, range and CPU seconds, bytes on disk, speed vs the uncompressed
        save; and the disk's speed (MB/s of the raw durable write).
    """
    nbytes = sum(t.numel() * t.element_size() for t in flat)
    variants: dict[str, Any] = {"raw durable write (the disk)": None, "runstate.save, no compression": "off"}
    variants.update({f"runstate.save, zstd level {lv}": Compression(level=lv) for lv in SAVE_LEVELS})
    variants[f"runstate.save, zstd level {DEFAULT_LEVEL}, 1 thread"] = Compression(threads=1)
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpus: dict[str, list[float]] = {name: [] for name in variants}
    sizes: dict[str, int] = {}
    for rep in range(reps):
        for name, option in variants.items():
            path = os.path.join(scratch, f"v{rep}")
            os.sync()
            start, cpu = time.perf_counter(), _cpu_seconds()
            if option is None:
                raw_write(path, flat)
            else:
                runstate.save(path, state, compression=None if option == "off" else option)
                fsync_dir(scratch)
            times[name].append(time.perf_counter() - start)
            cpus[name].append(_cpu_seconds() - cpu)
            sizes[name] = (
                os.path.getsize(path)
                if option is None
                else sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
            )
            remove(path)
    plain = statistics.median(times["runstate.save, no compression"])
    out = {}
    for name in variants:
        t = statistics.median(times[name])
        out[name] = {
            "median_s": t,
            "min_s": min(times[name]),
            "max_s": max(times[name]),
            "cpu_s": statistics.median(cpus[name]),
            "MBps": nbytes / 1e6 / t,
            "nbytes": sizes[name],
            "vs_plain": plain / t,
        }
    return out, nbytes / 1e6 / statistics.median(times["raw durable write (the disk)"])


def print_saves(title: str, nbytes: int, reps: int, rows: dict[str, dict[str, Any]]) -> None:
    print(f"\n{title} ({nbytes / 1e6:.0f} MB): median and range of {reps}, round-robin; load average {load_average()}")
    print(
        f"{'variant':<38} {'seconds':>8} {'range':>13} {'MB/s':>6} {'cpu s':>6} {'on disk':>8} {'vs no compression':>18}"
    )
    for name, rec in rows.items():
        span = f"{rec['min_s']:.3f}-{rec['max_s']:.3f}"
        print(
            f"{name:<38} {rec['median_s']:>8.3f} {span:>13} {rec['MBps']:>6.0f} {rec['cpu_s']:>6.2f} "
            f"{rec['nbytes'] / 1e6:>7.1f}M {rec['vs_plain']:>17.2f}x"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small state, few reps")
    parser.add_argument("--json", default=None, help="write every figure to this file")
    parser.add_argument("--dir", default=None, help="scratch directory (default: .bench-tmp in the checkout)")
    args = parser.parse_args(argv)
    width, layers, steps, reps = (512, 6, 10, 3) if args.quick else (1536, 6, 30, 7)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, opt = trained_state(width, layers, steps)
    groups = kinds(model, opt)
    fp32 = [t for k in ("weights fp32", "adam exp_avg", "adam exp_avg_sq") for t in groups[k]]
    state_bytes = sum(t.numel() * t.element_size() for t in fp32)
    results: dict[str, Any] = {"machine": machine(), "state_MB": state_bytes / 1e6, "codec": {}, "save": {}}

    with scratch_dir(args.dir, 4 * state_bytes + 64 * MIB, "bench-compression-") as scratch:
        print_machine(scratch)
        print(
            f"state: MLP {layers}x{width}, AdamW after {steps} steps, {state_bytes / 1e6:.0f} MB fp32 "
            f"(weights + 2 moments); {os.cpu_count()} cores\n"
        )
        print("MB/s: wall clock (compress: default threads); MB/cpu-s: one thread's CPU time")
        print(
            f"{'tensors':<16} {'mode':<15} {'level':>5} {'ratio':>6} {'comp MB/s':>10} {'MB/cpu-s':>9} "
            f"{'decomp MB/s':>12} {'MB/cpu-s':>9}"
        )
        for kind, tensors in groups.items():
            for mode in MODES:
                for level in LEVELS:
                    options = Compression(level=level, byte_grouping=mode != "zstd")
                    fig = codec_figures(tensors, options, max(1, reps // 2))
                    results["codec"][f"{kind} | {mode} | {level}"] = fig
                    print(
                        f"{kind:<16} {mode:<15} {level:>5} {fig['ratio']:>6.3f} {fig['compress_MBps']:>10.0f} "
                        f"{fig['compress_MB_per_cpu_s']:>9.0f} {fig['decompress_MBps']:>12.0f} "
                        f"{fig['decompress_MB_per_cpu_s']:>9.0f}",
                        flush=True,
                    )
        results["save"], disk = save_figures(scratch, {"model": model, "optimizer": opt}, fp32, reps)
        print_saves("durable local save of model + AdamW, fp32", state_bytes, reps, results["save"])
        half = copy.deepcopy(model).bfloat16()
        flat16 = [p.detach() for p in half.parameters()]
        results["save_bf16"], disk16 = save_figures(scratch, {"model": half}, flat16, reps)
        print_saves(
            "durable local save of the bf16 model", sum(t.numel() * 2 for t in flat16), reps, results["save_bf16"]
        )
        keeping_up = [
            lv
            for lv in SAVE_LEVELS
            if results["save"][f"runstate.save, zstd level {lv}"]["vs_plain"] >= 1
            and results["save_bf16"][f"runstate.save, zstd level {lv}"]["vs_plain"] >= 1
        ]
        results["disk_MBps"] = disk
        results["disk_MBps_bf16"] = disk16
        results["levels_keeping_up"] = keeping_up
        results["default_level"] = DEFAULT_LEVEL
        print(
            f"\ndisk: {disk:.0f} / {disk16:.0f} MB/s durable; levels whose saves are no slower than no "
            f"compression: {keeping_up or 'none'}; default level {DEFAULT_LEVEL}; load average {load_average()}"
        )
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
