"""Training jobs with the data loaders users already write; run as subprocesses by
tests/test_loader_matrix.py.

    python loader_job.py first RUN_ROOT OUT_JSON CONFIG:KILL...           # run to the kill point, save; SIGKILL at the end
    python loader_job.py resume RUN_ROOT OUT_JSON CONFIG:KILL:VARIANT...  # restore in this fresh process and finish
    python loader_job.py full RUN_ROOT OUT_JSON CONFIG...                 # uninterrupted runs (the references)
    python loader_job.py dist2-first RUN_ROOT OUT_JSON PORT   # two gloo processes: reference, then kill points
    python loader_job.py dist2-resume RUN_ROOT OUT_JSON PORT  # two fresh gloo processes resume them

KILL is ``mid`` (saved two batches into epoch 1) or ``end`` (saved right after epoch 1's loop
ended). VARIANT is ``runstate`` (the loader is an item of the state, as users write it), or a
negative control on the same checkpoint: ``vanilla`` (everything restored by runstate except
the loader, which then loads its torchdata state the way torchdata alone does) or ``norng``
(everything restored by runstate except the global RNGs).

The ``first`` phase runs several specs one after another in one process (each in its own run
directory, each ending with a save) and SIGKILLs itself after the last save: what is resumed is
always a checkpoint of a process that was killed or abandoned mid-epoch. Every run records,
per step, the loss (hex) and a digest of the batch, and at the end a digest of every parameter
and optimizer buffer; OUT_JSON maps the spec (or config) to that record.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

import runstate

N_SAMPLES = 14
BATCH = 4
EPOCHS = 3
DIM = 6


class Augmented(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Synthetic data; augmentation draws from Python's, NumPy's and torch's global RNGs."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(N_SAMPLES, DIM, generator=g)
        self.y = torch.randint(0, 3, (N_SAMPLES,), generator=g)

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i] + 0.1 * torch.randn(DIM)
        x = x * (1.0 + 0.05 * float(np.random.standard_normal()))
        if random.random() < 0.5:
            x = x.flip(0)
        return x, self.y[i]


def parse_config(name: str) -> dict[str, Any]:
    """``sdl-gen1-w2p-drop0``: StatefulDataLoader(shuffle=True), seeded generator, 2 persistent
    workers, drop_last off; ``dist-w0-drop1``: a DistributedSampler with set_epoch;
    ``dist2-w0-drop0``: the same in two gloo processes (DistributedSampler over 2 replicas);
    ``hfmap-w0``: a Hugging Face ``Dataset``; ``hfiter-w0``: a HF ``IterableDataset`` made from
    a shuffled ``Dataset``; ``hfiterbuf-w0``: one with a shuffle buffer (HF does not save it)."""
    parts = name.split("-")
    cfg: dict[str, Any] = {"kind": parts[0], "generator": False, "workers": 0, "persistent": False, "drop_last": False}
    for p in parts[1:]:
        if p.startswith("gen"):
            cfg["generator"] = p == "gen1"
        elif p.startswith("w"):
            cfg["workers"] = int(p[1])
            cfg["persistent"] = p.endswith("p")
        elif p.startswith("drop"):
            cfg["drop_last"] = p == "drop1"
    return cfg


def hf_dataset(kind: str) -> Any:
    import datasets

    base = Augmented()
    rows = {"x": base.x.tolist(), "y": base.y.tolist()}
    ds = datasets.Dataset.from_dict(rows)

    def augment(row: dict[str, Any]) -> dict[str, Any]:
        x = torch.tensor(row["x"]) + 0.1 * torch.randn(DIM)
        x = x * (1.0 + 0.05 * float(np.random.standard_normal()))
        if random.random() < 0.5:
            x = x.flip(0)
        return {"x": x, "y": torch.tensor(row["y"])}

    ds = ds.shuffle(seed=11)
    if kind == "hfmap":
        ds.set_transform(lambda batch: _batched(augment, batch))
        return ds
    if kind == "hfiter":
        return ds.to_iterable_dataset(num_shards=2).map(augment)
    return ds.to_iterable_dataset(num_shards=2).shuffle(seed=11, buffer_size=8).map(augment)


def _batched(fn: Any, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    rows = [fn({k: v[i] for k, v in batch.items()}) for i in range(len(batch["y"]))]
    return {k: [r[k] for r in rows] for k in rows[0]}


def collate(rows: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(rows[0], dict):
        return torch.stack([r["x"] for r in rows]), torch.stack([r["y"] for r in rows])
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def build(config: str) -> tuple[dict[str, Any], Any, Any]:
    """The state, the loader and the sampler (for set_epoch), built as a user would."""
    cfg = parse_config(config)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    kwargs: dict[str, Any] = {
        "batch_size": BATCH,
        "num_workers": cfg["workers"],
        "drop_last": cfg["drop_last"],
        "collate_fn": collate,
    }
    if cfg["workers"]:
        kwargs["persistent_workers"] = cfg["persistent"]
    sampler = None
    if cfg["kind"] == "sdl":
        gen = torch.Generator().manual_seed(1234) if cfg["generator"] else None
        loader = StatefulDataLoader(Augmented(), shuffle=True, generator=gen, **kwargs)
    elif cfg["kind"] in ("dist", "dist2"):
        data = Augmented()
        world, rank = (dist.get_world_size(), dist.get_rank()) if cfg["kind"] == "dist2" else (1, 0)
        sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=5)
        loader = StatefulDataLoader(data, sampler=sampler, **kwargs)
    elif cfg["kind"] == "hfmap":
        loader = StatefulDataLoader(hf_dataset("hfmap"), shuffle=True, **kwargs)
    else:
        loader = StatefulDataLoader(hf_dataset(cfg["kind"]), **kwargs)
    state = {"model": model, "loader": loader, "rng": runstate.RNG(), "progress": {"epoch": 0, "step": 0}}
    return state, loader, sampler


def digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run(config: str, run_dir: str, *, kill: str | None, variant: str, resume: bool) -> dict[str, Any]:
    """Train ``config``; stop after the save at the kill point (``first``), or restore and finish."""
    state, loader, sampler = build(config)
    model = state["model"]
    record: dict[str, Any] = {"steps": {}}
    # Resumes only read (two of them read each checkpoint at once: runstate's and the control).
    with runstate.CheckpointManager(run_dir, keep_last=1, read_only=resume) as mgr:
        if variant == "runstate":
            mgr.restore(state)
        else:
            # Negative controls. vanilla: everything restored by runstate but the loader, which
            # then loads its torchdata state the way torchdata alone does; norng: everything
            # restored by runstate but the global RNGs.
            left_out = "loader" if variant == "vanilla" else "rng"
            rest = {k: v for k, v in state.items() if k != left_out}
            step = mgr.restore(rest, strict=False)
            state["progress"] = rest["progress"]  # plain values are replaced in the dict restored
            if variant == "vanilla":
                tree = runstate.load(mgr.path(step))
                saved = tree.get("loader") or tree[f"loader@rank{dist.get_rank()}"]
                StatefulDataLoader.load_state_dict(loader, {k: v for k, v in saved.items() if k != "_runstate"})
        progress = state["progress"]
        if resume:
            assert progress["step"] > 0, "nothing was restored"
        while progress["epoch"] < EPOCHS:
            if sampler is not None:
                sampler.set_epoch(progress["epoch"])
            if parse_config(config)["kind"].startswith("hfiter"):
                loader.dataset.set_epoch(progress["epoch"])  # as HF asks: it reshuffles, and resumes once
            for x, y in loader:
                loss = nn.functional.cross_entropy(model(x), y)
                model.zero_grad()
                loss.backward()
                if dist.is_initialized():  # what DDP does: average the gradients of the processes
                    for p in model.parameters():
                        dist.all_reduce(p.grad)
                        p.grad /= dist.get_world_size()
                with torch.no_grad():  # plain SGD: torch.optim would import torch._dynamo (seconds per process)
                    for p in model.parameters():
                        p -= 0.05 * p.grad
                progress["step"] += 1
                record["steps"][str(progress["step"])] = [loss.item().hex(), digest(x, y)]
                if kill == "mid" and not resume and progress["epoch"] == 1 and len(record["steps"]) == _mid(config):
                    mgr.save(progress["step"], state, force=True)
                    return record
            progress["epoch"] += 1
            if kill == "end" and not resume and progress["epoch"] == 2:
                mgr.save(progress["step"], state, force=True)
                return record
    record["final"] = digest(*model.state_dict().values())
    return record


def _mid(config: str) -> int:
    """Steps done when the mid-epoch save happens: all of epoch 0 and one or two batches of epoch 1."""
    cfg = parse_config(config)
    samples = -(-N_SAMPLES // 2) if cfg["kind"] == "dist2" else N_SAMPLES
    per_epoch = samples // BATCH if cfg["drop_last"] else -(-samples // BATCH)
    return per_epoch + min(2, per_epoch - 1)


DIST2 = "dist2-w0-drop0"


def _dist2_rank(rank: int, phase: str, root: str, out: str, port: str) -> None:
    """One of two gloo processes: ``first`` runs the reference, then each kill point, then
    SIGKILLs itself; ``resume`` resumes each kill point (runstate's way and the control's)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    _setup()
    results: dict[str, Any] = {}
    if phase == "dist2-first":
        results[DIST2] = run(DIST2, os.path.join(root, "dist2-full"), kill=None, variant="runstate", resume=False)
    for kill in ("mid", "end"):
        run_dir = os.path.join(root, f"{DIST2}-{kill}")
        variants = ("runstate",) if phase == "dist2-first" else ("runstate", "vanilla")
        for variant in variants:
            spec = f"{DIST2}:{kill}:{variant}"
            results[spec] = run(DIST2, run_dir, kill=kill, variant=variant, resume=phase == "dist2-resume")
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(results, f)
    dist.barrier()  # both results are written before either process is killed
    if phase == "dist2-first":
        os.kill(os.getpid(), signal.SIGKILL)
    dist.destroy_process_group()


def _setup() -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*set_vital.*")


def main() -> None:
    phase, root, out = sys.argv[1:4]
    if phase.startswith("dist2"):
        ctx = torch.multiprocessing.start_processes(
            _dist2_rank, args=(phase, root, out, sys.argv[4]), nprocs=2, join=False, start_method="spawn"
        )
        try:
            while not ctx.join():
                pass
        except torch.multiprocessing.ProcessExitedException as exc:
            if phase != "dist2-first" or exc.signal_name != "SIGKILL":
                raise
        return
    _setup()
    results: dict[str, Any] = {}
    for spec in sys.argv[4:]:
        if phase == "full":
            results[spec] = run(spec, os.path.join(root, "full-" + spec), kill=None, variant="runstate", resume=False)
            continue
        config, kill, variant = (spec + ":runstate").split(":")[:3]
        run_dir = os.path.join(root, f"{config}-{kill}")
        results[spec] = run(config, run_dir, kill=kill, variant=variant, resume=phase == "resume")
    with open(out, "w") as f:
        json.dump(results, f)
    if phase == "first":
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
