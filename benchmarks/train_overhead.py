"""What does checkpointing every N steps cost a CPU training loop?

An MLP (``--layers`` hidden ``nn.Linear(hidden, hidden)``, ReLU, AdamW; ~130 MiB of state by
default, one step ~50-100 ms on 2 idle cores) trains with torch using every core (``--threads``),
saving its model and optimizer three ways:

    none    no checkpointing at all
    async   ``CheckpointManager(async_save=True, keep_last=2)``: ``save()`` snapshots, a
            background thread writes while training goes on (competing for the cores)
    sync    ``CheckpointManager(keep_last=2)``: ``save()`` writes and commits

and, in the interleaved periods only (``--variants`` picks them):

    dcp-thread   ``torch.distributed.checkpoint.async_save`` (thread mode, DCP's default: it
                 stages into new memory at each save), keeping the last 2
    dcp-process  the same in process mode, one ``DefaultStager`` kept across saves (shared
                 memory, staging in a background thread; pinned memory needs an accelerator)

A third measurement (target 3 of issue 20): the first save of a fresh async manager, with
and without ``mgr.warmup(state)`` before it, against ``[t.clone() for t in tensors]`` of the
same state, ``--first-reps`` rounds (rotating), in the same process.

The last line is machine-readable: ``TRAIN_OVERHEAD_SUMMARY {json}`` (see ``summary()``).

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

    python benchmarks/train_overhead.py              # 200 steps x 3 variants + 6 x 15 periods: ~4-6 min
    python benchmarks/train_overhead.py --quick      # smaller model, 60 steps, 3 x 4 periods
    python benchmarks/train_overhead.py --threads 1  # train on one core, the writer gets the other
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from common import (
    MIB,
    flat_tensors,
    fsync_dir,
    load_average,
    machine,
    output_to,
    print_machine,
    remove,
    runstate,
    scratch_dir,
    write_json,
)
from torch import nn

VARIANTS = ("none", "async", "sync")  # the whole runs
PERIOD_KINDS = ("none", "async", "sync", "dcp-thread", "dcp-process")


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


class DcpAsync:
    """``torch.distributed.checkpoint.async_save`` of the model and optimizer, like a manager:
    ``save`` returns once the state is staged, ``wait`` collects the upload, fsyncs the
    checkpoint directory and its parent (DCP fsyncs its files) and keeps the last 2."""

    def __init__(self, run_dir: str, model: nn.Module, opt: torch.optim.Optimizer, *, process: bool) -> None:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.run_dir, self.model, self.opt, self.process = run_dir, model, opt, process
        os.makedirs(run_dir, exist_ok=True)
        # process mode: one stager kept across saves (not pinned: no accelerator), shared memory, async staging
        self.stager = DefaultStager(StagingOptions(False, True, True, False)) if process else None
        self.pending: tuple[Any, str] | None = None
        self.kept: list[str] = []
        self.group = False

    def save(self, step: int) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse

        self.wait()
        path = os.path.join(self.run_dir, f"step-{step}")
        quiet: Any = contextlib.nullcontext()
        if self.process and not self.group:  # DCP's checkpoint process reads a group's rank when it starts
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
            self.group = True
            quiet = output_to(os.path.join(os.path.dirname(self.run_dir), "dcp-process.log"))  # it logs at INFO
        msd, osd = get_state_dict(self.model, self.opt)
        kind = AsyncCheckpointerType.PROCESS if self.process else AsyncCheckpointerType.THREAD
        extra: dict[str, Any] = {} if self.stager is None else {"async_stager": self.stager}
        with quiet:
            response = dcp.async_save(
                {"model": msd, "optim": osd}, checkpoint_id=path, async_checkpointer_type=kind, **extra
            )
        if isinstance(response, AsyncSaveResponse):
            response.staging_completion.result()
            response = response.upload_completion
        self.pending = (response, path)

    def wait(self) -> None:
        if self.pending is None:
            return
        upload, path = self.pending
        self.pending = None
        upload.result()
        fsync_dir(path)
        fsync_dir(self.run_dir)
        self.kept.append(path)
        while len(self.kept) > 2:
            remove(self.kept.pop(0))

    def close(self) -> None:
        import torch.distributed as dist

        try:
            self.wait()
        finally:
            if self.stager is not None:
                self.stager.close()
            if self.group and dist.is_initialized():
                dist.destroy_process_group()
            self.group = False


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Saving:
    """One kind of periodic checkpointing: ``save(step)`` (blocks for what it blocks), ``wait()``."""

    def __init__(self, kind: str, model: nn.Module, opt: torch.optim.Optimizer, work: str) -> None:
        self.kind = kind
        self.state = {"model": model, "optimizer": opt}
        self.mgr: Any = None
        self.dcp: DcpAsync | None = None
        where = os.path.join(work, f"p-{kind}")
        if kind.startswith("dcp-"):
            self.dcp = DcpAsync(where, model, opt, process=kind == "dcp-process")
        elif kind != "none":
            if kind == "sync":
                self.mgr = runstate.CheckpointManager(where, keep_last=2)
            else:
                self.mgr = runstate.CheckpointManager(where, async_save=True, keep_last=2)
                self.mgr.warmup(self.state)

    def save(self, step: int) -> None:
        if self.mgr is not None:
            self.mgr.save(step, self.state, force=True)
        elif self.dcp is not None:
            self.dcp.save(step)

    def wait(self) -> None:
        if self.mgr is not None:
            self.mgr.wait()
        elif self.dcp is not None:
            self.dcp.wait()

    def close(self) -> None:
        if self.mgr is not None:
            self.mgr.close()
        elif self.dcp is not None:
            self.dcp.close()


def periods(
    model: nn.Module, opt: torch.optim.Optimizer, batches: list[torch.Tensor], args: Any, work: str
) -> dict[str, list[Period]]:
    """Interleaved periods, rotating the kinds; every period ends with its saver's wait()."""
    kinds = args.variants
    savers: dict[str, Saving] = {}
    out: dict[str, list[Period]] = {v: [] for v in kinds}
    step = 0
    try:
        for kind in list(kinds):
            try:
                savers[kind] = Saving(kind, model, opt, work)
                if kind.startswith("dcp-"):  # DCP's first save (its process starts): left out if it cannot run here
                    savers[kind].save(0)
                    savers[kind].wait()
            except Exception as exc:
                if not kind.startswith("dcp-"):
                    raise
                print(f"  {kind} left out: {exc!r}", flush=True)
                if kind in savers:
                    with contextlib.suppress(Exception):
                        savers.pop(kind).close()
                kinds = [k for k in kinds if k != kind]
                del out[kind]
        for round_ in range(-1, args.periods):  # round -1 warms up (DCP's process starts, first stagings)
            order = kinds[round_ % len(kinds) :] + kinds[: round_ % len(kinds)]
            for kind in order:
                gc.collect()
                t0 = time.perf_counter()
                savers[kind].save(step + 1)
                blocked = time.perf_counter() - t0
                steps = []
                for _ in range(args.every):
                    step += 1
                    steps.append(train_step(model, opt, batches[step % len(batches)]))
                w0 = time.perf_counter()
                savers[kind].wait()
                end = time.perf_counter()
                if round_ >= 0:
                    out[kind].append(Period(end - t0, blocked, steps, end - w0))
            if round_ >= 0:
                done = ", ".join(f"{k} {out[k][-1].total:.2f} s" for k in kinds)
                print(f"  periods round {round_ + 1}/{args.periods}: {done}", flush=True)
    finally:
        for saver in savers.values():
            saver.close()
    return out


