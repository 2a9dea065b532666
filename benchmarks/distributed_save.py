"""Save and restore time of one state from 1 process and from 2 FSDP2 processes (gloo, CPU).

The same model (LAYERS Linear layers of WIDTH x WIDTH, fp32) with Adam state is saved by a
single process (``CheckpointManager`` without torch.distributed) and by 2 processes after
``fully_shard`` (each writes its half, rank 0 merges and commits), then restored on the same
world size. Reported: median seconds of 3 saves and 3 restores, and the ratio to one process.
On this 2-core machine both processes share one disk, so the figure shows the protocol's
overhead, not a speed-up. See docs/scaling.md.

    python benchmarks/distributed_save.py [--width 2048] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import runstate

REPEATS = 3


def build(width: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def run(rank: int, world: int, args: argparse.Namespace, out: str, fsdp: bool) -> None:
    if fsdp:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    model = build(args.width, args.layers)
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, args.width)).sum().backward()
    opt.step()
    state = {"model": model, "optimizer": opt}
    saves, loads = [], []
    for i in range(REPEATS):
        directory = os.path.join(args.dir, f"{'fsdp' if fsdp else 'single'}-{i}")
        if fsdp:
            dist.barrier()
        started = time.perf_counter()
        with runstate.CheckpointManager(directory) as mgr:
            mgr.save(1, state)
        saves.append(time.perf_counter() - started)
        if fsdp:
            dist.barrier()
        started = time.perf_counter()
        with runstate.CheckpointManager(directory) as mgr:
            mgr.restore(state)
        loads.append(time.perf_counter() - started)
        if fsdp:
            dist.barrier()
        if rank == 0:
            shutil.rmtree(directory)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"save": statistics.median(saves), "load": statistics.median(loads)}, f)
    if fsdp:
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)  # torch 2.13 sometimes aborts in C++ teardown at exit


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        args.dir = tmp
        single, sharded = os.path.join(tmp, "single.json"), os.path.join(tmp, "fsdp.json")
        run(0, 1, args, single, fsdp=False)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        mp.spawn(run, args=(2, args, sharded, True), nprocs=2, join=True)
        a: dict[str, Any] = json.loads(Path(single).read_text())
        b: dict[str, Any] = json.loads(Path(sharded).read_text())
    gib = args.width * (args.width + 1) * args.layers * 4 * 3 / 2**30
    print(f"state: {gib:.2f} GiB (fp32 params + Adam moments), median of {REPEATS}")
    print(f"{'':24} {'save (s)':>9} {'restore (s)':>12}")
    print(f"{'1 process':24} {a['save']:>9.3f} {a['load']:>12.3f}")
    print(f"{'2 processes, FSDP2':24} {b['save']:>9.3f} {b['load']:>12.3f}")
    print(f"{'ratio 2 / 1':24} {b['save'] / a['save']:>9.2f} {b['load'] / a['load']:>12.2f}")


if __name__ == "__main__":
    main()
