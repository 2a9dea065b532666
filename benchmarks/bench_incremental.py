"""What does ``CheckpointManager(incremental=True)`` write, keep and cost? (issue 19 targets)

A fine-tuning state: a frozen base of ``--base-mib`` MiB (fp32 linear layers with
``requires_grad=False``) plus LoRA-style adapters (two rank-8 matrices per layer, ~2 MiB at
256 MiB) trained with AdamW. Each step changes the adapters and AdamW's moments and steps;
the base never changes. Measured, in one run:

1. **bytes written per save** (the blobs a save wrote + its manifest) vs the bytes that
   changed (the adapters' and AdamW's tensors), for 20 saves with ``keep_last=3``;
2. **run directory size** after the 20 saves vs ``base + 3 x changed x 1.1``;
3. **save time** after the first vs a durable ``runstate.save`` of only the changed tensors
   (and vs a raw write of their bytes), medians over the saves, with
   ``incremental="versions"`` (a frozen base whose version counters did not move is not read)
   and with ``incremental=True``, the default (every candidate hashed: the base is read at
   every save);
4. **full fine-tuning** (a model of the same size, every parameter changes, SGD): median save
   time with ``incremental=True`` vs off, saves interleaved round-robin.

Every save is durable (fsync). On a shared 2-core machine, background load moves the times
by tens of percent; the byte counts are exact.

    python benchmarks/bench_incremental.py            # 256 MiB base, ~2-4 minutes on 2 cores
    python benchmarks/bench_incremental.py --quick    # 16 MiB base, ~20 s
"""

from __future__ import annotations

import argparse
import os
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


def incremental_run(scratch: str, base_mib: int, mode: bool | str) -> dict[str, Any]:
    """20 saves of the fine-tuning state; per save: bytes written and seconds."""
    model, opt = build(base_mib, frozen=True)
    run = os.path.join(scratch, f"run-{mode}")
    written, seconds = [], []
    with runstate.CheckpointManager(run, keep_last=KEEP, incremental=mode) as mgr:
        for step in range(1, SAVES + 1):
            train_step(model, opt)
            os.sync()
            t0 = time.perf_counter()
            mgr.save(step, {"model": model, "optimizer": opt})
            seconds.append(time.perf_counter() - t0)
            written.append(runstate.inspect(mgr.path(step)).own_nbytes)
    changed = sum(t.numel() * t.element_size() for t in changed_tensors(model, opt))
    base = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    manifest = os.path.getsize(os.path.join(run, f"step-{SAVES:012d}", "manifest.json"))
    size = tree_bytes(run)
    remove(run)
    return {
        "written": written,
        "seconds": seconds,
        "changed": changed,
        "base": base,
        "manifest": manifest,
        "run_dir": size,
    }


def changed_only_saves(scratch: str, base_mib: int, reps: int) -> dict[str, float]:
    """The reference: durable saves of only the tensors that change (runstate.save, and raw bytes)."""
    model, opt = build(base_mib, frozen=True)
    train_step(model, opt)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    times: dict[str, list[float]] = {"runstate.save (changed only)": [], "raw write (changed only)": []}
    for i in range(reps):
        train_step(model, opt)
        path = os.path.join(scratch, f"changed-{i}")
        os.sync()
        t0 = time.perf_counter()
        runstate.save(path, {"model": trainable, "optimizer": opt})
        times["runstate.save (changed only)"].append(time.perf_counter() - t0)
        remove(path)
        raw = os.path.join(scratch, f"raw-{i}.bin")
        os.sync()
        t0 = time.perf_counter()
        raw_write(raw, changed_tensors(model, opt))  # fsyncs the file and the directory
        times["raw write (changed only)"].append(time.perf_counter() - t0)
        remove(raw)
    return {k: statistics.median(v) for k, v in times.items()}


def full_finetune(scratch: str, base_mib: int, reps: int) -> dict[str, float]:
    """Every parameter changes at every step: incremental on vs off, saves interleaved."""
    model, opt = build(base_mib, frozen=False)
    times: dict[str, list[float]] = {"off": [], "incremental=True": []}
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
                t0 = time.perf_counter()
                mgr.save(step, {"model": model, "optimizer": opt})
                if step > 1:  # the first save of each allocates and creates the run
                    times[name].append(time.perf_counter() - t0)
    finally:
        for mgr in managers.values():
            mgr.close()
    remove(os.path.join(scratch, "ft-off"))
    remove(os.path.join(scratch, "ft-on"))
    return {**{k: statistics.median(v) for k, v in times.items()}, **{f"{k} min": min(v) for k, v in times.items()}}


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
        ref = changed_only_saves(scratch, base_mib, reps)
        full = full_finetune(scratch, base_mib, reps)
    inc = runs["versions"]
    changed, base, manifest = inc["changed"], inc["base"], inc["manifest"]
    later = inc["written"][1:]
    per_save = statistics.median(later)
    limit_dir = base + KEEP * changed * 1.1
    t_inc = statistics.median(inc["seconds"][1:])
    t_hash = statistics.median(runs["True"]["seconds"][1:])
    t_ref = ref["runstate.save (changed only)"]
    overhead = full["incremental=True"] / full["off"] - 1
    print(
        f"\nfrozen base {base / MIB:.1f} MiB, changed per step {changed / MIB:.2f} MiB, manifest {manifest / 1024:.1f} KiB"
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
         f"<= 1.2 x changed-only save ({t_ref * 1e3:.1f} ms)", t_inc <= 1.2 * t_ref),
        ("  raw write of the changed bytes", f"{ref['raw write (changed only)'] * 1e3:.1f} ms", "", None),
        ('  incremental=True (the default: every candidate hashed)', f"{t_hash * 1e3:.1f} ms", "", None),
        ("full fine-tuning save, incremental=True vs off (medians)", f"{overhead * 100:+.1f}%",
         f"<= 3% ({full['incremental=True']:.3f} s vs {full['off']:.3f} s)", overhead <= 0.03),
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
            "save_seconds_hash_mode": runs["True"]["seconds"],
            "changed_only": ref,
            "full_finetune": full,
            "targets": [(*r[:3], r[3]) for r in rows],
        },
    )


if __name__ == "__main__":
    main()