def first_saves(model: nn.Module, opt: torch.optim.Optimizer, args: Any, work: str) -> dict[str, Any]:
    """The first async save of a fresh manager (cold, and after ``warmup``) against a clone of the state."""
    state = {"model": model, "optimizer": opt}
    kinds = ("clone", "cold", "warm")
    got: dict[str, list[float]] = {k: [] for k in kinds}
    warmups: list[float] = []
    for rep in range(args.first_reps):
        for kind in kinds[rep % 3 :] + kinds[: rep % 3]:
            gc.collect()
            if kind == "clone":
                tensors = list(flat_tensors(model, opt).values())
                t0 = time.perf_counter()
                copies = [t.clone() for t in tensors]
                got[kind].append(time.perf_counter() - t0)
                del copies, tensors
                continue
            run_dir = os.path.join(work, "first")
            mgr = runstate.CheckpointManager(run_dir, async_save=True)
            try:
                if kind == "warm":
                    w0 = time.perf_counter()
                    mgr.warmup(state)
                    warmups.append(time.perf_counter() - w0)
                t0 = time.perf_counter()
                mgr.save(1, state, force=True)
                got[kind].append(time.perf_counter() - t0)
            finally:
                mgr.close()
                remove(run_dir)
    clone = median(got["clone"])
    print(f"\nFIRST ASYNC SAVE of a fresh manager, {args.first_reps} rounds (rotating), medians (range):")
    result: dict[str, Any] = {"reps": args.first_reps}
    for kind in kinds:
        xs = got[kind]
        paired = [x / c for x, c in zip(xs, got["clone"])]
        result[kind] = {"median_s": median(xs), "all_s": xs, "vs_clone": median(xs) / clone, "paired_vs_clone": paired}
        label = {"clone": "clone of the state", "cold": "first save()", "warm": "first save() after warmup()"}[kind]
        print(
            f"  {label:<30}{ms(median(xs)):>9}  ({ms(min(xs))}..{ms(max(xs))})  {median(xs) / clone:.2f}x clone"
            + ("" if kind == "clone" else f"  paired {min(paired):.2f}..{max(paired):.2f}x")
        )
    result["warmup_s"] = warmups
    print(f"  warmup() itself: {ms(median(warmups))} ({ms(min(warmups))}..{ms(max(warmups))}), before training")
    return result


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
        f"\nINTERLEAVED PERIODS: {n} periods of {args.every} steps per kind, rotating {'/'.join(data)}; "
        f"without checkpointing a period takes {base_steps:.3f} s (sum of per-step medians; mean {base_mean:.3f} s)"
    )
    shown = sorted({1, 2, 3, 5, 10, args.every} & set(range(1, args.every + 1)))
    head = "".join(f"{f'step {k}':>9}" for k in shown)
    print(
        f"  {'':<7}{'overhead':>10}{'blocks':>9}{'slower steps':>14}{'wait':>9}{'mean-based':>12}"
        f"{'periods min..max s':>20}{head}"
    )
    result: dict[str, Any] = {"periods": n, "base_period_s": base_steps, "base_period_mean_s": base_mean}
    for kind in data:
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
            f"  {kind:<12}{robust:>+9.1f}%{ms(block):>9}{ms(steps - base_steps):>14}{ms(wait):>9}"
            f"{r['overhead_mean_pct']:>+11.1f}%{spread:>20}" + "".join(f"{by_pos[k]:>+8.0f}%" for k in shown)
        )
    none = [r.total for r in data["none"]]
    print(f"  {'none':<12}{'':>54}{f'{min(none):.2f}..{max(none):.2f}':>20}")
    return result


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The figures ``run_all.py`` reads, from the ``TRAIN_OVERHEAD_SUMMARY`` line.

    Keys: ``state_mib``, ``every``, ``load_before``/``load_after`` (load averages);
    ``overhead_pct`` per period kind (robust, per-position medians; ``async`` is runstate's
    default writer, ``dcp-thread``/``dcp-process`` DCP's async save), ``overhead_mean_pct``,
    ``blocking_s`` (median blocking per save) and ``wait_s`` (median final wait) per kind;
    ``whole_run_overhead_pct`` per variant when whole runs ran; ``first_save_vs_clone``
    (``cold`` and ``warm``: median first-save blocking / median clone) when measured.
    Missing measurements are absent, never NaN.
    """
    out: dict[str, Any] = {"state_mib": round(result["nbytes"] / MIB, 1), "every": result["every"]}
    out["load_before"], out["load_after"] = result.get("load_before"), result.get("load_after")
    per = result.get("periods")
    if per:
        kinds = [k for k in per if isinstance(per[k], dict) and k != "none"]
        out["overhead_pct"] = {k: round(per[k]["overhead_pct"], 2) for k in kinds}
        out["overhead_mean_pct"] = {k: round(per[k]["overhead_mean_pct"], 2) for k in kinds}
        out["blocking_s"] = {k: round(per[k]["blocking_median_s"], 4) for k in kinds}
        out["wait_s"] = {k: round(per[k]["wait_median_s"], 4) for k in kinds}
    whole = result.get("whole_runs")
    if whole:
        out["whole_run_overhead_pct"] = {k: round(whole[k]["overhead_pct"], 2) for k in ("async", "sync")}
    first = result.get("first_save")
    if first:
        out["first_save_vs_clone"] = {k: round(first[k]["vs_clone"], 3) for k in ("cold", "warm")}
        out["clone_s"] = round(first["clone"]["median_s"], 4)
    return out


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
    parser.add_argument(
        "--variants",
        default="none,async,sync,dcp-thread,dcp-process",
        help=f"period kinds, comma-separated, among {','.join(PERIOD_KINDS)} (none is always measured)",
    )
    parser.add_argument("--first-reps", type=int, default=None, help="first-save rounds (default 5; 0 skips)")
    parser.add_argument("--quick", action="store_true", help="smoke run: hidden 1024, 60 steps, 4 periods")
    parser.add_argument("--dir", default=None, help="scratch directory (default ROOT/.bench-tmp)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    args.steps = args.steps or (60 if args.quick else 200)
    args.reps = args.reps if args.reps is not None else 1
    args.periods = args.periods if args.periods is not None else (4 if args.quick else 15)
    args.hidden = args.hidden or (1024 if args.quick else 1792)
    args.first_reps = args.first_reps if args.first_reps is not None else (2 if args.quick else 5)
    kinds = [k.strip() for k in args.variants.split(",") if k.strip()]
    if unknown := set(kinds) - set(PERIOD_KINDS):
        parser.error(f"unknown --variants {sorted(unknown)}; choose among {PERIOD_KINDS}")
    args.variants = ["none", *[k for k in dict.fromkeys(kinds) if k != "none"]]
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
    result: dict[str, Any] = {"nbytes": nbytes, "every": args.every, "load_before": load_average()}
    warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
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
        if args.first_reps:
            result["first_save"] = first_saves(model, opt, args, work)
        if args.periods:
            result["periods"] = report_periods(periods(model, opt, batches, args, work), args)
    result["load_after"] = load_average()
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
    print("TRAIN_OVERHEAD_SUMMARY " + json.dumps(summary(result), sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
