"""A tiny Lightning training run, for tests/test_lightning.py (run in a subprocess).

    python tests/lightning_job.py RUN_DIR [--io runstate|default|async] [--no-exact]
        [--every K] [--max-steps N] [--kill-at STEP] [--resume] [--generator SEED]

A module with dropout, AdamW with a step-interval StepLR and an epoch-interval
ExponentialLR, and a shuffled torchdata
``StatefulDataLoader`` (num_workers=0) over a dataset that adds random noise to every sample
from Python's, NumPy's and torch's global RNGs, so that every generator matters. Checkpoints
go to ``RUN_DIR/ckpt`` through ``ModelCheckpoint(every_n_train_steps=K, save_last=True)``.

``--kill-at STEP`` SIGKILLs the process at the start of training step STEP (0-based global
step); ``--resume`` calls ``trainer.fit(..., ckpt_path="last")``. Every training step appends
``{"step", "epoch", "loss", "lr"}`` to ``RUN_DIR/log.jsonl`` (the loss as ``float.hex``); a run
that finishes writes its final parameters and optimizer state with ``runstate.save`` to
``RUN_DIR/final`` and its counters to ``RUN_DIR/final.json``.

``python tests/lightning_job.py --serve`` imports lightning once and forks a process per job
(see :func:`serve`): the tests start six of them, and importing lightning takes seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from torchdata.stateful_dataloader import StatefulDataLoader

import runstate
import runstate.lightning

BATCHES_PER_EPOCH = 10


class NoisyData(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """40 fixed samples; each read adds noise drawn from the three global RNGs."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(4 * BATCHES_PER_EPOCH, 4, generator=g)
        self.y = torch.randn(4 * BATCHES_PER_EPOCH, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale = 0.05 * (1.0 + float(np.random.rand())) + 0.001 * random.random()
        return self.x[i] + scale * torch.randn(4), self.y[i]


class Data(pl.LightningDataModule):
    def __init__(self, generator_seed: int | None = None) -> None:
        super().__init__()
        self.generator_seed = generator_seed

    def train_dataloader(self) -> StatefulDataLoader:
        g = None if self.generator_seed is None else torch.Generator().manual_seed(self.generator_seed)
        return StatefulDataLoader(NoisyData(), batch_size=4, shuffle=True, num_workers=0, generator=g)


class Model(pl.LightningModule):
    def __init__(self, log_path: Path, kill_at: int | None) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1)
        )
        self.log_path = log_path
        self.kill_at = kill_at
        self.wait_for: tuple[Path, int] | None = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step == self.kill_at:
            if self.wait_for is not None:  # an async save: let it commit, so the resume point is known
                wait_for_checkpoint(*self.wait_for)
            os.kill(os.getpid(), signal.SIGKILL)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        line = {"step": self.global_step, "epoch": self.current_epoch, "loss": loss.item().hex(), "lr": lr}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(line) + "\n")
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        per_step = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.9)
        per_epoch = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
        schedulers = [{"scheduler": per_step, "interval": "step"}, {"scheduler": per_epoch, "interval": "epoch"}]
        return [opt], schedulers


def wait_for_checkpoint(path: Path, step: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if runstate.load(path)["global_step"] >= step:
                return
        except Exception:  # not there yet, or swapped while being read
            pass
        time.sleep(0.05)
    raise SystemExit(f"{path} never reached step {step}")


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("--io", choices=["runstate", "default", "async"], default="runstate")
    p.add_argument("--no-exact", action="store_true")
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=25)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--generator", type=int, default=None, help="StatefulDataLoader(generator=Generator(seed))")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    plugins: list[Any] = []
    callbacks: list[Any] = [
        ModelCheckpoint(dirpath=args.run_dir / "ckpt", every_n_train_steps=args.every, save_last=True)
    ]
    if args.io == "runstate":
        plugins.append(runstate.lightning.CheckpointIO())
    elif args.io == "async":
        plugins.append(AsyncCheckpointIO(runstate.lightning.CheckpointIO()))
    if not args.no_exact:
        callbacks.append(runstate.lightning.ExactResume())
    trainer = pl.Trainer(
        max_steps=args.max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        plugins=plugins,
        callbacks=callbacks,
    )
    model = Model(args.run_dir / "log.jsonl", args.kill_at)
    if args.io == "async" and args.kill_at is not None:
        model.wait_for = (args.run_dir / "ckpt" / "last.ckpt", args.kill_at // args.every * args.every)
    trainer.fit(model, Data(args.generator), ckpt_path="last" if args.resume else None)

    final = args.run_dir / "final"
    opt = trainer.optimizers[0]
    runstate.save(final, {"params": dict(model.state_dict()), "optimizer": opt.state_dict()})
    counters = {"global_step": trainer.global_step, "current_epoch": trainer.current_epoch}
    (args.run_dir / "final.json").write_text(json.dumps(counters))


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        import forkserver  # tests/forkserver.py (run as a script, tests/ is on sys.path)

        forkserver.serve(main)
    else:
        main(sys.argv[1:])
