"""What does ``compression="zstd"`` buy, and what does it cost, on real training states?

A small MLP trains with AdamW for ``--steps`` steps on a toy regression, then four kinds of
tensors are measured, each three ways (none, plain zstd, byte-grouping + zstd) at several
levels:

    weights fp32     the model's parameters
    adam exp_avg     AdamW's first moments (fp32)
    adam exp_avg_sq  AdamW's second moments (fp32)
    weights bf16     the same parameters cast to bfloat16

Ratio = stored / raw bytes (smaller is better). Compression and decompression speeds are raw
MB per second through runstate's own chunked codec (``runstate.format.compress``), with the
default worker threads (``min(4, cores)``). Then whole durable local saves of model +
optimizer (``runstate.save``, fsync included) with compression off and at each level, timed
round-robin against a raw durable write of the same bytes (the disk's speed, measured in the
same run): a level "keeps up with the disk" when its save is no slower than the uncompressed
save. The default level in ``runstate.format.compress.DEFAULT_LEVEL`` comes from this table.

    python benchmarks/bench_compression.py            # ~200 MB of state, ~2-4 minutes on 2 cores
    python benchmarks/bench_compression.py --quick    # ~20 MB, a few reps: ~30 s
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
from common import MIB, fsync_dir, machine, print_machine, raw_write, remove, runstate, scratch_dir, write_json
from torch import nn

from runstate.format.compress import DEFAULT_LEVEL, Compression, compress_tensor, decode_chunks

LEVELS = (-3, 1, 3, 9)
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


def codec_figures(tensors: list[torch.Tensor], options: Compression, reps: int) -> dict[str, float]:
    """Ratio, compress and decompress speeds of ``tensors`` through runstate's chunked codec.

    Wall-clock MB/s with the default worker threads, and MB per CPU-second of one thread
    (``time.thread_time``): the second moves much less with other processes' load, and
    times the cores available gives the speed of an idle machine.
    """
    raw = sum(t.numel() * t.element_size() for t in tensors)
    datas = [t.contiguous().reshape(-1).view(torch.uint8).numpy() for t in tensors]
    one_thread = dataclasses.replace(options, threads=1)
    comp_s, comp_cpu, dec_s, dec_cpu = [], [], [], []
    stored = 0
    for _ in range(reps):
        for opts, timings in ((options, comp_s), (one_thread, comp_cpu)):
            frames: list[list[Any]] = []
            packings = []
            wall, cpu = time.perf_counter(), time.thread_time()
            for t, data in zip(tensors, datas, strict=True):
                out: list[Any] = []
                packings.append(compress_tensor(data, _code(t), tuple(t.shape), opts, out.append))
                frames.append(out)
            timings.append(time.perf_counter() - wall if opts is options else time.thread_time() - cpu)
        stored = sum(len(f) for fs in frames for f in fs)
        wall, cpu = time.perf_counter(), time.thread_time()
        for packing, fs in zip(packings, frames, strict=True):
            it = iter(fs)
            dest = np.empty(packing.nbytes, np.uint8)
            for _piece in decode_chunks(packing, lambda n, it=it: memoryview(next(it)), dest):
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small state, few reps")
    parser.add_argument("--json", default=None, help="write every figure to this file")
    parser.add_argument("--dir", default=None, help="scratch directory (default: .bench-tmp in the checkout)")
    args = parser.parse_args(argv)
    width, layers, steps, reps = (512, 6, 10, 3) if args.quick else (1536, 6, 30, 5)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, opt = trained_state(width, layers, steps)
    groups = kinds(model, opt)
    state_bytes = sum(
        t.numel() * t.element_size() for k in ("weights fp32", "adam exp_avg", "adam exp_avg_sq") for t in groups[k]
    )
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
        state = {"model": model, "optimizer": opt}
        flat = [t for k in ("weights fp32", "adam exp_avg", "adam exp_avg_sq") for t in groups[k]]
        variants: dict[str, Any] = {"raw durable write (the disk)": None, "runstate.save, no compression": "off"}
        variants.update({f"runstate.save, zstd level {lv}": Compression(level=lv) for lv in LEVELS})
        times: dict[str, list[float]] = {name: [] for name in variants}
        sizes: dict[str, int] = {}
        for rep in range(reps):
            for name, option in variants.items():
                path = os.path.join(scratch, f"v{rep}")
                os.sync()
                start = time.perf_counter()
                if option is None:
                    raw_write(path, flat)
                else:
                    runstate.save(path, state, compression=None if option == "off" else option)
                    fsync_dir(scratch)
                times[name].append(time.perf_counter() - start)
                sizes[name] = (
                    os.path.getsize(path)
                    if option is None
                    else sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
                )
                remove(path)
        disk = statistics.median(times["raw durable write (the disk)"])
        plain = statistics.median(times["runstate.save, no compression"])
        print(f"\ndurable local save of model + optimizer ({state_bytes / 1e6:.0f} MB), median of {reps}, round-robin")
        print(f"{'variant':<34} {'seconds':>8} {'MB/s':>7} {'on disk':>9} {'vs no compression':>18}")
        for name in variants:
            t = statistics.median(times[name])
            rec = {"median_s": t, "MBps": state_bytes / 1e6 / t, "nbytes": sizes[name], "vs_plain": plain / t}
            results["save"][name] = rec
            print(f"{name:<34} {t:>8.3f} {rec['MBps']:>7.0f} {sizes[name] / 1e6:>8.1f}M {rec['vs_plain']:>17.2f}x")
        keeping_up = [lv for lv in LEVELS if results["save"][f"runstate.save, zstd level {lv}"]["median_s"] <= plain]
        results["disk_MBps"] = state_bytes / 1e6 / disk
        results["levels_keeping_up"] = keeping_up
        results["default_level"] = DEFAULT_LEVEL
        print(
            f"\ndisk: {state_bytes / 1e6 / disk:.0f} MB/s durable; levels whose save is no slower than no "
            f"compression: {keeping_up or 'none'}; default level {DEFAULT_LEVEL}"
        )
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
