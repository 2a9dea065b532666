"""The demo's training job: ``python -m runstate.demo.job RUN_DIR OUT_DIR [options]``.

A small real network (an MLP with dropout) learns a noisy two-spiral classification task
generated deterministically in code: AdamW with a warmup + cosine schedule, a shuffled
``StatefulDataLoader`` with random augmentation, checkpoints every ``--save-every`` steps, and
SIGTERM handled as a graceful preemption (save now, then exit with 143 so a supervisor
restarts it). Each step appends its loss to ``OUT_DIR/losses.jsonl``; a finished run writes
``OUT_DIR/final.safetensors`` (its parameters) and ``OUT_DIR/result.json``.

``--resume`` chooses what is restored, to show what a partial resume does: ``full``
(everything); ``weights_only`` (the naive approach: the model's weights, with the learning
rate recomputed from the step number, but fresh optimizer moments, RNG and data order);
``model_optimizer`` (model and optimizer, but the schedule restarts from its warmup and the
RNG and data order are fresh).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import warnings
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import runstate
from runstate.torch import resumable_loader

BATCH = 64
N_TRAIN = 2048


def spirals(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """Two interleaved noisy spirals: a classic task a linear model cannot solve."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 2, (n,), generator=g)
    t = torch.rand(n, generator=g) * 3 * math.pi + 0.5
    angle = t + label * math.pi
    xy = torch.stack([t * torch.cos(angle), t * torch.sin(angle)], dim=1) / 5
    xy += 0.05 * torch.randn(n, 2, generator=g)
    return torch.utils.data.TensorDataset(xy, label)


class Jitter(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Random augmentation drawn from torch's RNG (seeded per sample by the loader)."""

    def __init__(self, base: torch.utils.data.TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base[i]
        return x + 0.02 * torch.randn(2), y


def warmup_cosine(total: int) -> Any:
    warmup = max(1, total // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build(total: int, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(2, 128),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(128, 2),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total))
    loader = resumable_loader(Jitter(spirals(N_TRAIN, seed)), batch_size=BATCH, seed=seed)
    return {"model": model, "optimizer": opt, "scheduler": sched, "loader": loader, "rng": runstate.RNG()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runstate.demo.job")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--resume", choices=["full", "weights_only", "model_optimizer"], default="full")
    p.add_argument("--crash-at", type=int, help="SIGKILL this process right after this step")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out_dir, exist_ok=True)
    state = build(args.steps, args.seed)
    model, opt, sched, loader = state["model"], state["optimizer"], state["scheduler"], state["loader"]
    keep = {"full": list(state), "weights_only": ["model"], "model_optimizer": ["model", "optimizer"]}[args.resume]
    with (
        runstate.CheckpointManager(
            args.run_dir, keep_last=2, save_every_steps=args.save_every, save_on_signals=(signal.SIGTERM,)
        ) as mgr,
        open(os.path.join(args.out_dir, "losses.jsonl"), "a") as log,
    ):
        partial = {k: state[k] for k in keep}
        step = mgr.restore(partial, strict=args.resume == "full") or 0
        if args.resume == "weights_only" and step:
            # The loop knows its step, so the LR follows the schedule (as in scripts that compute
            # the LR from the step number); AdamW's moments, the RNG and the data order are fresh.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(step):
                    sched.step()
        while step < args.steps:
            for x, y in loader:
                model.train()
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                sched.step()
                step += 1
                log.write(json.dumps({"step": step, "loss": loss.item(), "pid": os.getpid()}) + "\n")
                log.flush()
                mgr.save(step, state, metrics={"loss": loss.item()})
                if mgr.preempted:
                    return 128 + signal.SIGTERM  # saved: exit so that the supervisor restarts us
                if step == args.crash_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if step >= args.steps:
                    break
    model.eval()
    test = spirals(1024, args.seed + 1)
    with torch.no_grad():
        eval_loss = nn.functional.cross_entropy(model(test.tensors[0]), test.tensors[1]).item()
        accuracy = (model(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean().item()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(args.out_dir, "final.safetensors")
    )
    with open(os.path.join(args.out_dir, "result.json"), "w") as f:
        json.dump({"eval_loss": eval_loss, "accuracy": accuracy, "steps": step}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
