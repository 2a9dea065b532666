"""What does ``CheckpointManager(incremental=True)`` write, keep and cost? (issue 19 targets)

A fine-tuning state: a frozen base of ``--base-mib`` MiB (fp32 linear layers with
``requires_grad=False``) plus LoRA-style adapters (two rank-8 matrices per layer, ~2 MiB at
256 MiB) trained with AdamW. Each step changes the adapters and AdamW's moments and steps;
the base never changes. Measured, in one run:

1. **bytes written per save** (the blobs a save wrote + its manifest) vs the bytes that
   changed (the adapters' and AdamW's tensors), for 20 saves with ``keep_last=3``;
2. **run directory size** after the 20 saves vs ``base + 3 x changed x 1.1``;
3. **save time** after the first vs a durable ``runstate.save`` of only the changed tensors
   (and vs a raw write of their bytes), each reference save right after each incremental
   save (same load), medians over the saves, with ``incremental="versions"`` (a frozen base
   whose version counters did not move is not read) and with ``incremental=True``, the
   default (every candidate hashed: the base is read at every save); and once more with
   ``keep_last=None``. Retention (deleting a checkpoint and its blobs, which the reference
   does not do) runs in a background thread after ``save`` returns; it is timed apart, by an
   untimed-for-the-save ``mgr.wait()`` after each save (a training loop saving every N steps
   overlaps it with the next steps);
4. **full fine-tuning** (a model of the same size, every parameter changes, SGD):
   ``incremental=True`` vs off in paired rounds (one save of each per round, alternating
   which goes first): the median of the rounds' ratios, for wall time and for the saving
   process's CPU time (the bytes written are the same: CPU time shows the work incremental
   mode adds without the disk's writeback noise).

Every save is durable (fsync). On a shared 2-core machine, background load moves the times
by tens of percent; the byte counts are exact.

    python benchmarks/bench_incremental.py            # 256 MiB base, ~3-6 minutes on 2 cores
    python benchmarks/bench_incremental.py --quick    # 16 MiB base, ~20 s
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from typing import Any

import torch
from common import MIB, machine, print_machine, raw_write, remove, runstate, scratch_dir, write_json
from torch import nn

RANK = 8
SAVES = 20
KEEP = 3


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``B @ A``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.base = nn.Linear(width, width)
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(RANK, width) * 0.01)
        self.lora_b = nn.Parameter(torch.zeros(width, RANK))


def build(base_mib: int, *, frozen: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    width = 2048 if base_mib >= 64 else 512
    layers = max(1, round(base_mib * MIB / (width * width * 4)))
    if frozen:
        model: nn.Module = nn.Sequential(*[LoraLinear(width) for _ in range(layers)])
        opt: torch.optim.Optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    else:
        model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    return model, opt


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)


def changed_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    trainable = [p.detach() for p in model.parameters() if p.requires_grad]
    moments = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return trainable + moments


def tree_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        total += sum(os.lstat(os.path.join(root, f)).st_size for f in files)
    return total


def _cpu() -> float:
    """CPU seconds of this process so far (user + system, every thread)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def incremental_run(scratch: str, base_mib: int, mode: bool | str, *, keep: int | None = KEEP) -> dict[str, Any]:
    """20 saves of the fine-tuning state; per save: bytes written and seconds.

    Right after each save, and timed the same way, the reference: a durable ``runstate.save``
    of only the tensors that changed (the trainable parameters and the optimizer), and a raw
    write of their bytes. Interleaved, so that both see the same load.
    """
    model, opt = build(base_mib, frozen=True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    run = os.path.join(scratch, f"run-{mode}-{keep}")
    written, seconds, upkeep = [], [], []
    ref: dict[str, list[float]] = {"runstate.save (changed only)": [], "raw write (changed only)": []}
    with runstate.CheckpointManager(run, keep_last=keep, incremental=mode) as mgr:
        for step in range(1, SAVES + 1):
            train_step(model, opt)
            os.sync()
            t0 = time.perf_counter()
            mgr.save(step, {"model": model, "optimizer": opt})
            seconds.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            mgr.wait()  # retention, which runs in the background while training goes on: timed apart
            upkeep.append(time.perf_counter() - t0)
            written.append(runstate.inspect(mgr.path(step)).own_nbytes)
            path = os.path.join(scratch, f"changed-{step}")
            os.sync()
            t0 = time.perf_counter()
            runstate.save(path, {"model": trainable, "optimizer": opt})
            ref["runstate.save (changed only)"].append(time.perf_counter() - t0)
            remove(path)
            raw = os.path.join(scratch, f"raw-{step}.bin")
            os.sync()
            t0 = time.perf_counter()
            raw_write(raw, changed_tensors(model, opt))  # fsyncs the file and the directory
            ref["raw write (changed only)"].append(time.perf_counter() - t0)
            remove(raw)
    changed = sum(t.numel() * t.element_size() for t in changed_tensors(model, opt))
    base = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    manifest = os.path.getsize(os.path.join(run, f"step-{SAVES:012d}", "manifest.json"))
    size = tree_bytes(run)
    remove(run)
    return {
        "written": written,
        "seconds": seconds,
        "upkeep": upkeep,
        "reference": ref,
        "changed": changed,
        "base": base,
        "manifest": manifest,
        "run_dir": size,
    }


def full_finetune(scratch: str, base_mib: int, reps: int) -> dict[str, Any]:
    """Every parameter changes at every step: incremental on vs off, in paired rounds.

    Each round saves once with each manager, in alternating order; the figure is the median
    over rounds of each round's ratio (a round's two saves see about the same load), with
    its quartiles. The saving process's CPU time is measured alongside: the bytes written
    are the same in both modes, so what incremental mode adds is work, which CPU time sees
    without the disk's writeback noise.
    """
    model, opt = build(base_mib, frozen=False)
    times: dict[str, list[float]] = {"off": [], "incremental=True": []}
    cpu: dict[str, list[float]] = {"off": [], "incremental=True": []}
    managers = {
        "off": runstate.CheckpointManager(os.path.join(scratch, "ft-off"), keep_last=KEEP),
        "incremental=True": runstate.CheckpointManager(
            os.path.join(scratch, "ft-on"), keep_last=KEEP, incremental=True
        ),
    }
    try:
        for step in range(1, reps + 2):
            order = list(managers) if step % 2 else list(reversed(list(managers)))  # neither always goes first
            for name in order:
                mgr = managers[name]
                train_step(model, opt)
                os.sync()
                c0, t0 = _cpu(), time.perf_counter()
                mgr.save(step, {"model": model, "optimizer": opt})
                if step > 1:  # the first save of each allocates and creates the run
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(_cpu() - c0)
                mgr.wait()  # its retention (background) must not overlap the other's save
    finally:
        for mgr in managers.values():
            mgr.close()
    remove(os.path.join(scratch, "ft-off"))
    remove(os.path.join(scratch, "ft-on"))
    paired = [on / off for on, off in zip(times["incremental=True"], times["off"], strict=True)]
    paired_cpu = [on / off for on, off in zip(cpu["incremental=True"], cpu["off"], strict=True)]
    return {
        **{k: statistics.median(v) for k, v in times.items()},
        **{f"{k} min": min(v) for k, v in times.items()},
        **{f"{k} cpu": statistics.median(v) for k, v in cpu.items()},
        "paired": statistics.median(paired),
        "paired quartiles": statistics.quantiles(paired, n=4)[::2],
        "paired cpu": statistics.median(paired_cpu),
        "paired cpu quartiles": statistics.quantiles(paired_cpu, n=4)[::2],
        "seconds": times,
        "cpu seconds": cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 MiB base, few reps")
    parser.add_argument("--base-mib", type=int, default=None, help="size of the frozen base (default 256)")
    parser.add_argument("--dir", default=None, help="scratch directory (default ROOT/.bench-tmp)")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()
    base_mib = args.base_mib or (16 if args.quick else 256)
    reps = 5 if args.quick else 15
    with scratch_dir(args.dir, 4 * base_mib * MIB, "bench-incremental-") as scratch:
        print_machine(scratch)
        runs = {str(mode): incremental_run(scratch, base_mib, mode) for mode in ("versions", True)}
        no_retention = incremental_run(scratch, base_mib, "versions", keep=None)
        full = full_finetune(scratch, base_mib, reps)
        load = os.getloadavg()
    inc = runs["versions"]
    changed, base, manifest = inc["changed"], inc["base"], inc["manifest"]
    later = inc["written"][1:]
    per_save = statistics.median(later)
    limit_dir = base + KEEP * changed * 1.1
    t_inc = statistics.median(inc["seconds"][1:])
    t_hash = statistics.median(runs["True"]["seconds"][1:])
    t_ref = statistics.median(inc["reference"]["runstate.save (changed only)"][1:])
    t_raw = statistics.median(inc["reference"]["raw write (changed only)"][1:])
    paired = statistics.median(
        [a / b for a, b in zip(inc["seconds"][1:], inc["reference"]["runstate.save (changed only)"][1:], strict=True)]
    )
    t_upkeep = statistics.median(inc["upkeep"][1:])
    t_keep_all = statistics.median(no_retention["seconds"][1:])
    t_ref_keep_all = statistics.median(no_retention["reference"]["runstate.save (changed only)"][1:])
    overhead = full["paired"] - 1
    q1, q3 = full["paired quartiles"]
    c1, c3 = full["paired cpu quartiles"]
    print(
        f"\nfrozen base {base / MIB:.1f} MiB, changed per step {changed / MIB:.2f} MiB, manifest {manifest / 1024:.1f} KiB"
        f" (load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f})"
    )
    print(f"{'':<58}{'measured':>20}  target")
    rows = [
        ("bytes written by each save after the first (median)", f"{per_save / MIB:.2f} MiB",
         f"<= 1.1 x changed + manifest = {(1.1 * changed + manifest) / MIB:.2f} MiB", per_save <= 1.1 * changed + manifest),
        ("  largest of them", f"{max(later) / MIB:.2f} MiB", "", None),
        ("  first save (everything)", f"{inc['written'][0] / MIB:.1f} MiB", "", None),
        (f"run directory after {SAVES} saves (keep_last={KEEP})", f"{inc['run_dir'] / MIB:.1f} MiB",
         f"<= base + 3 x changed x 1.1 = {limit_dir / MIB:.1f} MiB", inc["run_dir"] <= limit_dir),
        ('save time after the first, incremental="versions" (median)', f"{t_inc * 1e3:.1f} ms",
         f"<= 1.2 x changed-only save ({t_ref * 1e3:.1f} ms): {t_inc / t_ref:.2f}x", t_inc <= 1.2 * t_ref),
        ("  median of per-save ratios (to the changed-only save next)", f"{paired:.2f}x", "", None),
        ("  retention after it, in the background (mgr.wait())", f"{t_upkeep * 1e3:.1f} ms",
         "not counted above: training goes on meanwhile", None),
        ("  raw write of the changed bytes", f"{t_raw * 1e3:.1f} ms", "", None),
        ('  keep_last=None (no retention: nothing deleted)', f"{t_keep_all * 1e3:.1f} ms",
         f"{t_keep_all / t_ref_keep_all:.2f}x its changed-only saves ({t_ref_keep_all * 1e3:.1f} ms)", None),
        ('  incremental=True (the default: every candidate hashed)', f"{t_hash * 1e3:.1f} ms", "", None),
        ("full fine-tuning save, incremental=True vs off (paired)", f"{overhead * 100:+.1f}%",
         f"<= 3% (quartiles {(q1 - 1) * 100:+.1f}%..{(q3 - 1) * 100:+.1f}%; medians "
         f"{full['incremental=True']:.3f} s vs {full['off']:.3f} s)", overhead <= 0.03),
        ("  CPU time of the saving process (paired)", f"{(full['paired cpu'] - 1) * 100:+.1f}%",
         f"(quartiles {(c1 - 1) * 100:+.1f}%..{(c3 - 1) * 100:+.1f}%; medians "
         f"{full['incremental=True cpu']:.3f} s vs {full['off cpu']:.3f} s)", None),
        ("  fastest of each", f"{(full['incremental=True min'] / full['off min'] - 1) * 100:+.1f}%",
         f"({full['incremental=True min']:.3f} s vs {full['off min']:.3f} s)", None),
    ]  # fmt: skip
    for label, measured, target, met in rows:
        verdict = {True: "met", False: "NOT MET", None: ""}[met]
        print(f"{label:<58}{measured:>20}  {target} {verdict}")
    write_json(
        args.json,
        {
            "machine": machine(),
            "base_bytes": base,
            "changed_bytes": changed,
            "manifest_bytes": manifest,
            "written": inc["written"],
            "written_hash_mode": runs["True"]["written"],
            "run_dir_bytes": inc["run_dir"],
            "save_seconds": inc["seconds"],
            "retention_seconds": inc["upkeep"],
            "save_seconds_hash_mode": runs["True"]["seconds"],
            "changed_only": inc["reference"],
            "no_retention": {"seconds": no_retention["seconds"], "changed_only": no_retention["reference"]},
            "full_finetune": full,
            "load_average": load,
            "targets": [(*r[:3], r[3]) for r in rows],
        },
    )


if __name__ == "__main__":
    main()
