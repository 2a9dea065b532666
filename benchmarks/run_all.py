"""``make bench``: every benchmark, one after the other, each in a fresh process; then the targets.

Runs ``save_load.py`` (~0.75 GiB: saves, async saves next to DCP's ``async_save``, loads, peak
RSS), ``scale.py`` (~0.1, ~0.75, ~2 and ~4 GiB; 10 to 10,000 tensors of the same bytes; 10,000
tiny tensors; draws docs/perf-scale.png), ``train_overhead.py`` (checkpointing a CPU training
loop every 20 steps), ``bench_hf.py`` (a tiny GPT-2 ``transformers.Trainer``),
``bench_compression.py`` and ``bench_incremental.py``, prints their tables as they come, and
ends with two tables: the checks of earlier issues, and the seven targets of issue 20.

Issue 20 states each target as a ratio measured in one run of ``make bench``, reported as the
median and range over 3 runs. Each run appends its ratios to a history file (JSON lines,
``.bench-tmp/targets-history.jsonl`` by default, kept apart per mode: full, ``--quick``, or a
subset of scripts), and the TARGETS table shows this run's ratio next to the median and range
of the last 3 runs of the same mode, this one included; the verdict is on that median, and says
so when fewer than 3 runs are recorded. Run ``make bench`` three times for the reported figure.

A fresh process per script keeps one script's memory (and glibc's heap) from the next one's
peak RSS and timings. The machine's load average is printed before and after: on a shared
machine, background load moves these figures by tens of percent.

    python benchmarks/run_all.py                   # about 10-15 minutes on 2 idle cores (estimated)
    python benchmarks/run_all.py --quick           # small sizes, few reps: a smoke run
    python benchmarks/run_all.py --json all.json   # also keep every figure
    python benchmarks/run_all.py --only save_load scale --history /tmp/h.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HISTORY = os.path.join(ROOT, ".bench-tmp", "targets-history.jsonl")
PLOT = os.path.join(ROOT, "docs", "perf-scale.png")
SCRIPTS = ("save_load", "scale", "train_overhead", "bench_hf", "bench_compression", "bench_incremental")
MIB = 1024**2


def loadavg() -> str:
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "?"


Row = tuple[str, str, str, bool | None]


def other_checks(res: dict[str, Any]) -> list[Row]:
    """(check, measured, threshold, met) for the earlier issues' checks this run can judge."""
    out: list[Row] = []
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
    zc = res.get("bench_compression")
    level = (zc or {}).get("default_level")
    z = (zc or {}).get("save", {}).get(f"runstate.save, zstd level {level}")
    plain = (zc or {}).get("save", {}).get("runstate.save, no compression")
    if zc and z and plain:  # informational: when compression pays depends on the storage (docs/performance.md)
        out.append(
            (
                f"zstd level {level} save vs uncompressed (local disk {zc['disk_MBps']:.0f} MB/s)",
                f"{z['vs_plain']:.2f}x, {z['nbytes'] / plain['nbytes']:.2f} of the bytes",
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
    return out


@dataclass
class Target:
    """One of issue 20's targets in this run: ``value`` is the figure judged against ``limit``."""

    key: str  # "1", "2a", ...: the history is kept per key
    label: str
    value: float
    measured: str  # the value and the figures behind it, as printed
    limit: float
    below: bool = True  # met when value <= limit (else value >= limit)
    unit: str = "x"

    def met(self, value: float | None = None) -> bool:
        v = self.value if value is None else value
        return v <= self.limit if self.below else v >= self.limit

    def threshold(self) -> str:
        return f"{'<=' if self.below else '>='} {self.fmt(self.limit)}"

    def fmt(self, v: float) -> str:
        return f"{v:+.1f}%" if self.unit == "%" else f"{v:.2f}x"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms"


def issue20_targets(res: dict[str, Any]) -> list[Target]:
    """Issue 20's seven targets, each a ratio (or a percentage) from this run's figures."""
    out: list[Target] = []
    sl, tr, sc = res.get("save_load"), res.get("train_overhead"), res.get("scale")
    periods = (tr or {}).get("periods") or {}
    dcp_kinds = {k: v for k, v in periods.items() if k.startswith("dcp") and isinstance(v, dict)}
    if "async" in periods:
        pct = periods["async"]["overhead_pct"]
        others = ", ".join(
            f"{k} {v['overhead_pct']:+.1f}%"
            for k, v in periods.items()
            if isinstance(v, dict) and k not in ("none", "async")
        )
        out.append(
            Target(
                "1",
                "training overhead of async saving (131 MiB, every 20 steps)",
                pct,
                f"{pct:+.1f}%, blocks {ms(periods['async']['blocking_median_s'])} ({others})",
                3.0,
                unit="%",
            )
        )
    if sl:
        save, first = sl["save"], sl["async"]
        ours = save["runstate async: save() blocks"]
        dcp_rows = {k: v for k, v in save.items() if k.startswith("DCP async") and "blocks" in k}
        if dcp_rows:
            name, best = min(dcp_rows.items(), key=lambda kv: kv[1]["median_s"])
            totals = {k: v["median_s"] for k, v in save.items() if "to durable" in k or "save() to wait()" in k}
            total_txt = ", ".join(f"{k.split(':')[0]} {v:.2f} s" for k, v in totals.items())
            out.append(
                Target(
                    "2a",
                    "async save blocks, runstate / DCP async_save (its fastest mode)",
                    ours["median_s"] / best["median_s"],
                    f"{ms(ours['median_s'])} vs {ms(best['median_s'])} ({name.split(':')[0]}); to durable: {total_txt}",
                    1.0,
                )
            )
        if dcp_kinds and "async" in periods:
            kind, best_dcp = min(dcp_kinds.items(), key=lambda kv: kv[1]["overhead_pct"])
            ours_pct = periods["async"]["overhead_pct"]
            out.append(
                Target(
                    "2b",
                    "training overhead, runstate async minus DCP async_save (its best mode)",
                    ours_pct - best_dcp["overhead_pct"],
                    f"{ours_pct:+.1f}% vs {best_dcp['overhead_pct']:+.1f}% ({kind}); blocks "
                    f"{ms(periods['async']['blocking_median_s'])} vs {ms(best_dcp['blocking_median_s'])}",
                    0.0,
                    unit="%",
                )
            )
        clone = first["clone: [t.clone() for t in tensors]"]["median_s"]
        fresh = first["first async save(): blocks"]["median_s"]
        warm = first.get("first save after warmup(): blocks")
        rounds = (tr or {}).get("first_save")
        if rounds and "warm" in rounds:  # train_overhead.py: 131 MiB, several rounds, rotating
            out.append(
                Target(
                    "3",
                    "first async save blocks / clone (after mgr.warmup(state))",
                    rounds["warm"]["vs_clone"],
                    f"{ms(rounds['warm']['median_s'])} vs clone {ms(rounds['clone']['median_s'])}, medians of "
                    f"{rounds['reps']} rounds (no warmup: {rounds['cold']['vs_clone']:.2f}x); 0.75 GiB, 1 run: "
                    + (f"{warm['median_s'] / clone:.2f}x" if warm else "-")
                    + f" (no warmup {fresh / clone:.2f}x)",
                    1.5,
                )
            )
        elif warm is not None:
            out.append(
                Target(
                    "3",
                    "first async save blocks / clone (after mgr.warmup(state))",
                    warm["median_s"] / clone,
                    f"{ms(warm['median_s'])} vs clone {ms(clone)} (no warmup: {fresh / clone:.2f}x, 1 run each)",
                    1.5,
                )
            )
        else:
            out.append(
                Target(
                    "3",
                    "first async save blocks / clone (fresh manager)",
                    fresh / clone,
                    f"{ms(fresh)} vs clone {ms(clone)} (1 run)",
                    1.5,
                )
            )
        lw = sl["load_warm"]
        ours_w, live = lw["runstate.load (in place)"]["median_s"], lw["raw read into live tensors"]["median_s"]
        out.append(
            Target(
                "4",
                "warm restore / reading straight into the live tensors",
                ours_w / live,
                f"{ms(ours_w)} vs {ms(live)}",
                1.2,
            )
        )
        if sl["load_cold"]:
            cold = sl["load_cold"]["runstate.load (in place)"]
            raw = sl["load_cold"]["raw read (readinto)"]
            out.append(
                Target(
                    "5",
                    "cold restore speed / raw read of the same bytes",
                    cold["vs_ref"],
                    f"{ms(cold['median_s'])} vs {ms(raw['median_s'])}",
                    0.9,
                    below=False,
                )
            )
    if sc:
        tiny = sc.get("tiny")
        if tiny:
            per = tiny["per_tensor_us"]
            for key, ours_k, ref_k in (("6a", "runstate save", "torch.save"), ("6b", "runstate load", "torch.load")):
                out.append(
                    Target(
                        key,
                        f"10,000 tiny tensors, per tensor: {ours_k} / {ref_k}",
                        per[ours_k] / per[ref_k],
                        f"{per[ours_k]:.0f} us vs {per[ref_k]:.0f} us",
                        1.2,
                    )
                )
        for key, table in (("7a", "save"), ("7b", "load_cold"), ("7c", "load_warm")):
            g = (sc.get("growth") or {}).get(table)
            if g:
                out.append(
                    Target(
                        key,
                        f"scale: {table.replace('_', ' ')} time per byte vs raw, {g['largest_gib']:g} / {g['base_gib']:g} GiB",
                        g["growth"],
                        " ".join(f"{r:.2f}" for r in g["time_over_raw"])
                        + " x raw at "
                        + "/".join(f"{x:g}" for x in g["gib"])
                        + " GiB",
                        1.25,
                    )
                )
        counts = sc.get("counts")
        if counts:
            for key, label in (("7d", "runstate.save"), ("7e", "runstate.load")):
                row = counts["rows"][label]
                mid, hi = row["counts"][-2], row["counts"][-1]
                out.append(
                    Target(
                        key,
                        f"scale: {label} cost per tensor, to {hi:,} / to {mid:,} tensors",
                        row["growth"],
                        f"{row['per_tensor_us'][0]:.0f} / {row['per_tensor_us'][1]:.0f} us per tensor",
                        1.25,
                    )
                )
    return out


def history(path: str, mode: str, current: list[Target], runs: int) -> dict[str, list[float]]:
    """Append this run's values to ``path`` (JSON lines) and return, per target, the last ``runs`` values.

    Runs of another mode (``--quick`` or a subset of scripts) are kept apart: only full runs
    of ``make bench`` are pooled with full runs.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    past: list[dict[str, Any]] = []
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                past.append(json.loads(line))
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": mode,
        "load": loadavg(),
        "values": {t.key: t.value for t in current},
    }
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
    same = [e for e in [*past, entry] if e.get("mode") == mode]
    out: dict[str, list[float]] = {}
    for t in current:
        vals = [e["values"][t.key] for e in same if t.key in e.get("values", {})]
        out[t.key] = vals[-runs:]
    return out


def print_targets(rows: list[Target], pooled: dict[str, list[float]], runs: int) -> list[dict[str, Any]]:
    """The TARGETS table: this run, the median and range over the last ``runs`` runs, the verdict."""
    print(
        f"\n{'=' * 100}\nTARGETS of issue 20: this run's figure, then the median [range] over the last {runs} runs of this"
        f"\nmode kept in the history file (this one included); the verdict is on that median ('1 run' when fewer)"
    )
    width = max((len(t.label) for t in rows), default=10) + 4
    out = []
    for t in rows:
        vals = pooled.get(t.key, [t.value])
        med = statistics.median(vals)
        spread = f"{t.fmt(med)} [{t.fmt(min(vals))}..{t.fmt(max(vals))}]" if len(vals) > 1 else "1 run"
        verdict = "met" if t.met(med) else "NOT MET"
        if len(vals) < runs:
            verdict += f" ({len(vals)} of {runs} runs)"
        print(f"  {t.key + '.':<4}{t.label:<{width}}{t.fmt(t.value):>8}  {t.threshold():<9} {spread:<28} {verdict}")
        print(f"      {'':<{width}}{t.measured}")
        out.append(
            {
                "key": t.key,
                "label": t.label,
                "value": t.value,
                "measured": t.measured,
                "threshold": t.threshold(),
                "runs": vals,
                "median": med,
                "met": t.met(med),
            }
        )
    verdicts = []
    for k in "1234567":
        mine = [r for r in out if r["key"][0] == k]
        if not mine:
            verdicts.append(f"{k} not measured")
            continue
        # target 1 may be met by a lever (1b: an option); every other target needs all its rows
        ok = any(r["met"] for r in mine) if k == "1" else all(r["met"] for r in mine)
        verdicts.append(f"{k} {'met' if ok else 'NOT MET'}")
    print(f"  per target (on the medians): {'; '.join(verdicts)}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few reps (smoke run)")
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, default=list(SCRIPTS), help="run only these")
    parser.add_argument("--dir", default=None, help="scratch directory on the disk to test (default ROOT/.bench-tmp)")
    parser.add_argument("--json", default=None, help="write every figure of every script to this file")
    parser.add_argument("--history", default=HISTORY, help="JSON-lines file of every run's target figures")
    parser.add_argument("--runs", type=int, default=3, help="runs pooled for the median and range (default 3)")
    parser.add_argument(
        "--plot", default=None, help="scale plot (default docs/perf-scale.png; --quick: none unless given)"
    )
    args = parser.parse_args(argv)
    plot = args.plot or (None if args.quick else PLOT)
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
            cmd += ["--plot", plot] if name == "scale" and plot else []
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
    try:
        rows = other_checks(results)
    except (KeyError, TypeError, ZeroDivisionError) as exc:  # a script's JSON changed shape: say so, go on
        print(f"\nOTHER CHECKS: cannot be computed from this run's figures ({type(exc).__name__}: {exc})")
        rows = []
    if rows:
        print(f"\n{'=' * 100}\nOTHER CHECKS (earlier issues; figures of this run)")
        width = max(len(r[0]) for r in rows)
        for check, measured, threshold, met in rows:
            verdict = {True: "met", False: "NOT MET", None: "see doc"}[met]
            print(f"  {check:<{width}}  {measured:<42} {threshold:<26} {verdict}")
    try:
        current = issue20_targets(results)
    except (KeyError, TypeError, ZeroDivisionError) as exc:
        print(f"\nTARGETS: cannot be computed from this run's figures ({type(exc).__name__}: {exc})")
        current = []
    mode = ("quick " if args.quick else "") + ("all" if set(args.only) == set(SCRIPTS) else " ".join(sorted(args.only)))
    pooled = history(args.history, mode, current, args.runs) if current else {}
    results["targets"] = print_targets(current, pooled, args.runs)
    print(f"  (history: {args.history}, mode {mode!r})")
    print(
        f"\nload average before {load_before}, after {results['load_average']['after']} "
        f"({os.cpu_count()} CPUs): above ~0.5 the figures include other processes' load"
    )
    print(f"run_all time {time.perf_counter() - started:.0f} s")
    results["other_checks"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
