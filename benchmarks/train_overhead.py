"""What does checkpointing every N steps cost a CPU training loop?

An MLP (``--layers`` hidden ``nn.Linear(hidden, hidden)``, ReLU, AdamW; ~130 MiB of state by
default, one step ~50-100 ms on 2 idle cores) trains with torch using every core (``--threads``),
saving its model and optimizer three ways:

    none    no checkpointing at all
    async   ``CheckpointManager(async_save=True, keep_last=2)``: ``save()`` snapshots, a
            background thread writes while training goes on (competing for the cores)
    sync    ``CheckpointManager(keep_last=2)``: ``save()`` writes and commits

Two measurements, because other processes' load on a shared machine drifts by more than the
effect being measured:

1. Whole runs: ``--steps`` steps with ``save_every_steps=--every``, each variant ``--reps``
   times round-robin; a fresh manager per run (the async one allocates its snapshot buffers
   at its first save, as in a real run), ending with ``mgr.close()`` so a run's time includes
   its last checkpoint being on disk. Overhead = median run time against ``none``.
2. Interleaved periods: one long loop of periods of ``--every`` steps; a period starts with
   an async save, a sync save or no save (rotating), and an async period ends with
   ``mgr.wait()`` (counted), so no write leaks into the next period. Drift hits all three
   kinds alike. A period's robust time is its median blocking + median wait + the median of
   each step position (1st step after the save, 2nd, ...) over the periods of its kind:
   overhead = that against the same sum without checkpointing. Load spikes from other
   processes (a step 10x slower now and then) hit few positions of few periods and drop
   out, as outliers do from a median; the mean-based figure, spikes included, is shown too.

    python benchmarks/train_overhead.py              # 200 steps x 3 variants + 3 x 15 periods: ~2-4 min
    python benchmarks/train_overhead.py --quick      # smaller model, 60 steps, 3 x 4 periods
    python benchmarks/train_overhead.py --threads 1  # train on one core, the writer gets the other
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from common import MIB, flat_tensors, machine, print_machine, remove, runstate, scratch_dir, write_json
from torch import nn

VARIANTS = ("none", "async", "sync")


@dataclass
class Run:
    """One whole run: its time, and per step the compute time and what save() blocked."""

    variant: str
    total: float = 0.0
    final_wait: float = 0.0
    compute: list[float] = field(default_factory=list)
    blocking: list[float] = field(default_factory=list)


def build(hidden: int, layers: int, d_in: int, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    mods: list[nn.Module] = [nn.Linear(d_in, hidden), nn.ReLU()]
    for _ in range(layers):
        mods += [nn.Linear(hidden, hidden), nn.ReLU()]
    mods.append(nn.Linear(hidden, d_in))
    model = nn.Sequential(*mods)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    """One step (autoencoder MSE); returns its seconds."""
    start = time.perf_counter()
    loss = (model(x) - x).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def whole_run(
    variant: str, model: nn.Module, opt: torch.optim.Optimizer, batches: list[torch.Tensor], args: Any, run_dir: str
) -> Run:
    run = Run(variant)
    state = {"model": model, "optimizer": opt}
    mgr = None
    if variant != "none":
        mgr = runstate.CheckpointManager(
            run_dir, async_save=variant == "async", save_every_steps=args.every, keep_last=2
        )
    gc.collect()
    os.sync()
    t0 = time.perf_counter()
    try:
        for step in range(1, args.steps + 1):
            run.compute.append(train_step(model, opt, batches[step % len(batches)]))
            if mgr is not None:
                s0 = time.perf_counter()
                if mgr.save(step, state):
                    run.blocking.append(time.perf_counter() - s0)
        loop_end = time.perf_counter()
        if mgr is not None:
            mgr.close()
        run.total = time.perf_counter() - t0
        run.final_wait = t0 + run.total - loop_end
    finally:
        if mgr is not None:
            mgr.close()
        remove(run_dir)
    return run


@dataclass
class Period:
    """One period of ``--every`` steps: its time, what save() blocked, each step, and mgr.wait()."""

    total: float
    blocked: float
    steps: list[float]
    waited: float


def periods(
    model: nn.Module, opt: torch.optim.Optimizer, batches: list[torch.Tensor], args: Any, work: str
) -> dict[str, list[Period]]:
    """Interleaved periods, rotating none / async / sync; the async ones end with mgr.wait()."""
    state = {"model": model, "optimizer": opt}
    managers = {
        "async": runstate.CheckpointManager(os.path.join(work, "p-async"), async_save=True, keep_last=2),
        "sync": runstate.CheckpointManager(os.path.join(work, "p-sync"), keep_last=2),
    }
    out: dict[str, list[Period]] = {v: [] for v in VARIANTS}
    step = 0
    try:
        for round_ in range(-1, args.periods):  # round -1 warms up (allocates the async buffers)
            order = VARIANTS[round_ % 3 :] + VARIANTS[: round_ % 3]
            for kind in order:
                gc.collect()
                t0 = time.perf_counter()
                mgr = managers.get(kind)
                if mgr is not None:
                    mgr.save(step + 1, state, force=True)
                blocked = time.perf_counter() - t0
                steps = []
                for _ in range(args.every):
                    step += 1
                    steps.append(train_step(model, opt, batches[step % len(batches)]))
                w0 = time.perf_counter()
                if mgr is not None:
                    mgr.wait()
                end = time.perf_counter()
                if round_ >= 0:
                    out[kind].append(Period(end - t0, blocked, steps, end - w0))
            if round_ >= 0:
                done = ", ".join(f"{k} {out[k][-1].total:.2f} s" for k in VARIANTS)
                print(f"  periods round {round_ + 1}/{args.periods}: {done}", flush=True)
    finally:
        for mgr in managers.values():
            mgr.close()
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ms(x: float) -> str:
    return "-" if x != x else f"{x * 1e3:.0f} ms"  # NaN: not applicable


def report_runs(runs: dict[str, list[Run]], args: Any) -> dict[str, Any]:
    base_step = median([s for r in runs["none"] for s in r.compute])
    base_total = median([r.total for r in runs["none"]])
    print(
        f"\nWHOLE RUNS: {args.steps} steps, save every {args.every}, {args.reps} rep(s) per variant, medians; "
        f"median step without checkpointing {base_step * 1e3:.1f} ms"
    )
    print(
        f"  {'':<7}{'total s':>9}{'overhead':>10}{'saves':>7}{'block 1st':>11}{'block rest':>12}{'final wait':>12}"
        f"{'step 1-5':>10}{'step 6+':>9}{'overheads of all reps':>26}"
    )
    result: dict[str, Any] = {"base_step_s": base_step, "base_total_s": base_total}
    for variant in VARIANTS:
        rs = runs[variant]
        near = [r.compute[i] for r in rs for i in range(len(r.compute)) if i >= args.every and i % args.every < 5]
        far = [r.compute[i] for r in rs for i in range(len(r.compute)) if i >= args.every and i % args.every >= 5]
        overheads = [(r.total - base_total) / base_total * 100 for r in rs]
        med = {
            "total_s": median([r.total for r in rs]),
            "totals_all_s": [r.total for r in rs],
            "overhead_pct": median(overheads),
            "overhead_pct_all": overheads,
            "saves": len(rs[0].blocking),
            "blocking_first_s": median([r.blocking[0] for r in rs if r.blocking]),
            "blocking_rest_s": median([b for r in rs for b in r.blocking[1:]]),
            "final_wait_s": median([r.final_wait for r in rs]),
            "step_1_5_s": median(near),
            "step_6_plus_s": median(far),
        }
        result[variant] = med
        all_reps = ", ".join(f"{o:+.1f}%" for o in overheads)
        overhead = "" if variant == "none" else f"{med['overhead_pct']:+.1f}%"
        print(
            f"  {variant:<7}{med['total_s']:>9.2f}{overhead:>10}{med['saves']:>7}{ms(med['blocking_first_s']):>11}"
            f"{ms(med['blocking_rest_s']):>12}{ms(med['final_wait_s']):>12}{ms(med['step_1_5_s']):>10}"
            f"{ms(med['step_6_plus_s']):>9}{all_reps if variant != 'none' else '':>26}"
        )
    return result


def robust_period(rows: list[Period]) -> tuple[float, float, float, list[float]]:
    """Median blocking, median wait and, per step position, the median step time over the periods.

    Their sum is a period's time with the other processes' load spikes (which hit a few steps
    of a few periods, tens of times over) left out, the way a median leaves out outliers.
    """
    positions = [median([r.steps[k] for r in rows]) for k in range(len(rows[0].steps))]
    return median([r.blocked for r in rows]), median([r.waited for r in rows]), sum(positions), positions


def report_periods(data: dict[str, list[Period]], args: Any) -> dict[str, Any]:
    n = len(data["none"])
    base_mean = statistics.mean(r.total for r in data["none"])
    _, _, base_steps, base_pos = robust_period(data["none"])
    print(
        f"\nINTERLEAVED PERIODS: {n} periods of {args.every} steps per kind, rotating none/async/sync; "
        f"without checkpointing a period takes {base_steps:.3f} s (sum of per-step medians; mean {base_mean:.3f} s)"
    )
    shown = sorted({1, 2, 3, 5, 10, args.every} & set(range(1, args.every + 1)))
    head = "".join(f"{f'step {k}':>9}" for k in shown)
    print(
        f"  {'':<7}{'overhead':>10}{'blocks':>9}{'slower steps':>14}{'wait':>9}{'mean-based':>12}"
        f"{'periods min..max s':>20}{head}"
    )
    result: dict[str, Any] = {"periods": n, "base_period_s": base_steps, "base_period_mean_s": base_mean}
    for kind in VARIANTS:
        rows = data[kind]
        block, wait, steps, pos = robust_period(rows)
        robust = (block + steps + wait - base_steps) / base_steps * 100
        mean = statistics.mean(r.total for r in rows)
        by_pos = {k: (pos[k - 1] / base_pos[k - 1] - 1) * 100 for k in shown}
        result[kind] = {
            "overhead_pct": robust,
            "overhead_mean_pct": (mean - base_mean) / base_mean * 100,
            "blocking_median_s": block,
            "wait_median_s": wait,
            "slower_steps_s": steps - base_steps,
            "step_slowdown_pct_by_position": by_pos,
            "periods_all_s": [r.total for r in rows],
        }
        if kind == "none":
            continue
        r = result[kind]
        spread = f"{min(r['periods_all_s']):.2f}..{max(r['periods_all_s']):.2f}"
        print(
            f"  {kind:<7}{robust:>+9.1f}%{ms(block):>9}{ms(steps - base_steps):>14}{ms(wait):>9}"
            f"{r['overhead_mean_pct']:>+11.1f}%{spread:>20}" + "".join(f"{by_pos[k]:>+8.0f}%" for k in shown)
        )
    none = [r.total for r in data["none"]]
    print(f"  {'none':<7}{'':>54}{f'{min(none):.2f}..{max(none):.2f}':>20}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps per whole run (default 200)")
    parser.add_argument("--every", type=int, default=20, help="save every N steps (default 20)")
    parser.add_argument("--reps", type=int, default=None, help="whole runs per variant (default 1; 0 skips)")
    parser.add_argument("--periods", type=int, default=None, help="interleaved periods per kind (default 15; 0 skips)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden width (default 1792)")
    parser.add_argument("--layers", type=int, default=3, help="hidden Linear(hidden, hidden) layers (default 3)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every CPU)")
    parser.add_argument("--quick", action="store_true", help="smoke run: hidden 1024, 60 steps, 4 periods")
    parser.add_argument("--dir", default=None, help="scratch directory (default ROOT/.bench-tmp)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    args.steps = args.steps or (60 if args.quick else 200)
    args.reps = args.reps if args.reps is not None else 1
    args.periods = args.periods if args.periods is not None else (4 if args.quick else 15)
    args.hidden = args.hidden or (1024 if args.quick else 1792)
    started = time.perf_counter()
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    d_in = 512
    model, opt = build(args.hidden, args.layers, d_in)
    torch.manual_seed(1)
    batches = [torch.randn(args.batch, d_in) for _ in range(8)]
    for x in batches[:5]:  # warm up: optimizer state exists, allocator and threads are warm
        train_step(model, opt, x)
    nbytes = sum(t.nbytes for t in flat_tensors(model, opt).values())
    n_params = sum(p.numel() for p in model.parameters())
    gc.collect()
    gc.freeze()
    result: dict[str, Any] = {"nbytes": nbytes}
    with scratch_dir(args.dir, 4 * nbytes, "train-") as work:
        print(
            f"train_overhead: MLP {d_in}-{args.hidden}x{args.layers}-{d_in} + AdamW ({n_params / 1e6:.1f}M params, "
            f"state {nbytes / MIB:.0f} MiB), batch {args.batch}, {torch.get_num_threads()} torch threads"
        )
        print_machine(work)
        if args.reps:
            runs: dict[str, list[Run]] = {v: [] for v in VARIANTS}
            for rep in range(args.reps):
                order = VARIANTS[rep % 3 :] + VARIANTS[: rep % 3]  # rotate, so no variant always runs first
                for variant in order:
                    runs[variant].append(whole_run(variant, model, opt, batches, args, os.path.join(work, "run")))
                    print(f"  whole run {rep + 1}/{args.reps} {variant}: {runs[variant][-1].total:.2f} s", flush=True)
            result["whole_runs"] = report_runs(runs, args)
        if args.periods:
            result["periods"] = report_periods(periods(model, opt, batches, args, work), args)
    print(
        "\nblock = time save() blocked the loop (1st: a run's first save; async: it allocates the snapshot buffers);"
        "\nstep 1-5 / 6+ = median step time 1-5 and 6+ steps after a save, without save() itself;"
        "\nperiods: overhead = (median blocking + per-position median steps + median wait) against the same"
        "\n  sums without checkpointing (robust to load spikes); mean-based = mean period times, spikes included;"
        "\n  slower steps = extra step time in the period; wait = mgr.wait() for a write that outlasted the steps;"
        "\n  step k = how much slower the k-th step after a save is than the k-th step of a period without one."
    )
    write_json(args.json, {"benchmark": "train_overhead", "machine": machine(), "args": vars(args), **result})
    print(f"train_overhead time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
