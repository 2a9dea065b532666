"""Does the cost of runstate.save / runstate.load grow linearly with the bytes, and what does a tensor cost?

Part 1, bytes: the AdamW state of ``save_load.py`` at ~0.1, ~0.75, ~2 and ~4 GiB. Per size, in
one round-robin: raw write (os.write + fsync, the limit), runstate.save, then raw read and
runstate.load in place from a cold page cache (when it can be dropped) and warm. The load
restores into the saved model and optimizer themselves (same values; ``save_load.py`` checks
restores into a second copy): at 4 GiB a second copy would double the memory. Printed:
seconds, GB/s, ``vs raw`` (raw time / time), and a least-squares line
``seconds = fixed + GiB / rate`` over the sizes: linear cost means a small fixed part and the
same GB/s at every size. The growth figure of issue 20's target 7 is runstate's time per byte
relative to the raw I/O's at the largest size over the same at ~0.75 GiB (1.00: runstate stays
the same multiple of the hardware's own cost; the disk's and memory's speed changes with size
are in both). The raw references: the raw write (save), the raw read into fresh buffers (cold
load) and the raw read straight into the live tensors (warm load, where fresh memory, slow on
VMs, would otherwise dominate the reference).

Part 1b, tensor count: ``--count-mib`` MiB (default 8) split into 10, 100, 1,000 and 10,000
float32 tensors of a dict, saved (durable) and restored in place (warm), next to torch.save
and torch.load, round-robin. Growth = the extra time per tensor going from 10 to 10,000
tensors over the same from 10 to 1,000 (1.00 = each tensor costs the same however many there are).

``--plot PATH`` draws both curves (``make bench``: docs/perf-scale.png).

Part 2, tensors: 10,000 tiny tensors (64 float32 each, 2.4 MiB in all), durable save and
restore, next to one tensor of the same bytes, torch.save / torch.load and safetensors:

    dict     ``{"t00000": tensor, ...}`` saved as one item, loaded back into a dict of the same keys
    model    an ``nn.ParameterList`` of 2,500 parameters + AdamW after one step (param, exp_avg,
             exp_avg_sq and step per parameter: 10,000 tensors), restored in place

``per tensor`` = (time with 10,000 tensors - time with one tensor of the same bytes) / 10,000.

    python benchmarks/scale.py                 # 0.1, 0.75, 2, 4 GiB (2 and 4: 1 rep), counts, tiny tensors
    python benchmarks/scale.py --quick         # 0.05 and 0.2 GiB, 2 reps
    python benchmarks/scale.py --sizes 0.1 0.75 --no-tiny --plot /tmp/scale.png
    python benchmarks/scale.py --sizes 0.1 0.5 1 4 --reps 3 --reps-large 2
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Any

import numpy as np
import torch
from common import (
    GIB,
    N_LAYERS,
    Op,
    build_state,
    drop_caches,
    flat_tensors,
    fresh_copy,
    fsync_dir,
    fsync_path,
    machine,
    op_record,
    print_machine,
    print_table,
    raw_read,
    raw_read_into,
    raw_write,
    remove,
    run_loads,
    run_saves,
    runstate,
    same_state,
    scratch_dir,
    write_json,
)
from safetensors.torch import load_file, save_file
from torch import nn

N_TINY = 10_000
TINY_NUMEL = 64


def torch_save(path: str, obj: Any) -> None:
    with open(path, "xb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(os.path.dirname(path))


def safetensors_save(path: str, flat: dict[str, torch.Tensor]) -> None:
    save_file(flat, path)
    fsync_path(path)
    fsync_dir(os.path.dirname(path))


# --------------------------------------------------------------------------- part 1: bytes


def one_size(gib: float, reps: int, work: str, cold: bool) -> dict[str, Any]:
    model, opt, width = build_state(gib)
    flat = flat_tensors(model, opt)
    tensors = list(flat.values())
    sizes = [t.nbytes for t in tensors]
    nbytes = sum(sizes)
    state = {"model": model, "optimizer": opt}
    p_raw = os.path.join(work, "raw.bin")
    p_rs = os.path.join(work, "runstate-ckpt")
    saves = [
        Op("raw write (os.write+fsync)", lambda: raw_write(p_raw, tensors), p_raw),
        Op("runstate.save", lambda: runstate.save(p_rs, state, step=1), p_rs),
    ]
    run_saves(saves, reps)
    if gib < 1:  # a second copy to restore into, to check the bytes (save_load.py does it at 0.75 GiB)
        model2, opt2 = fresh_copy(width)
        runstate.load(p_rs, {"model": model2, "optimizer": opt2})
        if not same_state(flat_tensors(model2, opt2), flat):
            raise SystemExit(f"error: runstate.load did not restore the {gib} GiB state")
        del model2, opt2
    del flat
    gc.collect()

    def loads() -> list[Op]:
        return [
            Op("raw read (readinto)", lambda: raw_read(p_raw, sizes)),
            Op("raw read into live tensors", lambda: raw_read_into(p_raw, list(flat_tensors(model, opt).values()))),
            Op("runstate.load (in place)", lambda: runstate.load(p_rs, state)),
        ]

    cold_loads = loads() if cold else []
    if cold:
        run_loads(cold_loads, reps, cold=True)
    warm_loads = loads()
    run_loads(warm_loads, reps, cold=False)
    title = f"~{gib:g} GiB: {nbytes / GIB:.3f} GiB, {N_LAYERS} x nn.Linear({width}, {width}) + AdamW, {reps} rep(s)"
    print_table(f"{title}: SAVE", saves, nbytes, saves[0])
    if cold:
        print_table(f"{title}: LOAD cold", cold_loads, nbytes, cold_loads[0])
    print_table(f"{title}: LOAD warm", warm_loads, nbytes, warm_loads[0])
    remove(p_raw)
    remove(p_rs)
    return {
        "gib": gib,
        "nbytes": nbytes,
        "reps": reps,
        "save": {op.name: op_record(op, nbytes, saves[0]) for op in saves},
        "load_cold": {op.name: op_record(op, nbytes, cold_loads[0]) for op in cold_loads},
        "load_warm": {op.name: op_record(op, nbytes, warm_loads[0]) for op in warm_loads},
    }


def fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least squares ``seconds = fixed + bytes / rate``: (fixed seconds, rate GB/s)."""
    if len(points) < 2:
        return None
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    slope, fixed = np.polyfit(x, y, 1)
    return float(fixed), float(1 / slope / 1e9) if slope > 0 else float("inf")


