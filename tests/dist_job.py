"""Multi-process jobs for tests/test_distributed.py (gloo on CPU, ``torch.multiprocessing``).

Run as ``python tests/dist_job.py SCENARIO WORLD RUN_DIR OUT [options]``; every rank is a
fresh spawned interpreter. Results are JSON files written by rank 0 (or by every rank).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import runstate

FEATURES, HIDDEN, CLASSES, BATCH = 12, 32, 4, 8


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def full(t: Any) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(HIDDEN, CLASSES)
    )


class DataPosition:
    """Each rank's own stream of batches: a generator and a counter (a per-rank item)."""

    def __init__(self, rank: int) -> None:
        self.gen = torch.Generator().manual_seed(1000 + rank)
        self.batches = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(BATCH, FEATURES, generator=self.gen)
        y = torch.randint(0, CLASSES, (BATCH,), generator=self.gen)
        self.batches += 1
        return x, y

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "batches": self.batches}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.gen.set_state(sd["gen"])
        self.batches = int(sd["batches"])


def ddp_train(rank: int, world: int, args: argparse.Namespace) -> None:
    """DDP training with dropout and per-rank data; saves every ``save_every`` steps."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.7)
    torch.manual_seed(77 + rank)  # dropout differs per rank
    state: dict[str, Any] = {"model": model, "optimizer": opt, "scheduler": sched}
    if args.variant != "weights-only":
        state["rng"] = runstate.RNG()
        state["data"] = runstate.PerRank(DataPosition(rank))
    data = state["data"].value if "data" in state else DataPosition(rank)
    options = _storage_options(args)
    with runstate.CheckpointManager(
        args.run_dir, save_every_steps=args.save_every, keep_last=2, storage_options=options
    ) as mgr:
        if args.variant == "weights-only":
            start = mgr.restore({"model": model}, strict=False) or 0
        else:
            start = mgr.restore(state) or 0
        losses = []
        for step in range(start, args.steps):
            x, y = data.next_batch()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if args.kill_rank == rank and step + 1 == args.kill_step and args.kill_when == "before-save":
                os.kill(os.getpid(), signal.SIGKILL)
            if args.kill_rank == rank and step + 1 == args.kill_step and args.kill_when == "mid-save":
                _kill_during_write(rank)
            if args.kill_rank == rank and step + 1 == args.kill_step and args.kill_when == "before-commit":
                _kill_before_commit()
            mgr.save(step + 1, state)
    out = {"rank": rank, "start": start, "losses": losses, "params": digest(dict(model.module.state_dict()))}
    with open(f"{args.out}.rank{rank}.json", "w") as f:
        json.dump(out, f)


def _storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """s3fs options for the test's moto server (dummy credentials), when given one."""
    if not args.s3_endpoint:
        return None
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": args.s3_endpoint, "region_name": "us-east-1"},
        "skip_instance_cache": True,
    }


def _kill_during_write(rank: int) -> None:
    """SIGKILL this process inside its next tensor-file write (after some bytes are on disk)."""
    from runstate._impl import parts

    real = parts.write_safetensors

    def dying(f: Any, *a: Any, **k: Any) -> Any:
        f.write(b"partial")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        return real(f, *a, **k)

    parts.write_safetensors = dying  # type: ignore[assignment]


def _kill_before_commit() -> None:
    """SIGKILL rank 0 once every rank's files are durable, just before it commits."""
    import runstate._impl.pipeline

    def dying(*a: Any, **k: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    runstate._impl.pipeline._commit = dying  # type: ignore[assignment]


def fsdp_model(world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def plain_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_model()
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.eval()  # no dropout: every world size computes the same thing
    for _ in range(steps):
        x = torch.randn(BATCH, FEATURES, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, str]:
    tensors = {f"model.{k}": full(v) for k, v in model.state_dict().items()}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = full(v)
    return {"digest": digest(tensors), "n": str(len(tensors))}


def sharded(rank: int, world: int, args: argparse.Namespace) -> None:
    """save: train a few steps (FSDP2 when world > 1 or --fsdp) and save; restore: restore and
    report the whole state's digest (and continue training: must match uninterrupted)."""
    model, opt = fsdp_model(world) if args.fsdp else plain_model()
    state = {"model": model, "optimizer": opt, "rng": runstate.PerRank(runstate.RNG(), on_resize="skip")}
    if args.action == "save":
        train_steps(model, opt, 3, seed=5)
        with runstate.CheckpointManager(args.run_dir) as mgr:
            mgr.save(3, state, verify=True)  # rank 0 reads every rank's files back before committing
        result = full_state(model, opt)
        train_steps(model, opt, 2, seed=6)
        result["after"] = full_state(model, opt)["digest"]
    else:
        with runstate.CheckpointManager(args.run_dir) as mgr:
            result = {"step": str(mgr.restore(state))}
        result.update(full_state(model, opt))
        train_steps(model, opt, 2, seed=6)
        result["after"] = full_state(model, opt)["digest"]
        result["placements"] = str([getattr(p, "placements", None) for p in model.parameters()][:1])
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)


def per_rank_resize(rank: int, world: int, args: argparse.Namespace) -> None:
    """Restore a checkpoint with per-rank items at another world size: error or skip."""
    model, opt = plain_model()
    state: dict[str, Any] = {"model": model, "optimizer": opt, "rng": runstate.RNG()}
    if args.action == "save":
        with runstate.CheckpointManager(args.run_dir) as mgr:
            mgr.save(1, state)
        return
    result: dict[str, Any] = {}
    try:
        with runstate.CheckpointManager(args.run_dir) as mgr:
            mgr.restore(state)
        result["strict"] = "restored"
    except runstate.StateMismatchError as exc:
        result["strict"] = str(exc)
    state["rng"] = runstate.PerRank(runstate.RNG(), on_resize="skip")
    with runstate.CheckpointManager(args.run_dir) as mgr:
        result["skip"] = mgr.restore(state)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)


