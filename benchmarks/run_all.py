"""``make bench``: every benchmark, one after the other, each in a fresh process; then the targets.

Runs ``save_load.py`` (~0.75 GiB: saves, async, loads, peak RSS), ``scale.py`` (~0.1, ~0.75,
~2 GiB and 10,000 tiny tensors), ``train_overhead.py`` (checkpointing a CPU training
loop every 20 steps) and ``bench_hf.py`` (a tiny GPT-2 ``transformers.Trainer``: runstate's
async save vs the Trainer's own ``save_steps``), prints their tables as they come, and ends
with the speed targets of docs/performance.md, each with the figure measured in this run and whether it is met.

A fresh process per script keeps one script's memory (and glibc's heap) from the next one's
peak RSS and timings. The machine's load average is printed before and after: on a shared
machine, background load moves these figures by tens of percent.

    python benchmarks/run_all.py                   # about 5-9 minutes on 2 cores
    python benchmarks/run_all.py --quick           # small sizes, few reps: about 3-4 minutes
    python benchmarks/run_all.py --json all.json   # also keep every figure
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ("save_load", "scale", "train_overhead", "bench_hf", "bench_compression", "bench_incremental")
MIB = 1024**2


def loadavg() -> str:
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "?"


def targets(res: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(target, measured, threshold, met) for every target the figures of this run can judge."""
    out: list[tuple[str, str, str, bool | None]] = []
    sl = res.get("save_load")
    if sl:
        save, nbytes = sl["save"], sl["nbytes"]
        rs, pt = save["runstate.save (sync)"], save["torch.save+fsync"]
        out.append(("sync save vs raw write", f"{rs['vs_ref']:.2f}x", ">= 0.90x", rs["vs_ref"] >= 0.9))
        out.append(
            (
                "sync save vs torch.save",
                f"{rs['median_s']:.3f} s vs {pt['median_s']:.3f} s",
                "faster",
                rs["median_s"] < pt["median_s"],
            )
        )
        clone = sl["async"]["clone: [t.clone() for t in tensors]"]["median_s"]
        block = save["runstate async: save() blocks"]["median_s"]
        out.append(
            (
                "async save() blocks vs clone",
                f"{block:.3f} s = {block / clone:.2f}x clone ({clone:.3f} s)",
                "<= 2x",
                block <= 2 * clone,
            )
        )
        if sl["load_cold"]:
            cold = sl["load_cold"]["runstate.load (in place)"]
            out.append(
                (
                    "restore in place, cold cache, vs raw read",
                    f"{cold['vs_ref']:.2f}x",
                    ">= 0.80x",
                    cold["vs_ref"] >= 0.8,
                )
            )
        warm = sl["load_warm"]["runstate.load (in place)"]
        live = sl["load_warm"]["raw read into live tensors"]
        out.append(
            (
                "restore in place, warm, vs raw read into live tensors",
                f"{warm['median_s']:.3f} s vs {live['median_s']:.3f} s",
                "zero-copy (1 copy)",
                None,
            )
        )
        limit = 0.1 * nbytes + 64 * MIB
        peak = save["runstate.save (sync)"]["peak_rss_mib"]
        if peak is not None:
            out.append(("sync save peak RSS", f"+{peak:.0f} MiB", f"<= {limit / MIB:.0f} MiB", peak * MIB <= limit))
        first = sl["async"]["  save() to wait()"]["peak_rss_mib"]
        if first is not None:
            out.append(
                (
                    "async save peak RSS (first save, buffers allocated)",
                    f"+{first:.0f} MiB",
                    f"<= 1 copy ({nbytes / MIB:.0f} MiB)",
                    first * MIB <= nbytes + 64 * MIB,
                )
            )
    tr = res.get("train_overhead")
    if tr:
        for key, label in (("periods", "interleaved periods, robust"), ("whole_runs", "whole runs")):
            if key in tr:
                pct = tr[key]["async"]["overhead_pct"]
                sync = tr[key]["sync"]["overhead_pct"]
                out.append(
                    (
                        f"training loop, async save every 20 steps ({label})",
                        f"{pct:+.1f}% (sync: {sync:+.1f}%)",
                        "<= 10%",
                        pct <= 10 if key == "periods" else None,  # one run each: load spikes dominate
                    )
                )
    zc = res.get("bench_compression")
    if zc:  # informational: when compression pays depends on the storage (docs/performance.md)
        level = zc["default_level"]
        z = zc["save"][f"runstate.save, zstd level {level}"]
        out.append(
            (
                f"zstd level {level} save vs uncompressed (local disk {zc['disk_MBps']:.0f} MB/s)",
                f"{z['vs_plain']:.2f}x, {z['nbytes'] / zc['save']['runstate.save, no compression']['nbytes']:.2f} of the bytes",
                "informational",
                None,
            )
        )
    inc = res.get("bench_incremental")
    if inc:  # frozen base + adapters, keep_last=3 (issue 19): the bench computed each verdict
        out += [(f"incremental: {label}", measured, target, met) for label, measured, target, met in inc["targets"]]
    hf = res.get("bench_hf")
    if hf:
        v = hf["variants"]
        out.append(
            (
                f"Trainer, a save every {hf['args']['every']} steps: runstate async vs the Trainer's own",
                f"{v['async']['overhead_pct']:+.1f}% vs {v['trainer']['overhead_pct']:+.1f}%",
                "see doc",
                None,  # a few percent either way: within the noise of a shared machine
            )
        )
    sc = res.get("scale")
    if sc:
        for table, name, ref in (
            ("save", "runstate.save", "raw write (os.write+fsync)"),
            ("load_cold", "runstate.load (in place)", "raw read (readinto)"),
        ):
            got = [r for r in sc["sizes"] if name in r[table]]
            if got:
                ratios = [r[table][ref]["median_s"] / r[table][name]["median_s"] for r in got]
                sizes = "/".join(f"{r['nbytes'] / 1024**3:.2g}" for r in got)
                out.append(
                    (
                        f"linear in bytes: {table.replace('_', ' ')} vs raw at {sizes} GiB",
                        " / ".join(f"{x:.2f}x" for x in ratios),
                        ">= 0.9x (save), 0.8x (load) at every size",
                        min(ratios) >= (0.9 if table == "save" else 0.8),
                    )
                )
        tiny = sc.get("tiny")
        if tiny:
            per = tiny["per_tensor_us"]
            out.append(
                (
                    "per-tensor cost, save (10,000 tiny)",
                    f"{per['runstate save']:.0f} us (torch.save {per['torch.save']:.0f} us)",
                    "<= torch.save's",
                    per["runstate save"] <= per["torch.save"],
                )
            )
            out.append(
                (
                    "per-tensor cost, load (10,000 tiny)",
                    f"{per['runstate load']:.0f} us (torch.load {per['torch.load']:.0f} us)",
                    "<= torch.load's",
                    per["runstate load"] <= per["torch.load"],
                )
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few reps (smoke run)")
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, default=list(SCRIPTS), help="run only these")
    parser.add_argument("--dir", default=None, help="scratch directory on the disk to test (default ROOT/.bench-tmp)")
    parser.add_argument("--json", default=None, help="write every figure of every script to this file")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    results: dict[str, Any] = {}
    load_before = loadavg()
    print(f"run_all: {', '.join(args.only)}{' (quick)' if args.quick else ''}; load average {load_before}", flush=True)
    with tempfile.TemporaryDirectory(prefix="runstate-bench-") as tmp:
        for name in args.only:
            out = os.path.join(tmp, f"{name}.json")
            cmd = [sys.executable, os.path.join(HERE, f"{name}.py"), "--json", out]
            cmd += ["--quick"] if args.quick else []
            cmd += ["--dir", args.dir] if args.dir else []
            print(f"\n{'=' * 100}\n$ {' '.join(cmd[1:])}\n", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd)
            try:
                rc = proc.wait()
            finally:
                if proc.poll() is None:  # interrupted: the child cleans its scratch directory on SIGTERM
                    proc.terminate()
                    proc.wait()
            if rc != 0:
                print(f"error: {name}.py exited with {rc}")
                return rc
            with open(out) as f:
                results[name] = json.load(f)
            results[name]["seconds"] = time.perf_counter() - t0
    results["load_average"] = {"before": load_before, "after": loadavg()}
    print(f"\n{'=' * 100}\nTARGETS (figures of this run)")
    rows = targets(results)
    width = max(len(r[0]) for r in rows) if rows else 10
    for target, measured, threshold, met in rows:
        verdict = {True: "met", False: "NOT MET", None: "see doc"}[met]
        print(f"  {target:<{width}}  {measured:<42} {threshold:<26} {verdict}")
    print(
        f"\nload average before {load_before}, after {results['load_average']['after']} "
        f"({os.cpu_count()} CPUs): above ~0.5 the figures include other processes' load"
    )
    print(f"run_all time {time.perf_counter() - started:.0f} s")
    results["targets"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