def print_linearity(results: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [
        ("save", "raw write (os.write+fsync)"),
        ("save", "runstate.save"),
        ("load_cold", "raw read (readinto)"),
        ("load_cold", "runstate.load (in place)"),
        ("load_warm", "raw read (readinto)"),
        ("load_warm", "runstate.load (in place)"),
    ]
    print("\nLINEARITY: GB/s at each size, and the fit seconds = fixed + bytes / rate")
    sizes = "".join(f"{r['nbytes'] / GIB:>9.2f}G" for r in results)
    print(f"  {'':<38}{sizes}{'fixed s':>10}{'rate GB/s':>11}")
    out: dict[str, Any] = {}
    for table, name in rows:
        got = [r for r in results if name in r[table]]
        if not got:
            continue
        points = [(r["nbytes"], r[table][name]["median_s"]) for r in got]
        line = f"  {table.replace('_', ' ') + ': ' + name:<38}"
        line += "".join(f"{r[table][name]['gbps']:>10.2f}" for r in got)
        fitted = fit(points)
        if fitted:
            line += f"{fitted[0]:>10.3f}{fitted[1]:>11.2f}"
        print(line)
        out[f"{table}: {name}"] = {"points": points, "fixed_s": fitted and fitted[0], "rate_gbps": fitted and fitted[1]}
    return out


GROWTH_ROWS = (
    ("save", "runstate.save", "raw write (os.write+fsync)"),
    ("load_cold", "runstate.load (in place)", "raw read (readinto)"),
    ("load_warm", "runstate.load (in place)", "raw read into live tensors"),  # target 4's floor: no fresh memory
)


def size_growth(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per row: runstate's time over the raw I/O's at each size, and that at the largest size over ~0.75 GiB.

    1.00 means runstate's cost grows with the bytes exactly as the raw write or read of the same
    bytes does; above 1, runstate's time per byte grows faster than the hardware's.
    """
    out: dict[str, Any] = {}
    for table, name, ref in GROWTH_ROWS:
        got = [r for r in results if name in r[table] and ref in r[table]]
        if len(got) < 2:
            continue
        rel = [r[table][name]["median_s"] / r[table][ref]["median_s"] for r in got]
        base = min(range(len(got) - 1), key=lambda i: abs(got[i]["gib"] - 0.75))  # not the largest itself
        out[table] = {
            "gib": [r["gib"] for r in got],
            "time_over_raw": rel,
            "base_gib": got[base]["gib"],
            "largest_gib": got[-1]["gib"],
            "growth": rel[-1] / rel[base],
        }
    return out


def count_sweep(total_mib: float, counts: list[int], reps: int, work: str) -> dict[str, Any]:
    """The same bytes as 10 ... 10,000 float32 tensors: durable save and warm in-place restore."""
    numel = int(total_mib * 2**20 / 4)
    states = {n: {f"t{i:05d}": torch.randn(numel // n) for i in range(n)} for n in counts}
    # a plain dict item is replaced by the stored one (modules and optimizers are restored in place)
    targets = {n: {"t": {k: torch.zeros_like(v) for k, v in st.items()}} for n, st in states.items()}
    saves: list[Op] = []
    loads: list[Op] = []
    for n in counts:
        rs, pt = os.path.join(work, f"count-{n}"), os.path.join(work, f"count-{n}.pt")
        saves.append(Op(f"runstate.save, {n} tensors", lambda rs=rs, n=n: runstate.save(rs, {"t": states[n]}), rs))
        saves.append(Op(f"torch.save, {n} tensors", lambda pt=pt, n=n: torch_save(pt, states[n]), pt))
        loads.append(Op(f"runstate.load, {n} tensors", lambda rs=rs, n=n: runstate.load(rs, targets[n])))
        loads.append(Op(f"torch.load, {n} tensors", lambda pt=pt: torch.load(pt, weights_only=True)))
    run_saves(saves, reps)
    run_loads(loads, reps, cold=False)
    if not all(torch.equal(targets[n]["t"][k], v) for n in counts for k, v in states[n].items()):
        raise SystemExit("error: runstate.load did not restore the tensors of the count sweep")
    nbytes = numel * 4
    title = f"TENSOR COUNT: {total_mib:g} MiB as {', '.join(f'{n:,}' for n in counts)} float32 tensors, {reps} reps"
    print_table(f"{title}: SAVE (durable)", saves, nbytes, None, ref_label="")
    print_table(f"{title}: LOAD (warm, in place)", loads, nbytes, None, ref_label="")
    med = {op.name: op.median() for op in [*saves, *loads]}
    rows: dict[str, Any] = {}
    lo, mid, hi = counts[0], counts[-2], counts[-1]
    print(f"\nPER-TENSOR COST from {lo:,} tensors, microseconds (growth = to {hi:,} / to {mid:,})")
    for label in ("runstate.save", "torch.save", "runstate.load", "torch.load"):
        t = [med[f"{label}, {n} tensors"] for n in counts]
        per_mid = (t[-2] - t[0]) / (mid - lo)
        per_hi = (t[-1] - t[0]) / (hi - lo)
        growth = per_hi / per_mid if per_mid > 0 else float("inf")
        rows[label] = {"counts": counts, "seconds": t, "per_tensor_us": [per_mid * 1e6, per_hi * 1e6], "growth": growth}
        print(
            f"  {label:<16} to {mid:,}: {per_mid * 1e6:>7.1f} us   to {hi:,}: {per_hi * 1e6:>7.1f} us   growth {growth:.2f}"
        )
    for path in [op.path for op in saves]:
        remove(path)
    return {"total_mib": total_mib, "reps": reps, "rows": rows}


def plot(path: str, sizes: list[dict[str, Any]], counts: dict[str, Any] | None, title: str) -> None:
    """Seconds against GiB (saves and loads next to the raw I/O) and against the tensor count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if counts else 1, figsize=(12 if counts else 6.5, 4.6), squeeze=False)
    ax = axes[0][0]
    lines = (
        ("save", "raw write (os.write+fsync)", "raw write + fsync", "C0", "--"),
        ("save", "runstate.save", "runstate.save (durable)", "C0", "-"),
        ("load_cold", "raw read (readinto)", "raw read, cold", "C1", "--"),
        ("load_cold", "runstate.load (in place)", "runstate.load in place, cold", "C1", "-"),
        ("load_warm", "raw read into live tensors", "raw read into live tensors, warm", "C2", "--"),
        ("load_warm", "runstate.load (in place)", "runstate.load in place, warm", "C2", "-"),
    )
    for table, name, label, color, style in lines:
        got = [r for r in sizes if name in r[table]]
        if got:
            xs = [r["nbytes"] / GIB for r in got]
            ax.plot(xs, [r[table][name]["median_s"] for r in got], style, marker="o", color=color, label=label)
    ax.set_xlabel("state size, GiB (model + AdamW)")
    ax.set_ylabel("seconds (median)")
    ax.set_title("time vs state size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if counts:
        ax = axes[0][1]
        for label, color, style in (
            ("runstate.save", "C0", "-"),
            ("torch.save", "C0", "--"),
            ("runstate.load", "C2", "-"),
            ("torch.load", "C2", "--"),
        ):
            row = counts["rows"][label]
            ax.plot(row["counts"], row["seconds"], style, marker="o", color=color, label=label)
        row = counts["rows"]["runstate.save"]
        n_hi, t_hi = row["counts"][-1], row["seconds"][-1]
        ref = [t_hi * n / n_hi for n in row["counts"]]
        ax.plot(row["counts"], ref, ":", color="gray", label="proportional to the count")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"tensors ({counts['total_mib']:g} MiB in all)")
        ax.set_ylabel("seconds (median)")
        ax.set_title("time vs tensor count (same bytes)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


# --------------------------------------------------------------------------- part 2: tensors


def tiny_model(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.ParameterList([nn.Parameter(torch.randn(TINY_NUMEL)) for _ in range(N_TINY // 4)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sum(p.square().sum() for p in model).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def torch_load_into(path: str, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    sd = torch.load(path, weights_only=True)
    model.load_state_dict(sd["model"])
    opt.load_state_dict(sd["optimizer"])


def tiny(reps: int, work: str) -> dict[str, Any]:
    torch.manual_seed(0)
    many = {f"t{i:05d}": torch.randn(TINY_NUMEL) for i in range(N_TINY)}
    one = {"t": torch.randn(N_TINY * TINY_NUMEL)}
    nbytes = N_TINY * TINY_NUMEL * 4
    template = {k: torch.zeros_like(v) for k, v in many.items()}
    template_one = {"t": torch.zeros_like(one["t"])}
    model, opt = tiny_model(0)
    model2, opt2 = tiny_model(1)
    n_model = len(flat_tensors(model, opt))

    p = {k: os.path.join(work, k) for k in ("raw", "rs", "rs1", "rsm", "pt", "pt1", "ptm", "st", "st1")}
    many_list = list(many.values())
    saves = [
        Op("raw write of the bytes (1 file)", lambda: raw_write(p["raw"], many_list), p["raw"]),
        Op("runstate.save dict, 1 tensor", lambda: runstate.save(p["rs1"], {"tensors": one}), p["rs1"]),
        Op(f"runstate.save dict, {N_TINY} tensors", lambda: runstate.save(p["rs"], {"tensors": many}), p["rs"]),
        Op("torch.save dict, 1 tensor", lambda: torch_save(p["pt1"], one), p["pt1"]),
        Op(f"torch.save dict, {N_TINY} tensors", lambda: torch_save(p["pt"], many), p["pt"]),
        Op("safetensors dict, 1 tensor", lambda: safetensors_save(p["st1"], one), p["st1"]),
        Op(f"safetensors dict, {N_TINY} tensors", lambda: safetensors_save(p["st"], many), p["st"]),
        Op(
            f"runstate.save model+AdamW, {n_model} t.",
            lambda: runstate.save(p["rsm"], {"model": model, "optimizer": opt}),
            p["rsm"],
        ),
        Op(
            f"torch.save model+AdamW, {n_model} t.",
            lambda: torch_save(p["ptm"], {"model": model.state_dict(), "optimizer": opt.state_dict()}),
            p["ptm"],
        ),
    ]
    run_saves(saves, reps)
    loads = [
        Op("runstate.load dict, 1 tensor", lambda: runstate.load(p["rs1"], {"tensors": dict(template_one)})),
        Op(f"runstate.load dict, {N_TINY} tensors", lambda: runstate.load(p["rs"], {"tensors": dict(template)})),
        Op("torch.load dict, 1 tensor", lambda: torch.load(p["pt1"], weights_only=True)),
        Op(f"torch.load dict, {N_TINY} tensors", lambda: torch.load(p["pt"], weights_only=True)),
        Op("safetensors dict, 1 tensor", lambda: load_file(p["st1"])),
        Op(f"safetensors dict, {N_TINY} tensors", lambda: load_file(p["st"])),
        Op(
            f"runstate.load model+AdamW, {n_model} t.",
            lambda: runstate.load(p["rsm"], {"model": model2, "optimizer": opt2}),
        ),
        Op(f"torch.load+lsd model+AdamW, {n_model} t.", lambda: torch_load_into(p["ptm"], model2, opt2)),
    ]
    run_loads(loads, reps, cold=False)
    if not same_state(flat_tensors(model2, opt2), flat_tensors(model, opt)):
        raise SystemExit("error: runstate.load did not restore the tiny-tensor model")

    def per_tensor(ops: list[Op], many_name: str, one_name: str) -> float:
        by = {op.name: op.median() for op in ops}
        return (by[many_name] - by[one_name]) / N_TINY * 1e6

    title = f"{N_TINY} TINY TENSORS ({TINY_NUMEL} float32 each, {nbytes / 2**20:.1f} MiB), {reps} reps"
    print_table(f"{title}: SAVE (durable)", saves, nbytes, saves[0])
    print_table(f"{title}: LOAD (warm page cache)", loads, nbytes, None, ref_label="")
    per = {
        "runstate save": per_tensor(saves, saves[2].name, saves[1].name),
        "torch.save": per_tensor(saves, saves[4].name, saves[3].name),
        "safetensors save": per_tensor(saves, saves[6].name, saves[5].name),
        "runstate load": per_tensor(loads, loads[1].name, loads[0].name),
        "torch.load": per_tensor(loads, loads[3].name, loads[2].name),
        "safetensors load": per_tensor(loads, loads[5].name, loads[4].name),
    }
    by = {op.name: op.median() for op in [*saves, *loads]}
    per["runstate save model+AdamW (whole, per tensor)"] = by[saves[7].name] / n_model * 1e6
    per["torch.save model+AdamW (whole, per tensor)"] = by[saves[8].name] / n_model * 1e6
    per["runstate load model+AdamW (whole, per tensor)"] = by[loads[6].name] / n_model * 1e6
    per["torch.load+lsd model+AdamW (whole, per tensor)"] = by[loads[7].name] / n_model * 1e6
    print("\nPER-TENSOR COST, microseconds (dict: extra time of 10,000 tensors over 1 tensor of the same bytes)")
    for name, us in per.items():
        print(f"  {name:<48}{us:>8.1f} us")
    for path in p.values():
        remove(path)
    return {
        "nbytes": nbytes,
        "reps": reps,
        "save": {op.name: op_record(op, nbytes, saves[0]) for op in saves},
        "load_warm": {op.name: op_record(op, nbytes, None) for op in loads},
        "per_tensor_us": per,
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=None, help="state sizes in GiB (0.1 0.75 2 4)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 0.05 and 0.2 GiB, 2 reps")
    parser.add_argument("--reps", type=int, default=None, help="runs per operation below 1 GiB (default 3)")
    parser.add_argument("--reps-large", type=int, default=1, help="runs per operation from 1 GiB up (default 1)")
    parser.add_argument("--dir", default=None, help="scratch directory on the disk to test (default ROOT/.bench-tmp)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-page-cache loads")
    parser.add_argument("--no-tiny", action="store_true", help="skip the 10,000 tiny tensors")
    parser.add_argument("--counts", type=int, nargs="*", default=None, help="tensor counts (10 100 1000 10000)")
    parser.add_argument("--count-mib", type=float, default=8.0, help="MiB split into --counts tensors (default 8)")
    parser.add_argument("--plot", default=None, help="draw the curves into this PNG (matplotlib, Agg)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    sizes = args.sizes or ([0.05, 0.2] if args.quick else [0.1, 0.75, 2.0, 4.0])
    reps = args.reps or (2 if args.quick else 3)
    counts = args.counts if args.counts is not None else ([10, 100, 1000] if args.quick else [10, 100, 1000, 10_000])
    if counts and (len(counts) < 3 or sorted(counts) != counts):
        parser.error("--counts needs at least 3 counts in increasing order (or none to skip)")
    started = time.perf_counter()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    gc.collect()
    gc.freeze()
    with scratch_dir(args.dir, int(3 * max(sizes) * GIB), "scale-") as work:
        cold = not args.no_cold and drop_caches() is None
        print(f"scale: runstate save/load at {', '.join(f'~{s:g}' for s in sizes)} GiB; cold loads: {cold}")
        print_machine(work)
        results = []
        for s in sizes:
            results.append(one_size(s, reps if s < 1 else args.reps_large, work, cold))
            gc.collect()
        linearity = print_linearity(results)
        growth = size_growth(results)
        if growth:
            print("\nGROWTH WITH SIZE: runstate time / raw I/O time at each size; growth = largest size / ~0.75 GiB")
            for table, g in growth.items():
                cells = "  ".join(f"{x:g} GiB {r:.2f}" for x, r in zip(g["gib"], g["time_over_raw"]))
                print(f"  {table.replace('_', ' '):<10} {cells}   growth {g['growth']:.2f}")
        count_result = count_sweep(args.count_mib, counts, max(reps, 5), work) if counts else None
        tiny_result = None if args.no_tiny else tiny(max(reps, 5), work)
    if args.plot:
        m = machine()
        title = (
            f"runstate {runstate.__version__} ({m['source']}); {m['cpu']}; load average at start {m['load average']}"
        )
        plot(args.plot, results, count_result, title)
    write_json(
        args.json,
        {
            "benchmark": "scale",
            "machine": machine(),
            "sizes": results,
            "linearity": linearity,
            "growth": growth,
            "counts": count_result,
            "tiny": tiny_result,
        },
    )
    print(f"scale time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