def _outcome(fn: Any) -> str:
    """``"ok"`` or the name of the exception ``fn`` raised."""
    try:
        fn()
    except Exception as exc:  # the test compares exception types across ranks
        return type(exc).__name__
    return "ok"


def edge(rank: int, world: int, args: argparse.Namespace) -> None:
    """Failures on one rank only: every rank must raise the same kind of error, none may hang."""
    import numpy as np

    result: dict[str, Any] = {}
    run = args.run_dir
    if args.action == "differ":  # the ranks save / restore different items
        model, opt = plain_model()
        state: dict[str, Any] = {"model": model, "optimizer": opt}
        with runstate.CheckpointManager(run) as mgr:
            mgr.save(1, state)
            extra = {**state, "only_on_rank1": {"x": 1}} if rank == 1 else state
            result["save"] = _outcome(lambda: mgr.save(2, extra))
            result["restore"] = _outcome(lambda: mgr.restore(extra))
            result["steps"] = mgr.steps()
    elif args.action == "write-fails":  # rank 1 fails while writing its files
        model, opt = plain_model()
        state = {"model": model, "rng": runstate.RNG()}
        if rank == 1:
            from runstate._impl import parts

            def failing(*a: Any, **k: Any) -> Any:
                raise MemoryError("simulated: no memory for a host copy")

            parts.write_safetensors = failing  # type: ignore[assignment]
        with runstate.CheckpointManager(run) as mgr:
            result["save"] = _outcome(lambda: mgr.save(1, state))
            dist.barrier()
            result["steps"] = mgr.steps()
            result["leftovers"] = mgr.leftovers()
    elif args.action == "mismatch-and-corrupt":  # rank 0's state mismatches, rank 1's file is damaged
        model, opt = plain_model()
        with runstate.CheckpointManager(run) as mgr:
            mgr.save(1, {"model": model, "rng": runstate.RNG()})
            dist.barrier()
            if rank == 0:
                damaged = Path(run) / "step-000000000001" / "rng_rank1.safetensors"
                raw = bytearray(damaged.read_bytes())
                raw[-1] ^= 0xFF
                damaged.write_bytes(bytes(raw))
            dist.barrier()
            live = torch.nn.Linear(3, 3) if rank == 0 else make_model()
            result["restore"] = _outcome(lambda: mgr.restore({"model": live, "rng": runstate.RNG()}))
    elif args.action == "numpy-in-sharded":  # a sharded item also holding a NumPy array
        model, opt = fsdp_model(world)
        holder = {"model": model, "table": np.arange(6, dtype=np.float32)}
        with runstate.CheckpointManager(run) as mgr:
            mgr.save(1, {"both": holder}, verify=True)
            result["verify"] = runstate.verify(f"{run}/step-000000000001").ok
            fresh = {"both": {"model": fsdp_model(world)[0], "table": np.zeros(6, dtype=np.float32)}}
            result["restore"] = _outcome(lambda: mgr.restore(fresh))
            result["table"] = fresh["both"]["table"].tolist()
    elif args.action == "shard-fallback-save":
        model, opt = fsdp_model(world)
        with runstate.CheckpointManager(run, keep_last=None) as mgr:
            train_steps(model, opt, 2, seed=1)
            mgr.save(1, {"model": model, "optimizer": opt})
            result["digest1"] = full_state(model, opt)["digest"]
            train_steps(model, opt, 2, seed=2)
            mgr.save(2, {"model": model, "optimizer": opt})
    elif args.action == "shard-fallback-restore":
        model, opt = fsdp_model(world)
        with runstate.CheckpointManager(run) as mgr:
            result["step"] = mgr.restore({"model": model, "optimizer": opt})
        result["digest"] = full_state(model, opt)["digest"]
    with open(f"{args.out}.rank{rank}.json", "w") as f:
        json.dump(result, f)


SCENARIOS = {"ddp": ddp_train, "sharded": sharded, "resize": per_rank_resize, "edge": edge}


def _worker(rank: int, world: int, args: argparse.Namespace) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world)
    SCENARIOS[args.scenario](rank, world, args)
    dist.barrier()  # nobody tears gloo down while a peer still talks to it (that aborts the peer)
    dist.destroy_process_group()
    # Skip C++ static destructors: about 1 exit in 10, torch 2.13 aborts there ("terminate
    # called without an active exception", no Python frame) after all work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("world", type=int)
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--variant", default="full")
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-step", type=int, default=-1)
    p.add_argument("--kill-when", default="before-save")
    p.add_argument("--action", default="save")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--s3-endpoint", default="")
    args = p.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    torch.set_num_threads(1)
    if args.world == 1 and not args.fsdp:
        _single(args)
        return
    mp.spawn(_worker, args=(args.world, args), nprocs=args.world, join=True)


def _single(args: argparse.Namespace) -> None:
    """World size 1 without a process group: plain single-process runstate."""
    SCENARIOS[args.scenario](0, 1, args)


if __name__ == "__main__":
    sys.exit(main())
